"""The local executor runs a CreateProcessingJob request as SageMaker would: sandbox, config files,
sharding, concurrency, runtime limit, interruption, failure, output collection."""
import json, os, signal, subprocess, sys, textwrap, time
from pathlib import Path
import pandas as pd
import pytest
from mlproj.jobs import JobSpec, JobInput, JobOutput, render_request, step_job
from mlproj.local import run_local, show_job, instance_processes
from mlproj.contract import process_started
from mlproj.data import synthetic_penguins, TARGET, ID


@pytest.fixture(autouse=True, params=['warm', 'cold'])
def start(request, monkeypatch, tmp_path):
    """Every test here runs twice: instances forked from the warm server, and fresh interpreters (`--cold`, MLPROJ_COLD=1).
    Afterwards every job the test ran under tmp_path must have started its instances that way (a warm run that fell back to
    cold would compare cold with cold)."""
    monkeypatch.setenv('MLPROJ_COLD', '1' if request.param == 'cold' else '0')
    monkeypatch.setenv('MPLBACKEND', os.environ.get('MPLBACKEND', 'Agg'))   # as the executor gives instances: a warm child must not differ
    yield request.param
    for d in tmp_path.rglob('describe.json'):
        starts = [i['start'] for i in json.loads(d.read_text()).get('LocalExecution', {}).get('instances', [])]
        assert set(starts) <= {request.param}, f'{d}: instances started {starts}, asked {request.param}'


def script(tmp_path, body, name='entry.py'):
    p = tmp_path / name
    p.write_text(textwrap.dedent(body))
    return p


PRELUDE = """
import json, os, pathlib, sys, time
root = pathlib.Path(os.environ['MLPROJ_OPT_ML'])
host = json.loads((root/'config/resourceconfig.json').read_text())['current_host']
"""


def job(tmp_path, body, name='job-1', **kw):
    return render_request(JobSpec(name, ['python3', str(script(tmp_path, PRELUDE + body))], **kw))


def alive(pid):
    try: os.kill(pid, 0)
    except ProcessLookupError: return False
    # a zombie is dead for our purpose
    try: return Path(f'/proc/{pid}/status').read_text().find('State:\tZ') < 0
    except FileNotFoundError: return False


def test_sandbox_has_both_config_files_per_instance(tmp_path):
    req = job(tmp_path, "print('hello from', host)", instance_count=3)
    d = run_local(req, jobs_dir=tmp_path/'jobs', stream=None)
    assert d['ProcessingJobStatus'] == 'Completed'
    for i, h in enumerate(['algo-1', 'algo-2', 'algo-3']):
        cfg = json.loads((tmp_path/'jobs/job-1'/h/'config/processingjobconfig.json').read_text())
        assert cfg['ProcessingJobName'] == 'job-1' and cfg['ProcessingJobArn'].endswith('processing-job/job-1')
        assert cfg['AppSpecification'] == req['AppSpecification']
        rc = json.loads((tmp_path/'jobs/job-1'/h/'config/resourceconfig.json').read_text())
        assert rc == {'current_host': h, 'hosts': ['algo-1', 'algo-2', 'algo-3']}
        assert d['LocalExecution']['instances'][i]['exit_code'] == 0
        assert f'hello from {h}' in Path(d['LocalExecution']['instances'][i]['log']).read_text()
    # describe-shaped result, saved for `job show`
    for k in ['ProcessingJobName', 'ProcessingJobArn', 'ProcessingJobStatus', 'ProcessingStartTime', 'ProcessingEndTime',
              'ProcessingResources', 'AppSpecification', 'StoppingCondition', 'RoleArn']:
        assert k in d, k
    assert show_job('job-1', tmp_path/'jobs') == json.loads(json.dumps(d, default=str))


@pytest.mark.parametrize('n_objects,n_hosts', [(10, 3), (2, 5), (7, 1), (6, 3)])
def test_sharded_by_key_is_disjoint_and_complete(tmp_path, n_objects, n_hosts):
    src = tmp_path/'in'; (src/'sub').mkdir(parents=True)
    names = [f'sub/o{i}.txt' if i % 2 else f'o{i}.txt' for i in range(n_objects)]
    for n in names: (src/n).write_text(n)
    body = """
base = root/'processing/input/data'
got = sorted(p.relative_to(base).as_posix() for p in base.rglob('*') if p.is_file())
(root/'processing/output/seen'/f'{host}.json').write_text(json.dumps(got))
full = sorted(p.relative_to(root/'processing/input/all').as_posix() for p in (root/'processing/input/all').rglob('*') if p.is_file())
(root/'processing/output/seen'/f'{host}-all.json').write_text(json.dumps(full))
"""
    req = job(tmp_path, body, instance_count=n_hosts,
              inputs=[JobInput('data', str(src), distribution='ShardedByS3Key'), JobInput('all', str(src))],
              outputs=[JobOutput('seen', str(tmp_path/'seen'))])
    d = run_local(req, jobs_dir=tmp_path/'jobs', stream=None)
    assert d['ProcessingJobStatus'] == 'Completed', d.get('FailureReason')
    shares = [json.loads((tmp_path/'seen'/f'algo-{h+1}.json').read_text()) for h in range(n_hosts)]
    flat = [o for s in shares for o in s]
    assert sorted(flat) == sorted(names)                 # complete
    assert len(flat) == len(set(flat))                   # disjoint
    assert max(map(len, shares)) - min(map(len, shares)) <= 1
    for h in range(n_hosts):                             # FullyReplicated: everything everywhere
        assert json.loads((tmp_path/'seen'/f'algo-{h+1}-all.json').read_text()) == sorted(names)


def test_failing_instance_fails_job_and_carries_exit_message(tmp_path):
    body = """
if host == 'algo-2':
    (root/'output/message').write_text('algo-2 found a bad row in part-7.csv')
    sys.exit(3)
time.sleep(60)
"""
    req = job(tmp_path, body, instance_count=3)
    t0 = time.monotonic()
    d = run_local(req, jobs_dir=tmp_path/'jobs', stream=None, grace=1)
    assert time.monotonic() - t0 < 50          # the others were stopped, not waited for their 60 s (margin for a loaded CI)
    assert d['ProcessingJobStatus'] == 'Failed'
    assert 'algo-2 exited with code 3' in d['FailureReason']
    assert d['ExitMessage'] == 'algo-2: algo-2 found a bad row in part-7.csv'
    inst = {i['host']: i for i in d['LocalExecution']['instances']}
    assert inst['algo-2']['exit_code'] == 3 and inst['algo-2']['exit_message'] == 'algo-2 found a bad row in part-7.csv'
    assert inst['algo-1']['exit_code'] != 0


def test_max_runtime_stops_the_job(tmp_path):
    body = """
(root/'pid').write_text(str(os.getpid()))
time.sleep(120)
"""
    req = job(tmp_path, body, max_runtime=6, instance_count=2)      # long enough for both to have started on a loaded machine
    d = run_local(req, jobs_dir=tmp_path/'jobs', stream=None, grace=1)
    assert d['ProcessingJobStatus'] == 'Stopped'
    assert 'MaxRuntimeInSeconds' in d['FailureReason']
    for h in ['algo-1', 'algo-2']:
        assert not alive(int((tmp_path/'jobs/job-1'/h/'pid').read_text()))


def test_output_name_collision_is_reported_not_overwritten(tmp_path):
    body = "(root/'processing/output/out/result.csv').write_text(host)"
    req = job(tmp_path, body, instance_count=2, outputs=[JobOutput('out', str(tmp_path/'dest'))])
    d = run_local(req, jobs_dir=tmp_path/'jobs', stream=None)
    assert d['ProcessingJobStatus'] == 'Failed'
    assert "output 'out': instances algo-1 and algo-2 both wrote 'result.csv'" in d['FailureReason']
    assert not (tmp_path/'dest/result.csv').exists()


def test_ctrl_c_stops_the_job_cleanly(tmp_path, start):
    """Ctrl-C of the driver stops the job. While it ran, `instance_processes` found each instance (and what it started) through the
    driver's fork server when warm; after, none of what it found still runs."""
    body = """
import subprocess
(root/'warm').write_text(os.environ.get('MLPROJ_WARM', ''))
kid = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'], start_new_session=True)   # in a session of its own
(root/'kid').write_text(str(kid.pid))
(root/'pid').write_text(str(os.getpid()))
print('started', flush=True)
time.sleep(120)
"""
    req = job(tmp_path, body, instance_count=2)
    (tmp_path/'req.json').write_text(json.dumps(req))
    driver = script(tmp_path, f"""
        import json, sys
        from mlproj.local import run_local
        d = run_local(json.load(open({str(tmp_path/'req.json')!r})), jobs_dir={str(tmp_path/'jobs')!r}, grace=1)
        print('STATUS', d['ProcessingJobStatus'], d.get('FailureReason'))
    """, 'driver.py')
    p = subprocess.Popen([sys.executable, str(driver)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    pids = [tmp_path/'jobs/job-1'/h/'pid' for h in ['algo-1', 'algo-2']]
    deadline = time.monotonic() + 60
    while not all(f.exists() for f in pids):
        assert time.monotonic() < deadline, 'instances did not start'
        time.sleep(0.1)
    found = {}
    for h in ['algo-1', 'algo-2']:
        server = (tmp_path/'jobs/job-1'/h/'warm').read_text()
        assert bool(server) == (start == 'warm'), server          # the mode under test is the mode the job runs in
        mine = [int((tmp_path/'jobs/job-1'/h/f).read_text()) for f in ('pid', 'kid')]
        got = instance_processes(f'job-1:{h}:{p.pid}', server)
        assert set(mine) <= set(got), (h, mine, got)              # warm: the instance is found through the server only
        found.update({q: process_started(q) for q in got})
    assert p.poll() is None, 'the driver ended before its processes were looked for'
    p.send_signal(signal.SIGINT)
    out, _ = p.communicate(timeout=60)
    assert 'STATUS Stopped Stopped by user' in out, out
    d = show_job('job-1', tmp_path/'jobs')
    assert d['ProcessingJobStatus'] == 'Stopped'
    assert [q for q, t in found.items() if alive(q) and process_started(q) == t] == []
    assert [h for h in ['algo-1', 'algo-2'] if instance_processes(f'job-1:{h}:{p.pid}')] == []
    for f in pids: assert not alive(int(f.read_text()))


def test_job_name_already_used_is_refused(tmp_path):
    req = job(tmp_path, "pass")
    run_local(req, jobs_dir=tmp_path/'jobs', stream=None)
    with pytest.raises(Exception, match="a job named 'job-1' already exists"):
        run_local(req, jobs_dir=tmp_path/'jobs', stream=None)


def test_missing_input_source_is_refused_before_anything_runs(tmp_path):
    req = job(tmp_path, "(root/'ran').write_text('x')", inputs=[JobInput('data', str(tmp_path/'nope'))])
    with pytest.raises(Exception, match=r"ProcessingInputs\[0\].S3Input.S3Uri: input 'data' source not found"):
        run_local(req, jobs_dir=tmp_path/'jobs', stream=None)
    assert not (tmp_path/'jobs').exists()


# --- pipeline steps as jobs --------------------------------------------------------------

@pytest.fixture(scope='module')
def trained(opt_ml_build_once):
    "A model trained by preprocess + train jobs on the bundled data (built once per session, even across workers)."
    from mlproj.data import bundled_path
    def make(d):
        for step, ins, outs, params in [
            ('preprocess', {'raw': str(bundled_path())}, {'train': str(d/'train'), 'test': str(d/'test')}, {}),
            ('train', {'train': str(d/'train')}, {'model': str(d/'model')}, {'n_estimators': 30}),
        ]:
            r = run_local(render_request(step_job(step, ins, outs, params)), jobs_dir=d/'jobs', stream=None)
            assert r['ProcessingJobStatus'] == 'Completed', r.get('FailureReason')
    return opt_ml_build_once('local_jobs_trained', make)


def test_sharded_batch_inference_equals_single_instance(trained, tmp_path):
    src = tmp_path/'rows'; src.mkdir()
    syn = synthetic_penguins(2000, seed=11).drop(columns=[TARGET])
    for i, part in enumerate(range(0, 2000, 290)):          # 7 shards of uneven size, CSV and Parquet
        chunk = syn.iloc[part:part + 290]
        if i % 2: chunk.to_parquet(src/f'part-{i}.parquet', index=False)
        else: chunk.to_csv(src/f'part-{i}.csv', index=False)
    results = {}
    for n in (1, 3):
        req = render_request(step_job('batch_inference', {'model': str(trained/'model'), 'data': str(src)},
                                      {'predictions': str(tmp_path/f'pred{n}')}, {'chunksize': 100}, instance_count=n))
        d = run_local(req, jobs_dir=tmp_path/'jobs', stream=None)
        assert d['ProcessingJobStatus'] == 'Completed', d.get('FailureReason')
        files = sorted((tmp_path/f'pred{n}').glob('predictions-*.csv'))
        assert [f.name for f in files] == [f'predictions-algo-{h+1}.csv' for h in range(n)]
        results[n] = pd.concat([pd.read_csv(f, dtype=str) for f in files]).sort_values(ID, key=lambda s: s.astype(int)).reset_index(drop=True)
    assert len(results[1]) == 2000
    pd.testing.assert_frame_equal(results[1], results[3])


def test_train_refuses_several_instances(trained):
    with pytest.raises(Exception, match='runs on at most 1 instance'):
        step_job('train', {'train': str(trained/'train')}, {'model': '/tmp/m'}, instance_count=2)


def test_bad_input_in_a_job_fails_with_exit_message(trained, tmp_path):
    bad = tmp_path/'bad.csv'
    rows = synthetic_penguins(20, seed=1)
    rows['bill_depth_mm'] = rows['bill_depth_mm'].astype(object)
    rows.loc[4, 'bill_depth_mm'] = 'abc'
    rows.to_csv(bad, index=False)
    req = render_request(step_job('batch_inference', {'model': str(trained/'model'), 'data': str(bad)}, {'predictions': str(tmp_path/'p')}))
    d = run_local(req, jobs_dir=tmp_path/'jobs', stream=None)
    assert d['ProcessingJobStatus'] == 'Failed'
    assert "bad.csv row 6, column 'bill_depth_mm': 'abc' is not a number" in d['ExitMessage']
    assert not (tmp_path/'p').exists()                       # a failed job uploads nothing, not even an empty folder
    left = [f for f in (tmp_path/'jobs'/req['ProcessingJobName']/'algo-1/processing/output').rglob('*') if f.is_file()]
    assert left == []                                        # and the instance left no partial predictions in its sandbox
