"""The pipeline run as a user runs it (`mlproj run`, script engine, a small forest): content-addressed caching, the
quality gate and lineage. One first run is made per session (`pipeline_first_run` in conftest, shared with
test_hostile.py); each test works on a private copy of it, so the runs a test adds cannot turn another test's miss into a hit."""
import hashlib, json, os, shutil, subprocess, sys
from pathlib import Path
import pytest

MLPROJ = [str(Path(sys.executable).parent/'mlproj')]
BASE = ['--engine', 'script', '-p', 'train.n_estimators=20']


def mlproj(outputs, *args, check=True, env=None):
    env = {**os.environ, 'MLPROJ_OUTPUTS': str(outputs), **(env or {})}
    r = subprocess.run(MLPROJ + [str(a) for a in args], env=env, capture_output=True, text=True, timeout=600)
    if check and r.returncode != 0: raise AssertionError(f'mlproj {args} exited {r.returncode}\n{r.stderr[-3000:]}')
    return r


@pytest.fixture(scope='module')
def first(pipeline_first_run):
    "A completed first run `r1` over copies of the bundled table (as --raw and --data), every step a miss (conftest: made once per session)."
    rec = json.loads((pipeline_first_run/'outputs/r1/run.json').read_text())
    assert rec['status'] == 'Completed' and all(s['cache'] == 'miss' for s in rec['steps']), rec
    return pipeline_first_run


@pytest.fixture
def project(first, tmp_path):
    "A private copy of the first run (its record pointing at the copy) and of its input files."
    for f in ('raw.csv', 'data.csv'): shutil.copy(first/f, tmp_path/f)
    shutil.copytree(first/'outputs/r1', tmp_path/'outputs/r1')
    rec = tmp_path/'outputs/r1/run.json'
    rec.write_text(rec.read_text().replace(str((first/'outputs').resolve()), str((tmp_path/'outputs').resolve())))
    return tmp_path


def run(p, *args, run_id='r2', check=True, env=None):
    r = mlproj(p/'outputs', 'run', *BASE, '--raw', p/'raw.csv', '--data', p/'data.csv', '--run-id', run_id, *args, check=check, env=env)
    return r, json.loads((p/'outputs'/run_id/'run.json').read_text())


def cache_states(rec): return {s['step']: s['cache'] for s in rec['steps']}


def change_one_byte(path: Path, column='bill_length_mm'):
    "Change one digit of `column` in the second data row."
    lines = path.read_text().split('\n')
    cells, i = lines[2].split(','), lines[0].split(',').index(column)
    cells[i] = cells[i][:-1] + ('1' if cells[i][-1] != '1' else '2')     # 39.5 -> 39.1: still a plausible bill
    lines[2] = ','.join(cells)
    path.write_text('\n'.join(lines))


def test_an_unchanged_rerun_reuses_every_step(project):
    r, rec = run(project)
    assert rec['status'] == 'Completed' and rec['cache_hits'] == len(rec['steps']) == 5, cache_states(rec)
    assert all(s['from_run'] == 'r1' for s in rec['steps'])
    for f in ['preprocess/train/train-algo-1.csv', 'train/model/model.tar.gz', 'evaluate/evaluation/evaluation.json',
              'batch_inference/predictions/predictions-algo-1.csv']:
        assert (project/'outputs/r2'/f).read_bytes() == (project/'outputs/r1'/f).read_bytes(), f
    hits = [l for l in r.stderr.splitlines() if 'cache hit: ' in l]
    assert len(hits) == 5 and all(', from run r1' in l for l in hits), r.stderr
    assert 'quality gate: multiclass_classification_metrics.accuracy.value = ' in r.stderr and ': pass' in r.stderr
    assert not list((project/'outputs').glob('jobs/*')), 'a cache hit started a job'


def test_one_byte_of_the_scored_rows_reruns_only_the_steps_reading_them(project):
    change_one_byte(project/'data.csv')
    r, rec = run(project)
    assert cache_states(rec) == {'preprocess': 'hit', 'train': 'hit', 'evaluate': 'hit', 'batch_inference': 'miss', 'monitor': 'miss'}
    assert rec['steps'][3]['cache_reason'].startswith('input data changed (data.csv)'), rec['steps'][3]['cache_reason']


def test_one_byte_of_the_raw_table_reruns_what_reads_changed_content(project):
    "preprocess reruns; a later step reruns exactly when the content it reads changed (and never the scored rows here)."
    change_one_byte(project/'raw.csv')
    _, rec = run(project)
    old = {s['step']: s for s in json.loads((project/'outputs/r1/run.json').read_text())['steps']}
    states = cache_states(rec)
    assert states['preprocess'] == 'miss' and 'input raw changed (raw.csv)' in rec['steps'][0]['cache_reason']
    for s in rec['steps'][1:]:
        changed = any(v['sha256'] != old[s['step']]['inputs'][ch]['sha256'] for ch, v in s['inputs'].items())
        assert (s['cache'] == 'miss') == changed, (s['step'], s['cache'], s.get('cache_reason'))
    assert states['evaluate'] == 'miss'          # the held-out or training split changed, so the model or the test rows did


def test_one_parameter_reruns_its_step_and_everything_downstream(project):
    _, rec = run(project, '-p', 'train.seed=7')
    assert cache_states(rec) == {'preprocess': 'hit', 'train': 'miss', 'evaluate': 'miss', 'batch_inference': 'miss', 'monitor': 'miss'}
    assert rec['steps'][1]['cache_reason'] == 'parameter seed: 42 -> 7'
    assert rec['steps'][2]['cache_reason'].startswith('input model changed')


def test_an_earlier_output_changed_on_disk_is_not_reused(project):
    (project/'outputs/r1/train/model/model.tar.gz').write_bytes(b'not the model that was recorded')
    _, rec = run(project)
    assert cache_states(rec) == {'preprocess': 'hit', 'train': 'miss', 'evaluate': 'hit', 'batch_inference': 'hit', 'monitor': 'hit'}
    assert 'changed since it was recorded' in rec['steps'][1]['cache_reason']
    assert (project/'outputs/r2/train/model/model.tar.gz').read_bytes()[:2] == b'\x1f\x8b'   # retrained: a real archive again


def test_a_failed_step_is_never_reused(project):
    bad = project/'data.csv'
    lines = bad.read_text().split('\n'); cells = lines[1].split(',')
    cells[lines[0].split(',').index('bill_length_mm')] = 'abc'; lines[1] = ','.join(cells)
    bad.write_text('\n'.join(lines))
    r, rec = run(project, check=False)
    assert r.returncode == 1 and rec['status'] == 'Failed' and rec['failed_step'] == 'batch_inference'
    r, rec = run(project, run_id='r3', check=False)
    assert rec['steps'][3]['cache'] == 'miss' and rec['steps'][3]['status'] == 'Failed'


def test_the_gate_stops_the_pipeline_before_batch_inference(project):
    r, rec = run(project, '-p', 'gate.threshold=1.01', check=False)
    assert r.returncode == 1, r.stderr[-2000:]
    assert rec['status'] == 'Failed' and rec['failed_step'] == 'gate' and rec['skipped'] == ['batch_inference', 'monitor']
    assert [s['step'] for s in rec['steps']] == ['preprocess', 'train', 'evaluate']
    msg = rec['failure_reason']
    assert msg.startswith('quality gate failed: multiclass_classification_metrics.accuracy.value is 0.9') and 'required at least 1.01' in msg, msg
    assert msg in r.stderr and not (project/'outputs/r2/batch_inference').exists()
    assert rec['gate'] == {'step': 'evaluate', 'metric': 'multiclass_classification_metrics.accuracy.value', 'op': '>=',
                           'threshold': 1.01, 'value': rec['gate']['value'], 'passed': False, 'message': msg}


def test_a_bad_pipeline_parameter_is_refused_before_anything_runs(project):
    for args, text in [(['-p', 'gate.treshold=2'], "unknown parameter 'treshold' for gate (did you mean 'threshold'?)"),
                       (['-p', 'train.instance_count=2'], "unknown parameter 'instance_count'"),
                       (['-p', 'evaluate.expected_model_sha256=ab'], 'set by the run')]:
        r = mlproj(project/'outputs', 'run', *args, '--run-id', 'bad', check=False)
        assert r.returncode == 2 and text in r.stderr and r.stderr.count('\n') == 1, r.stderr
    assert not (project/'outputs/bad').exists()


def test_a_step_key_is_rebuilt_from_run_json_alone(first):
    rec = json.loads((first/'outputs/r1/run.json').read_text())
    for s in rec['steps']:
        material = {'step': s['step'], 'engine': s['engine'], 'code': s['code'], 'parameters': s['parameters'],
                    'resources': s['resources'], 'inputs': {ch: v['sha256'] for ch, v in s['inputs'].items()}}
        key = hashlib.sha256(json.dumps(material, sort_keys=True, separators=(',', ':')).encode()).hexdigest()
        assert key == s['cache_key'], s['step']


def test_lineage_names_code_version_commit_requests_and_every_file(first):
    rec = json.loads((first/'outputs/r1/run.json').read_text())
    import mlproj
    assert rec['mlproj_version'] == mlproj.__version__
    head = subprocess.run(['git', '-C', str(Path(mlproj.__file__).parent), 'rev-parse', 'HEAD'], capture_output=True, text=True).stdout.strip()
    assert rec['source']['commit'] == head and isinstance(rec['source']['dirty'], bool)
    for s in rec['steps']:
        assert s['request']['ProcessingJobName'] == s['job_name'] and s['code']['package'] and s['code']['bundle']
        for side in ('inputs', 'outputs'):
            assert s[side] and all(v['sha256'] and all(len(h) == 64 for h in v['sha256'].values()) for v in s[side].values()), (s['step'], side)
    assert rec['steps'][1]['inputs']['train']['sha256'] == rec['steps'][0]['outputs']['train']['sha256']


def test_an_edited_function_anywhere_in_the_package_reruns_every_step(project, tmp_path_factory):
    "The code part of a key is the whole package: a changed helper in mlproj.features reruns preprocess too."
    import mlproj
    pkg = tmp_path_factory.mktemp('edited')
    shutil.copytree(Path(mlproj.__file__).parent, pkg/'mlproj', symlinks=False, ignore=shutil.ignore_patterns('__pycache__'))
    f = pkg/'mlproj/features.py'
    f.write_text(f.read_text() + '\n# an edit that changes no behaviour, but the code\n')
    _, rec = run(project, env={'PYTHONPATH': str(pkg)})
    assert set(cache_states(rec).values()) == {'miss'}, cache_states(rec)
    reasons = {s['step']: s['cache_reason'] for s in rec['steps']}
    assert all(r.startswith('code changed (mlproj package)') for r in reasons.values()), reasons
    assert 'input model changed (model.tar.gz)' in reasons['evaluate'], reasons     # the model records the feature code it was trained with
    assert rec['source'] is None, rec['source']                      # imported from the copy: not a checkout


def test_the_monitor_outcome_is_in_the_run_record(project):
    "Drift that batch inference accepts (every value plausible) is what the monitor is there to see; sharded over 3 instances, merged."
    from mlproj.data import synthetic_penguins
    shards = project/'drifted'; shards.mkdir()
    d = synthetic_penguins(900, seed=11).assign(bill_length_mm=lambda d: d.bill_length_mm + 6)
    for i in range(3): d.iloc[i::3].to_csv(shards/f'part-{i}.csv', index=False)
    (project/'data.csv').unlink(); shutil.copytree(shards, project/'data.csv')       # --data is now a folder of 3 shards
    r, rec = run(project, '-p', 'batch_inference.instance_count=3', '-p', 'monitor.instance_count=3')
    assert rec['status'] == 'Completed' and cache_states(rec)['monitor'] == 'miss'
    o = rec['outcomes']['monitor']
    assert o['outcome'] == 'CompletedWithViolations' and o['by_kind'].get('baseline_drift_check', 0) >= 1, o
    assert rec['steps'][4]['outcome'] == o and rec['steps'][4]['request']['ProcessingResources']['ClusterConfig']['InstanceCount'] == 3
    assert 'monitor: CompletedWithViolations, ' in r.stderr
    assert json.loads((project/'outputs/r1/run.json').read_text())['outcomes']['monitor'] == {'outcome': 'Completed', 'violations': 0, 'by_kind': {}}
