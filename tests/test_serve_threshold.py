"""A binary model's decision threshold travels from the run to every way of serving it: `mlproj run -p
batch_inference.threshold=0.3` on a binary table (test_tasks' copy of the checkout with the tumours table), then
`mlproj serve --run`, `mlproj transform run --run` and `mlproj serve --model-package` of its registered package answer,
row for row, the batch-inference job's predictions at 0.3 — not the 0.5 default. A bad threshold stops the endpoint
before it serves, in one line naming the variable and the value."""
import io, json, subprocess, urllib.request
from pathlib import Path
import pandas as pd
import pytest
from conftest import endpoint                          # the local endpoint in a subprocess, stopped gracefully
from test_tasks import binary_project                  # noqa: F401  (fixture: the checkout with the binary tumours table)

pytestmark = pytest.mark.usefixtures('loopback_only')
POSITIVE = 'proba_malignant'


@pytest.fixture(scope='module')
def binary_run(binary_project):
    "`mlproj run` of the binary table with -p batch_inference.threshold=0.3: (project, the batch job's predictions file)."
    p = binary_project
    r = p.run('run', '--engine', 'script', '--run-id', 't03', '-p', 'batch_inference.threshold=0.3', '-p', 'train.n_estimators=30')
    assert r.returncode == 0, r.stderr[-3000:]
    preds = p.work/'outputs'/'t03'/'batch_inference'/'predictions'/'predictions-algo-1.csv'
    df = pd.read_csv(preds)
    between = df[(df[POSITIVE] >= 0.3) & (df[POSITIVE] < 0.5)]
    assert len(between) > 0 and (between['predicted_diagnosis'] == 'malignant').all()   # rows 0.3 and 0.5 label differently
    return p, preds


def serve_cmd(p, *args):
    return [p.venv/'bin/mlproj', 'serve', '--port', '0', '--workers', '1', *args]


def invoke(url, body: bytes) -> bytes:
    req = urllib.request.Request(url + '/invocations', data=body, headers={'Content-Type': 'text/csv', 'Accept': 'text/csv'})
    with urllib.request.urlopen(req, timeout=120) as r: return r.read()


def table_bytes(p) -> bytes:
    return (p.src/'mlproj'/'assets'/'tumours.csv').read_bytes()


def test_serve_run_answers_the_batch_jobs_bytes_at_the_runs_threshold(binary_run):
    p, preds = binary_run
    with endpoint(serve_cmd(p, '--run', 't03'), p.work/'outputs', cwd=p.work) as (url, err):
        assert invoke(url, table_bytes(p)) == preds.read_bytes()
    # --threshold overrides the run's: at 0.5 the rows between 0.3 and 0.5 answer the other class, and only they
    with endpoint(serve_cmd(p, '--run', 't03', '--threshold', '0.5'), p.work/'outputs', cwd=p.work) as (url, _):
        got = pd.read_csv(io.BytesIO(invoke(url, table_bytes(p))))
    want = pd.read_csv(preds)
    differ = got['predicted_diagnosis'] != want['predicted_diagnosis']
    assert differ.any() and ((want[POSITIVE] >= 0.3) & (want[POSITIVE] < 0.5))[differ].all()


def test_transform_and_package_carry_the_runs_threshold(binary_run, tmp_path):
    p, preds = binary_run
    src = tmp_path/'in'; src.mkdir()
    (src/'tumours.csv').write_bytes(table_bytes(p))
    r = p.run('transform', 'run', '--run', 't03', '--input', str(src), '--output', str(tmp_path/'out'), '--split-type', 'None', '--workers', '1')
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout)['TransformJobStatus'] == 'Completed'
    assert (tmp_path/'out'/'tumours.csv.out').read_bytes() == preds.read_bytes()
    r = p.run('transform', 'request', '--run', 't03', '--input', str(src))
    assert json.loads(r.stdout)['Environment'] == {'MLPROJ_THRESHOLD': '0.3'}
    r = p.run('serve', 'package', '--run', 't03', '--no-wheel', '--dest', str(tmp_path/'pkg'/'model.tar.gz'))
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout)['environment']['MLPROJ_THRESHOLD'] == '0.3'


def test_the_registered_package_records_and_serves_its_threshold(binary_run):
    p, preds = binary_run
    r = p.run('model', 'show', 'mlproj/1')
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout)['InferenceSpecification']['Containers'][0]['Environment'] == {'MLPROJ_THRESHOLD': '0.3'}
    assert p.run('model', 'approve', 'mlproj/1', '-m', 'threshold 0.3 reviewed').returncode == 0
    with endpoint(serve_cmd(p, '--model-package', 'mlproj/latest-approved'), p.work/'outputs', cwd=p.work) as (url, _):
        assert invoke(url, table_bytes(p)) == preds.read_bytes()


@pytest.mark.parametrize('how, value, words', [
    ('--threshold', '1.5', "mlproj: error: --threshold='1.5' is outside [0, 1]"),
    ('env', 'abc', "mlproj: error: MLPROJ_THRESHOLD='abc' is not a number"),
    ('env', 'nan', "mlproj: error: MLPROJ_THRESHOLD='nan' is outside [0, 1]")])
def test_a_bad_threshold_stops_the_endpoint_in_one_line(binary_run, how, value, words):
    p, _ = binary_run
    model = p.work/'outputs'/'t03'/'train'/'model'
    argv = [p.venv/'bin/mlproj', 'serve', '--model', model, '--port', '0'] + (['--threshold', value] if how == '--threshold' else [])
    env = {**p.env, **({'MLPROJ_THRESHOLD': value} if how == 'env' else {})}
    r = subprocess.run([str(a) for a in argv], cwd=p.work, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and r.stdout == '', (r.stdout, r.stderr[-2000:])
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and r.stderr.startswith(words), r.stderr[-2000:]
