"""The `mlproj` command, run as a user runs it: a subprocess in a fresh outputs folder (refusals: in-process through
`mlproj.cli.main`, plus one through the console script)."""
import json, os, signal, subprocess, sys
from pathlib import Path
import pandas as pd
import pytest

MLPROJ = [str(Path(sys.executable).parent/'mlproj')]   # the console script installed beside this Python


def mlproj(outputs, *args, check=True):
    env = {**os.environ, 'MLPROJ_OUTPUTS': str(outputs)}
    r = subprocess.run(MLPROJ + [str(a) for a in args], env=env, capture_output=True, text=True, timeout=300)
    if check and r.returncode != 0:
        raise AssertionError(f'mlproj {args} exited {r.returncode}\n{r.stderr[-3000:]}')
    return r


@pytest.fixture(scope='module')
def chain(tmp_path_factory):
    "Every step run through `mlproj job run` (script engine), each taking its inputs from the newest job before it."
    out = tmp_path_factory.mktemp('outputs')
    results = {}
    for step, extra in [('preprocess', []), ('train', ['-p', 'n_estimators=30']), ('evaluate', []),
                        ('batch_inference', ['--instance-count', '3'])]:
        r = mlproj(out, 'job', 'run', step, '--engine', 'script', *extra)
        results[step] = (json.loads(r.stdout), r.stderr)
    return out, results


def test_every_step_runs_as_a_local_job(chain):
    out, results = chain
    for step, (d, log) in results.items():
        assert d['ProcessingJobStatus'] == 'Completed', (step, d.get('FailureReason'))
        assert d['AppSpecification']['ContainerArguments'][0] == f'mlproj.scripts.{step}', step     # the script engine ran
        sandbox = Path(d['LocalExecution']['sandbox'])
        for inst in d['LocalExecution']['instances']:
            assert (sandbox/inst['host']/'config/processingjobconfig.json').exists()
            assert (sandbox/inst['host']/'config/resourceconfig.json').exists()
        assert 'algo-1 | ' in log            # instance logs streamed with their prefix
        assert not (out/d['ProcessingJobName']/'report').exists(), step    # script jobs have no report channel
    # inputs defaulted to the newest outputs of the step before
    train_in = results['train'][0]['ProcessingInputs'][0]['S3Input']['S3Uri']
    assert train_in == results['preprocess'][0]['ProcessingOutputConfig']['Outputs'][0]['S3Output']['S3Uri']
    ev = json.loads((out/results['evaluate'][0]['ProcessingJobName']/'evaluation/evaluation.json').read_text())
    assert ev['multiclass_classification_metrics']['accuracy']['value'] >= 0.95
    bi = results['batch_inference'][0]
    assert bi['ProcessingResources']['ClusterConfig']['InstanceCount'] == 3
    assert [i['host'] for i in bi['LocalExecution']['instances']] == ['algo-1', 'algo-2', 'algo-3']
    dist = {i['InputName']: i['S3Input']['S3DataDistributionType'] for i in bi['ProcessingInputs']}
    assert dist == {'model': 'FullyReplicated', 'data': 'ShardedByS3Key', 'code': 'FullyReplicated'}
    preds = pd.concat(pd.read_csv(f) for f in (out/bi['ProcessingJobName']/'predictions').glob('predictions-*.csv'))
    assert len(preds) == 344


def test_notebook_engine_is_the_default_and_brings_back_its_report(tmp_path):
    """`mlproj job run` without --engine runs the job notebook, and the job brings back its executed notebook and HTML
    as `<step>.ipynb` / `<step>.html`. As `make run` does: no MLPROJ_OUTPUTS, so outputs/ (report included) is relative
    to the working folder. The one `job run` notebook job of this file: the chain above uses the script engine; names
    of several instances' reports (`<step>-algo-<i>.*`) are checked in test_runner.py."""
    env = {k: v for k, v in os.environ.items() if k != 'MLPROJ_OUTPUTS'}
    r = subprocess.run(MLPROJ + ['job', 'run', 'preprocess'], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    d = json.loads(r.stdout)
    assert d['ProcessingJobStatus'] == 'Completed', d.get('FailureReason')
    assert d['AppSpecification']['ContainerArguments'][:2] == ['mlproj.runner', '/opt/ml/processing/input/code/preprocess.ipynb']
    job = tmp_path/'outputs'/d['ProcessingJobName']
    assert sorted(p.name for p in (job/'report').iterdir()) == ['preprocess.html', 'preprocess.ipynb']
    assert (job/'train/train-algo-1.csv').exists() and (job/'test/test-algo-1.csv').exists()


def test_mlproj_run_notebook_engine_records_a_failed_step(tmp_path, opt_ml_penguins):
    """`mlproj run` with the notebook engine (its default): a bad raw row fails the preprocess notebook; the run stops
    there, exits 1 and records the failure; the step had a report channel and the executed notebook is in the
    job's sandbox (a failed job uploads nothing)."""
    bad = tmp_path/'bad.csv'
    bad.write_text(opt_ml_penguins.read_text().replace('Torgersen', 'Atlantis', 1))
    out = tmp_path/'outputs'
    r = mlproj(out, 'run', '--raw', bad, '--run-id', 'r1', check=False)
    assert r.returncode == 1, r.stderr[-3000:]
    rec = json.loads(r.stdout)
    assert rec == json.loads((out/'r1/run.json').read_text())
    assert rec['engine'] == 'notebook' and rec['status'] == 'Failed' and rec['failed_step'] == 'preprocess'
    assert [s['step'] for s in rec['steps']] == ['preprocess']
    s = rec['steps'][0]
    assert s['status'] == 'Failed' and "unknown category 'Atlantis'" in s['failure_reason'], s
    assert set(s['outputs']) == {'train', 'test', 'report'}
    sandbox_report = out/'jobs'/s['job_name']/'algo-1/processing/output/report'
    assert sorted(p.name for p in sandbox_report.iterdir()) == ['preprocess.html', 'preprocess.ipynb']
    assert not (out/'r1/preprocess').exists()


def test_job_request_prints_a_valid_request_without_running(tmp_path):
    r = mlproj(tmp_path, 'job', 'request', 'batch_inference', '--input', f'model={tmp_path}/m', '--input', 'data=s3://bucket/data/',
               '--instance-count', '4', '-p', 'chunksize=5000', '--max-runtime', '600', '--name', 'bi-request')
    req = json.loads(r.stdout)
    from mlproj.jobs import validate_request
    validate_request(req)
    assert req['ProcessingInputs'][1]['S3Input'] == {'S3Uri': 's3://bucket/data/', 'LocalPath': '/opt/ml/processing/input/data',
        'S3DataType': 'S3Prefix', 'S3InputMode': 'File', 'S3DataDistributionType': 'ShardedByS3Key', 'S3CompressionType': 'None'}
    assert req['StoppingCondition'] == {'MaxRuntimeInSeconds': 600}
    assert req['AppSpecification']['ContainerEntrypoint'] == ['python3', '/opt/ml/processing/input/code/entry.py']
    assert req['AppSpecification']['ContainerArguments'] == ['mlproj.runner', '/opt/ml/processing/input/code/batch_inference.ipynb',
                                                             '-p', 'chunksize=5000', '--report', '/opt/ml/processing/output/report']
    r = mlproj(tmp_path, 'job', 'request', 'batch_inference', '--input', f'model={tmp_path}/m', '--input', 'data=s3://bucket/data/', '--engine', 'script', '-p', 'chunksize=5000')
    script = json.loads(r.stdout)
    assert script['AppSpecification'] == {'ImageUri': 'mlproj-local', 'ContainerEntrypoint': ['python3', '/opt/ml/processing/input/code/entry.py'],
                                          'ContainerArguments': ['mlproj.scripts.batch_inference', '--chunksize', '5000']}
    assert [i['InputName'] for i in script['ProcessingInputs']] == ['model', 'data', 'code']
    code = Path(script['ProcessingInputs'][2]['S3Input']['S3Uri'][len('file://'):])
    assert code.parent == (tmp_path/'code').resolve()          # where `job run` would write the bundle ...
    assert list(tmp_path.iterdir()) == []                      # ... but printing a request wrote nothing at all


REFUSALS = [
    (['job', 'run', 'trian'], "unknown step 'trian' (did you mean 'train'?)"),
    (['job', 'run', 'preprocess', '-p', 'sed=1'], "unknown parameter 'sed' for step preprocess (did you mean 'seed'?)"),
    (['job', 'run', 'preprocess', '-p', 'seed=x'], "parameter seed='x': expected int"),
    (['job', 'run', 'preprocess', '--instance-count', '0'], 'InstanceCount'),
    (['job', 'run', 'preprocess', '--max-runtime', '999999'], 'MaxRuntimeInSeconds: at most 777600'),
    (['job', 'run', 'preprocess', '--name', 'bad_name'], "ProcessingJobName: 'bad_name' does not match"),
    (['job', 'run', 'preprocess', '--input', 'raw=/no/such/file.csv'], "input 'raw' source not found: /no/such/file.csv"),
    (['job', 'run', 'train'], 'no completed preprocess job found'),
    (['job', 'show', 'nope'], "no local job named 'nope'"),
]


@pytest.fixture
def keep_sigterm_handler():
    "`mlproj.cli.main` installs a SIGTERM handler; put the test process's back afterwards."
    old = signal.getsignal(signal.SIGTERM)
    yield
    signal.signal(signal.SIGTERM, old)


@pytest.mark.parametrize('args,message', REFUSALS)
def test_refusals_are_one_line(tmp_path, monkeypatch, capsys, keep_sigterm_handler, args, message):
    "In-process: exit 2, one line on stderr, nothing on stdout, nothing written."
    from mlproj.cli import main
    monkeypatch.setenv('MLPROJ_OUTPUTS', str(tmp_path))
    code = main(args)
    out, err = capsys.readouterr()
    assert code == 2, (code, err)
    assert message in err, err
    assert err.startswith('mlproj: error: ') and err.strip().count('\n') == 0, err
    assert out == ''
    assert list(tmp_path.iterdir()) == []         # refused before anything was written: no job, no code bundle, no run


def test_refusal_through_the_console_script(tmp_path, monkeypatch, capsys, keep_sigterm_handler):
    "The installed `mlproj` command exits 2 with the very line `main` prints in-process."
    r = mlproj(tmp_path, 'job', 'run', 'trian', check=False)
    from mlproj.cli import main
    monkeypatch.setenv('MLPROJ_OUTPUTS', str(tmp_path))
    assert main(['job', 'run', 'trian']) == 2
    assert r.returncode == 2, r
    assert r.stderr == capsys.readouterr().err
    assert "unknown step 'trian' (did you mean 'train'?)" in r.stderr and r.stderr.strip().count('\n') == 0, r.stderr
    assert r.stdout == ''


def test_mlproj_run_writes_the_run_record(tmp_path):
    r = mlproj(tmp_path, 'run', '-p', 'train.n_estimators=30', '--run-id', 'r1', '--engine', 'script')
    rec = json.loads(r.stdout)
    assert rec == json.loads((tmp_path/'r1/run.json').read_text())
    assert rec['engine'] == 'script'
    assert rec['status'] == 'Completed' and rec['gate']['value'] >= 0.95
    assert [s['step'] for s in rec['steps']] == ['preprocess', 'train', 'evaluate', 'batch_inference', 'monitor']
    for s in rec['steps']:
        assert s['status'] == 'Completed' and s['seconds'] > 0
        assert all(v['sha256'] for v in s['outputs'].values()), s['step']
    for f in ['preprocess/train/train-algo-1.csv', 'preprocess/test/test-algo-1.csv', 'train/model/model.tar.gz',
              'evaluate/evaluation/evaluation.json', 'evaluate/evaluation/confusion_matrix.png', 'batch_inference/predictions/predictions-algo-1.csv',
              'monitor/monitoring/statistics.json', 'monitor/monitoring/constraint_violations.json']:
        assert (tmp_path/'r1'/f).exists(), f
    assert rec['steps'][1]['parameters']['n_estimators'] == 30


def test_default_outputs_folder_and_job_show(tmp_path):
    """As `make run` does: no MLPROJ_OUTPUTS, outputs/ relative to where the command runs (notebook engine: see
    above); `job show` / `job list` then read the job from the same default folder."""
    env = {k: v for k, v in os.environ.items() if k != 'MLPROJ_OUTPUTS'}
    run = lambda *args: subprocess.run(MLPROJ + list(args), env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    r = run('job', 'run', 'preprocess', '--engine', 'script')
    assert r.returncode == 0, r.stderr[-2000:]
    d = json.loads(r.stdout)
    assert d['ProcessingJobStatus'] == 'Completed'
    assert (tmp_path/'outputs'/d['ProcessingJobName']/'train/train-algo-1.csv').exists()
    assert (tmp_path/'outputs/jobs'/d['ProcessingJobName']).is_dir() and (tmp_path/'outputs/code').is_dir()
    r = run('job', 'show', d['ProcessingJobName'])
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == d
    r = run('job', 'list')
    assert r.returncode == 0, r.stderr
    assert d['ProcessingJobName'] in r.stdout and 'Completed' in r.stdout


def test_output_cut_off_by_its_pipe_is_not_an_error(tmp_path):
    "`mlproj ... | head`: the reader has closed the pipe; the command stops quietly with 141 (128 + SIGPIPE), no 'error' line."
    env = {**os.environ, 'MLPROJ_OUTPUTS': str(tmp_path)}
    r, w = os.pipe()
    os.close(r)                                     # the reader is gone before the first write: that write fails, every time
    try: p = subprocess.run(MLPROJ + ['job', 'params', 'train'], env=env, stdout=w, stderr=subprocess.PIPE, timeout=120)
    finally: os.close(w)
    err = p.stderr.decode()
    assert p.returncode == 141, err
    assert 'error' not in err and 'Traceback' not in err, err
