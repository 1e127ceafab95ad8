"""The `mlproj` command, run as a user runs it: a subprocess in a fresh outputs folder."""
import json, os, subprocess, sys
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
    "Every step run through `mlproj job run`, each taking its inputs from the newest job before it."
    out = tmp_path_factory.mktemp('outputs')
    results = {}
    for step, extra in [('preprocess', []), ('train', ['-p', 'n_estimators=30']), ('evaluate', []),
                        ('batch_inference', ['--instance-count', '3'])]:
        r = mlproj(out, 'job', 'run', step, *extra)
        results[step] = (json.loads(r.stdout), r.stderr)
    return out, results


def test_every_step_runs_as_a_local_job(chain):
    out, results = chain
    for step, (d, log) in results.items():
        assert d['ProcessingJobStatus'] == 'Completed', (step, d.get('FailureReason'))
        sandbox = Path(d['LocalExecution']['sandbox'])
        for inst in d['LocalExecution']['instances']:
            assert (sandbox/inst['host']/'config/processingjobconfig.json').exists()
            assert (sandbox/inst['host']/'config/resourceconfig.json').exists()
        assert 'algo-1 | ' in log            # instance logs streamed with their prefix
    # inputs defaulted to the newest outputs of the step before
    train_in = results['train'][0]['ProcessingInputs'][0]['S3Input']['S3Uri']
    assert train_in == results['preprocess'][0]['ProcessingOutputConfig']['Outputs'][0]['S3Output']['S3Uri']
    ev = json.loads((out/results['evaluate'][0]['ProcessingJobName']/'evaluation/evaluation.json').read_text())
    assert ev['multiclass_classification_metrics']['accuracy']['value'] >= 0.95
    bi = results['batch_inference'][0]
    assert bi['ProcessingResources']['ClusterConfig']['InstanceCount'] == 3
    dist = {i['InputName']: i['S3Input']['S3DataDistributionType'] for i in bi['ProcessingInputs']}
    assert dist == {'model': 'FullyReplicated', 'data': 'ShardedByS3Key', 'code': 'FullyReplicated'}
    # notebook engine (the default): each job brings back its executed notebook and HTML
    for step, (d, _) in results.items():
        report = out/d['ProcessingJobName']/'report'
        n = d['ProcessingResources']['ClusterConfig']['InstanceCount']
        stems = [step] if n == 1 else [f'{step}-algo-{i+1}' for i in range(n)]
        assert sorted(p.name for p in report.iterdir()) == sorted(f'{s}.{x}' for s in stems for x in ('html', 'ipynb')), step
    preds = pd.concat(pd.read_csv(f) for f in (out/bi['ProcessingJobName']/'predictions').glob('predictions-*.csv'))
    assert len(preds) == 344


def test_job_show_prints_the_describe_result(chain):
    out, results = chain
    d = results['train'][0]
    r = mlproj(out, 'job', 'show', d['ProcessingJobName'])
    assert json.loads(r.stdout) == d
    r = mlproj(out, 'job', 'list')
    assert d['ProcessingJobName'] in r.stdout and 'Completed' in r.stdout


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


@pytest.mark.parametrize('args,message', [
    (['job', 'run', 'trian'], "unknown step 'trian' (did you mean 'train'?)"),
    (['job', 'run', 'preprocess', '-p', 'sed=1'], "unknown parameter 'sed' for step preprocess (did you mean 'seed'?)"),
    (['job', 'run', 'preprocess', '-p', 'seed=x'], "parameter seed='x': expected int"),
    (['job', 'run', 'preprocess', '--instance-count', '0'], 'InstanceCount'),
    (['job', 'run', 'preprocess', '--max-runtime', '999999'], 'MaxRuntimeInSeconds: at most 777600'),
    (['job', 'run', 'preprocess', '--name', 'bad_name'], "ProcessingJobName: 'bad_name' does not match"),
    (['job', 'run', 'preprocess', '--input', 'raw=/no/such/file.csv'], "input 'raw' source not found: /no/such/file.csv"),
    (['job', 'run', 'train'], 'no completed preprocess job found'),
    (['job', 'show', 'nope'], "no local job named 'nope'"),
])
def test_refusals_are_one_line(tmp_path, args, message):
    r = mlproj(tmp_path, *args, check=False)
    assert r.returncode in (1, 2), r
    assert message in r.stderr, r.stderr
    if r.returncode == 2: assert r.stderr.strip().count('\n') == 0, r.stderr


def test_mlproj_run_writes_the_run_record(tmp_path):
    r = mlproj(tmp_path, 'run', '-p', 'train.n_estimators=30', '--run-id', 'r1')
    rec = json.loads(r.stdout)
    assert rec == json.loads((tmp_path/'r1/run.json').read_text())
    assert rec['status'] == 'Completed' and rec['accuracy'] >= 0.95
    assert [s['step'] for s in rec['steps']] == ['preprocess', 'train', 'evaluate', 'batch_inference']
    for s in rec['steps']:
        assert s['status'] == 'Completed' and s['seconds'] > 0
        assert all(v['sha256'] for v in s['outputs'].values()), s['step']
    for f in ['preprocess/train/train-algo-1.csv', 'preprocess/test/test-algo-1.csv', 'train/model/model.tar.gz',
              'evaluate/evaluation/evaluation.json', 'evaluate/evaluation/confusion_matrix.png', 'batch_inference/predictions/predictions-algo-1.csv']:
        assert (tmp_path/'r1'/f).exists(), f
    assert rec['steps'][1]['parameters']['n_estimators'] == 30


def test_default_outputs_folder_relative_to_the_working_folder(tmp_path):
    "As `make run` does: no MLPROJ_OUTPUTS, outputs/ relative to where the command runs."
    env = {k: v for k, v in os.environ.items() if k != 'MLPROJ_OUTPUTS'}
    for engine in ('script', 'notebook'):
        r = subprocess.run(MLPROJ + ['job', 'run', 'preprocess', '--engine', engine], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        d = json.loads(r.stdout)
        assert d['ProcessingJobStatus'] == 'Completed'
        assert (tmp_path/'outputs'/d['ProcessingJobName']/'train/train-algo-1.csv').exists()
