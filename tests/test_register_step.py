"""The pipeline's register step on real runs of `mlproj run` (runtime scripts, so a few seconds a step): the first run
registers version 1 pending, a person approves it, a rerun from the cache registers nothing, `train.seed=7` registers
version 2; champion/challenger fails a weak model naming both values and passes a better one; batch inference takes
its model from an Approved package only."""
import contextlib, io, json, signal
from pathlib import Path
import pytest

pytestmark = pytest.mark.usefixtures('loopback_only')
ACCURACY = 'multiclass_classification_metrics.accuracy.value'
WEAK = ('-p', 'train.n_estimators=1', '-p', 'train.max_depth=1')      # one stump: far below a forest on three species


@pytest.fixture
def mlproj(cli):
    "`mlproj(*args) -> (exit code, stdout, stderr)`: the in-process command of conftest (outputs, registry under tmp_path/outputs)."
    return cli


def accuracy(run_dir: Path) -> float:
    return json.loads((run_dir/'evaluate/evaluation/evaluation.json').read_text())['multiclass_classification_metrics']['accuracy']['value']


def record(out: str) -> dict:
    return json.loads(out)


def test_runs_register_approve_cache_seed_and_champion_challenger(mlproj, tmp_path):
    from mlproj.registry import LocalRegistry
    outputs = tmp_path/'outputs'
    reg = LocalRegistry(outputs/'registry')
    run = lambda rid, *a: mlproj('run', '--engine', 'script', '--run-id', rid, *a)

    # what `make run` does (there with job notebooks; the engine does not change what is registered): version 1, pending
    code, out, err = run('first')
    rec = record(out)
    assert code == 0 and rec['status'] == 'Completed', err
    assert {k: rec['model_package'][k] for k in ('group', 'version', 'status', 'created')} == {'group': 'mlproj', 'version': 1, 'status': 'PendingManualApproval', 'created': True}
    assert rec['model_package']['arn'] == reg.describe('mlproj', 1)['ModelPackageArn']
    assert [(a['action'], a['status'], a['parameters']) for a in rec['actions']] == [('register', 'Completed', {'group': 'mlproj', 'approval_status': 'PendingManualApproval'})]
    assert json.loads((outputs/'first/run.json').read_text())['model_package'] == rec['model_package']
    lines = err.splitlines()
    assert any(l.startswith('[run first] 4/6 register: Completed in ') and l.endswith('model package mlproj/1 (PendingManualApproval, registered)') for l in lines), err
    assert 'model package mlproj/1 (PendingManualApproval, registered)' in lines[-1] and lines[-1].startswith('[run first] Completed in '), lines[-1]
    assert reg.describe('mlproj', 1)['CustomerMetadataProperties']['mlproj:run-id'] == 'first'

    assert mlproj('model', 'approve', 'mlproj/1', '-m', 'first model') == (0, 'mlproj/1: PendingManualApproval -> Approved (first model)\n', '')

    # nothing changed: every step from the cache, nothing registered, the record names the version it reused
    code, out, err = run('again')
    rec = record(out)
    assert code == 0 and rec['cache_hits'] == len(rec['steps']) == 5, err
    assert (rec['model_package']['version'], rec['model_package']['created'], rec['model_package']['status']) == (1, False, 'Approved')
    assert 'model package mlproj/1 (Approved, reused: already registered)' in err.splitlines()[-1]
    assert reg.versions('mlproj') == [1]

    # another seed, another model: version 2, pending
    code, out, err = run('seed7', '-p', 'train.seed=7')
    rec = record(out)
    assert code == 0 and (rec['model_package']['version'], rec['model_package']['created'], rec['model_package']['status']) == (2, True, 'PendingManualApproval'), err
    assert reg.versions('mlproj') == [1, 2]

    # a weak challenger above the threshold but far below the approved champion: the gate fails naming both values
    champion = accuracy(outputs/'first')
    code, out, err = run('weak', *WEAK, '-p', 'gate.threshold=0.3', '-p', 'gate.against=approved', '-p', 'gate.tolerance=0.01')
    rec = record(out)
    weak = accuracy(outputs/'weak')
    assert 0.3 <= weak < champion - 0.01, (weak, champion)          # the premise: one stump passes the threshold, not the champion
    assert code == 1 and (rec['status'], rec['failed_step']) == ('Failed', 'gate'), err
    c = rec['gate']['champion']
    assert (c['champion'], c['value'], c['champion_value'], c['passed']) == ('mlproj/1', weak, champion, False)
    assert rec['failure_reason'] == (f'champion/challenger failed: {ACCURACY} is {weak:g}, {champion - weak:g} worse than approved mlproj/1 ({champion:g}); '
                                     f'required >= {champion - 0.01:g} (champion - gate.tolerance 0.01)'), rec['failure_reason']
    assert 'model_package' not in rec and reg.versions('mlproj') == [1, 2]       # nothing registered
    assert rec['failure_reason'] in err.splitlines()[-1]

    # with no approved package in the group, only the threshold applies, and the record says so
    code, out, err = run('weak-own-group', *WEAK, '-p', 'gate.threshold=0.3', '-p', 'gate.against=approved', '-p', 'register.group=stumps')
    rec = record(out)
    assert code == 0 and rec['gate']['champion'] == {'against': 'approved', 'group': 'stumps', 'champion': None, 'passed': True,
                                                     'message': 'no approved package in model package group stumps: only gate.threshold applies'}, err
    assert (rec['model_package']['group'], rec['model_package']['version']) == ('stumps', 1) and rec['cache_hits'] == 3   # the weak run's steps up to its gate, reused
    assert reg.versions('mlproj') == [1, 2]

    # a better challenger passes: the stump approved as the newest champion of the group, then the forest against it
    code, out, err = run('weak-registered', *WEAK, '-p', 'gate.threshold=0.3')
    rec = record(out)
    assert code == 0 and rec['model_package']['version'] == 3, err
    assert mlproj('model', 'approve', 'mlproj/3', '-m', 'stump, for the test')[0] == 0
    code, out, err = run('better', '-p', 'gate.against=approved')
    rec = record(out)
    c = rec['gate']['champion']
    assert code == 0 and rec['gate']['passed'] and (c['champion'], c['champion_value'], c['value'], c['passed']) == ('mlproj/3', weak, champion, True), err
    assert c['message'].startswith(f'champion/challenger passed: {ACCURACY} is {champion:g}, {champion - weak:g} better than approved mlproj/3')
    assert (rec['model_package']['version'], rec['model_package']['created']) == (1, False)     # the forest of the first run: already version 1

    # batch inference from the registry: an Approved package only, its files checked
    code, out, err = mlproj('job', 'run', 'batch_inference', '--engine', 'script', '--model-package', 'mlproj/2')
    assert (code, out) == (2, '') and err.count('\n') == 1 and 'model package mlproj/2 is PendingManualApproval, not Approved: it cannot be deployed' in err, err
    assert mlproj('model', 'reject', 'mlproj/2', '-m', 'not better')[0] == 0
    code, out, err = mlproj('job', 'run', 'batch_inference', '--engine', 'script', '--model-package', 'mlproj/2')
    assert code == 2 and 'model package mlproj/2 is Rejected, not Approved' in err, err
    code, out, err = mlproj('job', 'run', 'batch_inference', '--engine', 'script', '--model-package', 'mlproj/1', '--name', 'from-package')
    d = json.loads(out)
    assert code == 0 and d['ProcessingJobStatus'] == 'Completed', err
    model_in = next(i for i in d['ProcessingInputs'] if i['InputName'] == 'model')['S3Input']['S3Uri']
    assert model_in.endswith('/registry/mlproj/1/files/model.tar.gz'), model_in
    # the predictions are the first run's model's: the same rows scored as the pipeline's own batch inference did
    mine = sorted((outputs/'from-package/predictions').glob('predictions-*.csv'))
    theirs = sorted((outputs/'first/batch_inference/predictions').glob('predictions-*.csv'))
    assert mine and [p.read_bytes() for p in mine] == [p.read_bytes() for p in theirs]
    # a package whose model file was altered after registration is refused by sha256 (latest-approved is version 3)
    f = reg.files_dir('mlproj', 3)/'model.tar.gz'
    data = bytearray(f.read_bytes()); data[-1] ^= 1; f.write_bytes(bytes(data))
    code, out, err = mlproj('job', 'run', 'batch_inference', '--engine', 'script', '--model-package', 'mlproj/latest-approved')
    assert code == 2 and out == '' and 'model package mlproj/3: file model.tar.gz was altered (sha256 ' in err, err
    # and a run comparing against it now fails its gate saying why, instead of trusting the altered package
    code, out, err = run('against-altered', '-p', 'gate.against=approved')
    rec = record(out)
    assert code == 1 and rec['failed_step'] == 'gate' and 'model package mlproj/3: file model.tar.gz was altered' in rec['failure_reason'], rec.get('failure_reason')


def test_register_and_gate_parameters_are_refused_before_anything_runs(mlproj, tmp_path):
    for args, says in ((('-p', 'register.approval_status=approved'), "register.approval_status='approved': one of PendingManualApproval, Approved, Rejected"),
                       (('-p', 'register.group=my_group'), "register.group: model package group 'my_group'"),
                       (('-p', 'register.grup=x'), "unknown parameter 'grup' for register (did you mean 'group'?)"),
                       (('-p', 'gate.against=champion'), "gate.against='champion': one of none, approved"),
                       (('-p', 'gate.tolerance=-1'), 'gate.tolerance=-1: must be at least 0'),
                       (('-p', 'gate.tolerance=inf'), 'expected float (a finite number)')):
        code, out, err = mlproj('run', '--engine', 'script', *args)
        assert (code, out) == (2, '') and err.count('\n') == 1 and says in err, (args, err)
    assert not (tmp_path/'outputs').exists() or not any((tmp_path/'outputs').iterdir())      # nothing was created
