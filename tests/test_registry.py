"""The model registry on real pipeline runs: registering, idempotency across cached reruns, approval from the command line,
two registrations at once, files checked by sha256, and the same against SageMaker's Model Registry on moto's server."""
import json, os, subprocess, sys, time
from pathlib import Path
import pytest

pytestmark = pytest.mark.usefixtures('loopback_only')
N_TREES = {'train': {'n_estimators': 20}}
ACCURACY = 'multiclass_classification_metrics.accuracy.value'


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
    "Three runs of the pipeline (runtime scripts): a first one, the same again (every step from the cache), and one with train.seed=7."
    from mlproj.pipeline import run_pipeline
    out = tmp_path_factory.mktemp('runs')
    first = run_pipeline(outputs_dir=out, run_id='first', engine='script', stream=None, params=N_TREES)
    again = run_pipeline(outputs_dir=out, run_id='again', engine='script', stream=None, params=N_TREES)
    seed7 = run_pipeline(outputs_dir=out, run_id='seed7', engine='script', stream=None, params={'train': {'n_estimators': 20, 'seed': 7}})
    for r in (first, again, seed7): assert r['status'] == 'Completed', r.get('failure_reason')
    assert again['cache_hits'] == len(again['steps'])
    return {'outputs': out, 'first': out/'first', 'again': out/'again', 'seed7': out/'seed7'}


def evaluation(run_dir: Path) -> dict:
    return json.loads((run_dir/'evaluate/evaluation/evaluation.json').read_text())


def test_runs_register_once_per_model(runs, tmp_path):
    from mlproj.registry import LocalRegistry, register_run, PENDING, MODEL, EVALUATION
    reg = LocalRegistry(tmp_path/'registry')
    p1 = register_run(runs['first'], registry=reg)
    assert (p1['ModelPackageGroupName'], p1['ModelPackageVersion'], p1['ModelApprovalStatus'], p1['Created']) == ('mlproj', 1, PENDING, True)
    cached = register_run(runs['again'], registry=reg)            # every step from the cache: the same model, nothing new
    assert (cached['ModelPackageVersion'], cached['Created']) == (1, False)
    p2 = register_run(runs['seed7'], registry=reg)
    assert (p2['ModelPackageVersion'], p2['Created']) == (2, True)
    assert reg.versions('mlproj') == [1, 2]
    # the package holds the run's own files, byte for byte, and names the run, its commit and its steps' cache keys
    rec = json.loads((runs['first']/'run.json').read_text())
    steps = {s['step']: s for s in rec['steps']}
    files = reg.files_dir('mlproj', 1)
    assert (files/MODEL).read_bytes() == (runs['first']/'train/model/model.tar.gz').read_bytes()
    assert json.loads((files/EVALUATION).read_text()) == evaluation(runs['first'])
    meta = p1['CustomerMetadataProperties']
    assert meta['mlproj:run-id'] == 'first'
    assert meta['mlproj:cache-key:train'] == steps['train']['cache_key'] and meta['mlproj:cache-key:evaluate'] == steps['evaluate']['cache_key']
    assert meta['mlproj:git-commit'] == (rec['source'] or {}).get('commit', 'unknown')
    assert p1['InferenceSpecification']['Containers'][0]['Image'] == steps['train']['request']['AppSpecification']['ImageUri']
    assert p2['CustomerMetadataProperties']['mlproj:run-id'] == 'seed7'


def test_cli_register_approve_show(runs, cli):
    code, out, err = cli('model', 'register', runs['first'])
    assert (code, out) == (0, 'mlproj/1 PendingManualApproval: registered\n'), err
    assert cli('model', 'register', runs['again'])[1] == 'mlproj/1 PendingManualApproval: this model was already registered\n'
    code, _, err = cli('model', 'show', 'mlproj/latest-approved')
    assert code == 2 and err == 'mlproj: error: mlproj/latest-approved: group mlproj has no approved versions\n'
    assert cli('model', 'approve', 'mlproj/1', '-m', 'beats the baseline') == (0, 'mlproj/1: PendingManualApproval -> Approved (beats the baseline)\n', '')
    assert cli('model', 'register', runs['seed7'])[1] == 'mlproj/2 PendingManualApproval: registered\n'
    code, out, _ = cli('model', 'show', 'mlproj/latest-approved')
    shown = json.loads(out)
    assert (code, shown['ModelPackageVersion'], shown['ModelApprovalStatus'], shown['ApprovalDescription']) == (0, 1, 'Approved', 'beats the baseline')
    assert shown['Metrics']['multiclass_classification_metrics.accuracy'] == evaluation(runs['first'])['multiclass_classification_metrics']['accuracy']['value']
    assert [h['ModelApprovalStatus'] for h in shown['ApprovalHistory']] == ['PendingManualApproval', 'Approved']
    code, out, _ = cli('model', 'list', '--group', 'mlproj')
    lines = out.splitlines()
    assert code == 0 and len(lines) == 2 and lines[0].split()[:2] == ['mlproj/1', 'Approved'] and lines[1].split()[:2] == ['mlproj/2', 'PendingManualApproval']
    assert lines[0].endswith('run first') and lines[1].endswith('run seed7')
    assert cli('model', 'reject', 'mlproj/latest', '-m', 'worse') == (0, 'mlproj/2: PendingManualApproval -> Rejected (worse)\n', '')
    for args, says in ((('approve', 'mlproj/1', '-m', 'again'), 'mlproj/1 is already Approved'),
                       (('show', 'mlproj/3'), 'model package mlproj/3 does not exist (versions 1 to 2)'),
                       (('show', 'nope/1'), "no model package group 'nope'"),
                       (('show', 'mlproj/first'), "bad model package reference 'mlproj/first'"),
                       (('register', runs['outputs']/'jobs'), 'no run.json')):
        code, out, err = cli('model', *args)
        assert (code, out) == (2, '') and err.count('\n') == 1 and says in err, (args, err)


def test_an_altered_package_is_refused_by_sha256(runs, cli):
    assert cli('model', 'register', runs['first'])[0] == 0
    model = Path(os.environ['MLPROJ_OUTPUTS'])/'registry/mlproj/1/files/model.tar.gz'
    data = bytearray(model.read_bytes()); data[-1] ^= 1; model.write_bytes(bytes(data))
    for args in (('show', 'mlproj/1'), ('approve', 'mlproj/1', '-m', 'ok')):
        code, out, err = cli('model', *args)
        assert code == 2 and out == '' and err.count('\n') == 1, err
        assert err.startswith('mlproj: error: model package mlproj/1: file model.tar.gz was altered (sha256 '), err
    code, out, _ = cli('model', 'list')
    assert code == 0 and 'PendingManualApproval' in out           # listing reads the records only; nothing was approved


def test_a_run_that_failed_its_gate_or_was_altered_is_not_registered(runs, tmp_path):
    from mlproj.pipeline import run_pipeline
    from mlproj.registry import LocalRegistry, register_run
    from mlproj.errors import MlprojError
    failed = run_pipeline(outputs_dir=runs['outputs'], run_id='strict', engine='script', stream=None, params={**N_TREES, 'gate': {'threshold': 0.9999}})
    assert failed['status'] == 'Failed' and failed['failed_step'] == 'gate'
    reg = LocalRegistry(tmp_path/'registry')
    with pytest.raises(MlprojError, match=r'run strict failed its quality gate \(quality gate failed: .*\); not registered'):
        register_run(runs['outputs']/'strict', registry=reg)
    # a run folder whose evaluation was edited after the run
    import shutil
    edited = tmp_path/'edited'; shutil.copytree(runs['first'], edited)
    ev = evaluation(edited); ev['multiclass_classification_metrics']['accuracy']['value'] = 1.0
    (edited/'evaluate/evaluation/evaluation.json').write_text(json.dumps(ev))
    rec = json.loads((edited/'run.json').read_text())       # the run's outputs point at the copy
    for s in rec['steps']:
        for o in s.get('outputs', {}).values(): o['uri'] = o['uri'].replace(str(runs['first']), str(edited))
    (edited/'run.json').write_text(json.dumps(rec))
    with pytest.raises(MlprojError, match='evaluation.json was altered after the run'):
        register_run(edited, registry=reg)
    assert not (tmp_path/'registry').exists()                   # refused before anything was written


RACE = """
import sys, time
from pathlib import Path
from mlproj.cli import main
import mlproj.registry, mlproj.train      # imported before the start line, so that both really register at once
go = Path(sys.argv[1])
Path(sys.argv[3]).touch()                 # ready: imported, waiting at the start line
while not go.exists(): time.sleep(0.001)
sys.exit(main(['model', 'register', sys.argv[2]]))
"""

def race(tmp_path, outputs: Path, run_a: Path, run_b: Path) -> list[str]:
    "Two processes registering at the same moment (both wait for one file, then go); their stdout lines."
    go = tmp_path/f'go-{run_a.name}-{run_b.name}'
    env = {**os.environ, 'MLPROJ_OUTPUTS': str(outputs)}
    ready = [tmp_path/f'ready-{i}-{run_a.name}-{run_b.name}' for i in (0, 1)]
    procs = [subprocess.Popen([sys.executable, '-c', RACE, str(go), str(r), str(w)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r, w in zip((run_a, run_b), ready)]
    while not all(w.exists() for w in ready):     # both wait at the start line (whatever the load), then go together
        assert all(p.poll() is None for p in procs), [p.communicate() for p in procs]
        time.sleep(0.01)
    go.touch()
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    return sorted(o.strip() for o, _ in outs)


def test_two_registrations_at_once_get_two_versions(runs, tmp_path):
    from mlproj.registry import LocalRegistry
    out = tmp_path/'outputs'
    got = race(tmp_path, out, runs['first'], runs['seed7'])
    assert got == ['mlproj/1 PendingManualApproval: registered', 'mlproj/2 PendingManualApproval: registered'], got
    reg = LocalRegistry(out/'registry')
    assert sorted(reg.describe('mlproj', v)['CustomerMetadataProperties']['mlproj:run-id'] for v in (1, 2)) == ['first', 'seed7']
    assert sorted(p.name for p in (out/'registry/mlproj').iterdir()) == ['.lock', '1', '2', 'group.json']      # no staging folder left
    # the same model registered twice at once: one version, whoever comes first
    v_first = next(v for v in (1, 2) if reg.describe('mlproj', v)['CustomerMetadataProperties']['mlproj:run-id'] == 'first')   # whoever won the race
    got = race(tmp_path, out, runs['again'], runs['first'])
    assert got == [f'mlproj/{v_first} PendingManualApproval: this model was already registered'] * 2, got
    assert reg.versions('mlproj') == [1, 2]


def test_champion_challenger_on_real_runs(runs, tmp_path):
    "The gate's use: the approved champion's own evaluation against a challenger's, both from pipeline runs."
    from mlproj.evaluate import metric_value
    from mlproj.registry import LocalRegistry, register_run, approved_champion, package_evaluation, compare_with_champion, APPROVED
    reg = LocalRegistry(tmp_path/'registry')
    assert approved_champion(reg, 'mlproj') is None                 # no group yet: only the threshold applies
    register_run(runs['first'], registry=reg)
    assert approved_champion(reg, 'mlproj') is None                 # pending is no champion
    reg.update_status('mlproj', 1, APPROVED, 'ok')
    champ = approved_champion(reg, 'mlproj')
    c = metric_value(package_evaluation(reg, champ), ACCURACY)
    assert c == evaluation(runs['first'])['multiclass_classification_metrics']['accuracy']['value']
    worse = compare_with_champion(c - 0.05, c, '>=', 0.01, 'accuracy', 'mlproj/1')
    assert not worse['passed'] and f'accuracy is {c - 0.05:g}, 0.05 worse than mlproj/1 ({c:g})' in worse['message'], worse['message']
    assert compare_with_champion(c, c, '>=', 0.01)['passed']


# SageMaker's Model Registry, on moto's server

def test_sagemaker_registry_on_moto(runs, moto_server, cli, tmp_path):
    import boto3
    from mlproj.registry import SageMakerRegistry, register_run, approved_champion, package_evaluation, MODEL, EVALUATION
    from mlproj.errors import MlprojError
    bucket = 'mlproj-test-bucket'
    reg = SageMakerRegistry(boto3.Session(), bucket, 'proj', cache=tmp_path/'cache')
    p1 = register_run(runs['first'], registry=reg)
    assert (p1['ModelPackageVersion'], p1['ModelApprovalStatus'], p1['Created']) == (1, 'PendingManualApproval', True)
    assert register_run(runs['again'], registry=reg)['Created'] is False
    assert register_run(runs['seed7'], registry=reg)['ModelPackageVersion'] == 2
    sm, s3 = boto3.client('sagemaker'), boto3.client('s3')
    assert [s['ModelPackageVersion'] for s in sm.list_model_packages(ModelPackageGroupName='mlproj')['ModelPackageSummaryList']] == [1, 2]
    # the package's metrics point at the run's evaluation.json, uploaded to S3
    d = sm.describe_model_package(ModelPackageName=p1['ModelPackageArn'])
    uri = d['ModelMetrics']['ModelQuality']['Statistics']['S3Uri']
    b, _, key = uri[len('s3://'):].partition('/')
    assert (b, json.loads(s3.get_object(Bucket=b, Key=key)['Body'].read())) == (bucket, evaluation(runs['first']))
    assert d['InferenceSpecification']['Containers'][0]['ModelDataUrl'].endswith('/' + MODEL)
    # approve from the command line; the lineage survives the update
    code, out, err = cli('model', 'approve', 'mlproj/1', '-m', 'ok on moto', '--backend', 'sagemaker')
    assert (code, out) == (0, 'mlproj/1: PendingManualApproval -> Approved (ok on moto)\n'), err
    d = sm.describe_model_package(ModelPackageName=p1['ModelPackageArn'])
    assert (d['ModelApprovalStatus'], d['ApprovalDescription'], d['CustomerMetadataProperties']['mlproj:run-id']) == ('Approved', 'ok on moto', 'first')
    code, out, _ = cli('model', 'list', '--backend', 'sagemaker')
    assert code == 0 and [l.split()[:2] for l in out.splitlines()] == [['mlproj/1', 'Approved'], ['mlproj/2', 'PendingManualApproval']]
    champ = approved_champion(reg, 'mlproj')
    assert champ['ModelPackageVersion'] == 1 and package_evaluation(reg, champ) == evaluation(runs['first'])
    assert [p.name for p in (tmp_path/'cache/mlproj').iterdir()] == ['1']      # one checked copy per version used; checks alone keep nothing
    code, out, _ = cli('model', 'show', 'mlproj/latest-approved', '--backend', 'sagemaker')
    assert code == 0 and json.loads(out)['ModelPackageVersion'] == 1
    # an object changed in S3 after registration: refused wherever it is used
    s3.put_object(Bucket=bucket, Key=key, Body=b'{}')
    with pytest.raises(MlprojError, match=f'model package mlproj/1: file {EVALUATION} was altered'):
        package_evaluation(reg, reg.describe('mlproj', 1, verify=False))
    code, _, err = cli('model', 'reject', 'mlproj/1', '-m', 'x', '--backend', 'sagemaker')
    assert code == 2 and f'file {EVALUATION} was altered' in err and err.count('\n') == 1, err
    assert [p.name for p in (tmp_path/'cache/mlproj').iterdir()] == ['1']      # a refused download is not kept
