"""The local endpoint as a user runs it: `mlproj run`, then `mlproj serve --run` in a subprocess, called over HTTP and
through the real boto3 `sagemaker-runtime` client; its answers are the batch-inference job's predictions of the same rows."""
import io, json, os, subprocess, sys, tarfile, urllib.error, urllib.request
from pathlib import Path
import pandas as pd
import pytest
from conftest import script_run, start_endpoint, stop_endpoint   # `mlproj run`; the local endpoint in a subprocess, stopped gracefully

pytestmark = pytest.mark.usefixtures('loopback_only')
MLPROJ = str(Path(sys.executable).parent/'mlproj')
BUNDLED = Path(__file__).resolve().parents[1]/'mlproj'/'assets'/'penguins.csv'
FEATURES = ['island', 'bill_length_mm', 'bill_depth_mm', 'flipper_length_mm', 'body_mass_g', 'sex']


def start_server(outputs, *args):
    "`mlproj serve ARGS --port 0` in a subprocess: (process, base url, stderr file) once /ping answers 200."
    return start_endpoint([MLPROJ, 'serve', '--port', '0', *args], outputs)


def stop_server(p):
    stop_endpoint(p)            # graceful: the arbiter stops its workers and exits 0


def post(url, body, content_type=None, accept=None, path='/invocations'):
    req = urllib.request.Request(url + path, data=body if isinstance(body, bytes) else body.encode(), method='POST')
    if content_type: req.add_header('Content-Type', content_type)
    if accept: req.add_header('Accept', accept)
    try:
        with urllib.request.urlopen(req, timeout=60) as r: return r.status, r.headers.get('Content-Type'), r.read()
    except urllib.error.HTTPError as e: return e.code, e.headers.get('Content-Type'), e.read()


@pytest.fixture(scope='module')
def run_outputs(tmp_path_factory):
    "`mlproj run` (script engine, small forest) in a fresh outputs folder: (outputs, batch predictions file)."
    out = tmp_path_factory.mktemp('outputs')
    script_run(out, '--run-id', 'r1', '-p', 'train.n_estimators=30')
    preds = out/'r1'/'batch_inference'/'predictions'/'predictions-algo-1.csv'
    assert preds.is_file()
    return out, preds


@pytest.fixture(scope='module')
def server(run_outputs):
    out, _ = run_outputs
    p, url, err = start_server(out, '--run', 'r1', '--workers', '2', '--capture', out/'capture')
    yield url, err
    stop_server(p)


@pytest.fixture
def runtime(server):
    import boto3
    return boto3.client('sagemaker-runtime', endpoint_url=server[0], region_name='us-east-1',
                        aws_access_key_id='x', aws_secret_access_key='x')


def batch(preds) -> pd.DataFrame:
    return pd.read_csv(preds, dtype={'penguin_id': str})


def test_routes(server):
    url, _ = server
    assert urllib.request.urlopen(url + '/ping').status == 200
    ep = json.loads(urllib.request.urlopen(url + '/execution-parameters').read())
    assert ep == {'MaxConcurrentTransforms': 2, 'BatchStrategy': 'MULTI_RECORD', 'MaxPayloadInMB': 6}
    with pytest.raises(urllib.error.HTTPError) as e: urllib.request.urlopen(url + '/metrics')
    assert e.value.code == 404 and json.loads(e.value.read())['error'] == 'not_found'


def test_csv_through_boto3_is_the_batch_jobs_bytes(run_outputs, runtime):
    "The bundled table, as the batch-inference job read it, through the runtime client: the very bytes that job wrote."
    _, preds = run_outputs
    r = runtime.invoke_endpoint(EndpointName='penguins', ContentType='text/csv; charset=utf-8', Accept='text/csv', Body=BUNDLED.read_bytes())
    assert r['ContentType'] == 'text/csv'
    assert r['Body'].read() == preds.read_bytes()


@pytest.mark.parametrize('kind', ['application/json', 'application/jsonlines'])
def test_json_and_jsonlines_give_the_batch_predictions(run_outputs, runtime, kind):
    _, preds = run_outputs
    raw = pd.read_csv(BUNDLED, dtype=str, keep_default_na=False)
    rows = [{k: (v if v != '' else None) for k, v in r.items()} for r in raw.to_dict('records')]
    body = json.dumps(rows) if kind == 'application/json' else ''.join(json.dumps(r) + '\n' for r in rows)
    r = runtime.invoke_endpoint(EndpointName='penguins', ContentType=kind, Accept=kind, Body=body)
    text = r['Body'].read().decode()
    got = json.loads(text)['predictions'] if kind == 'application/json' else [json.loads(l) for l in text.splitlines()]
    assert got == batch(preds).to_dict('records')


def test_json_numbers_and_columns_data_shape(run_outputs, server):
    "Numbers as JSON numbers, {'columns', 'data'} shape, no Accept (JSON): the batch job's values for those rows."
    url, _ = server
    _, preds = run_outputs
    raw = pd.read_csv(BUNDLED).head(5)
    data = [[None if pd.isna(v) else v for v in row] for row in raw[['penguin_id'] + FEATURES].itertuples(index=False)]
    s, kind, body = post(url, json.dumps({'columns': ['penguin_id'] + FEATURES, 'data': data}), 'application/json')
    assert (s, kind) == (200, 'application/json')
    assert json.loads(body)['predictions'] == batch(preds).head(5).to_dict('records')


def test_one_headerless_row_with_missing_values(run_outputs, server):
    "A one-row CSV without a header: the model's features in schema order; a row with missing values predicts as in batch."
    url, _ = server
    _, preds = run_outputs
    raw = pd.read_csv(BUNDLED, dtype=str, keep_default_na=False)
    i = int(raw.index[(raw[FEATURES] == '').any(axis=1)][0])                # a row with a missing feature
    s, _, body = post(url, ','.join(raw.loc[i, FEATURES]) + '\n', 'text/csv', 'text/csv')
    assert s == 200
    want = batch(preds).drop(columns='penguin_id').iloc[[i]]
    got = pd.read_csv(io.BytesIO(body), header=None, names=list(want.columns))
    assert len(got) == 1 and got.iloc[0].tolist() == want.iloc[0].tolist()


def test_callers_errors_are_4xx_with_json(server):
    url, err = server
    cases = [(b'Dream,39.1,18.7,181,3750,male\nDream,39.1,18.7,181,3750,unknown\n', 'text/csv', None, 400, 'bad_request', "request row 2, column 'sex'"),
             (b'Dream,39.1', 'text/csv', None, 400, 'bad_request', 'request row 1: 2 values'),
             (b'[{"island": "Dream"}]', 'application/json', None, 400, 'bad_request', 'missing column'),
             (b'{"instances": [', 'application/json', None, 400, 'bad_request', 'not valid JSON'),
             (b'Dream,39.1,18.7,181,3750,male', 'application/x-npy', None, 415, 'unsupported_media_type', 'not supported'),
             (b'Dream,39.1,18.7,181,3750,male', 'text/csv; charset=latin-1', None, 415, 'unsupported_media_type', 'charset'),
             (b'Dream,39.1,18.7,181,3750,male', 'text/csv', 'image/png', 406, 'not_acceptable', 'image/png'),
             (b'x' * 6_291_457, 'text/csv', None, 413, 'payload_too_large', '6,291,456')]
    for body, kind, accept, status, code, words in cases:
        s, ctype, out = post(url, body, kind, accept)
        assert (s, ctype) == (status, 'application/json'), (kind, s, out[:200])
        doc = json.loads(out)
        assert doc['error'] == code and words in doc['message'], doc
        assert 'Traceback' not in doc['message']
    assert post(url, b'x' * 6_291_456, 'text/csv')[0] == 400          # at the limit: read, then refused as a bad row


def test_runtime_client_gets_sagemakers_model_error(runtime):
    "On the runtime path a caller's error comes back as SageMaker sends a container's error: ModelError, original status and body."
    with pytest.raises(runtime.exceptions.ModelError) as e:
        runtime.invoke_endpoint(EndpointName='penguins', ContentType='text/csv', Body=b'Dream,39.1,18.7,181,3750,unknown')
    r = e.value.response
    assert r['OriginalStatusCode'] == 400
    assert "request row 1, column 'sex': unknown category 'unknown'" in json.loads(r['OriginalMessage'])['message']


def test_handlers_come_from_the_packages_code_and_faults_are_bare_500s(run_outputs, tmp_path):
    "The endpoint imports code/inference.py of the package it serves (here one that wraps the handlers and fails on purpose)."
    from mlproj.endpoint import package_model
    out, _ = run_outputs
    pkg = tmp_path/'model.tar.gz'
    package_model(out/'r1'/'train'/'model', pkg)
    script = ('from mlproj.serve import model_fn, input_fn, output_fn\n'
              'from mlproj.serve import predict_fn as _predict\n'
              'def predict_fn(data, model):\n'
              '    if len(data.rows) == 3: raise RuntimeError("internal detail 1234")\n'
              '    return _predict(data, model)\n'
              'def execution_parameters_fn(): return {"MaxConcurrentTransforms": 7, "BatchStrategy": "SINGLE_RECORD", "MaxPayloadInMB": 1}\n')
    with tarfile.open(pkg) as t: members = {m.name: t.extractfile(m).read() for m in t}
    members['code/inference.py'] = script.encode()
    with tarfile.open(pkg, 'w:gz') as t:
        for n, b in members.items():
            ti = tarfile.TarInfo(n); ti.size = len(b); t.addfile(ti, io.BytesIO(b))
    p, url, err = start_server(out, '--model', pkg, '--workers', '1')
    try:
        assert json.loads(urllib.request.urlopen(url + '/execution-parameters').read())['MaxConcurrentTransforms'] == 7
        assert post(url, b'Dream,39.1,18.7,181,3750,male', 'text/csv')[0] == 200
        s, _, body = post(url, b'Dream,39.1,18.7,181,3750,male\n' * 3, 'text/csv')
        assert s == 500 and json.loads(body)['error'] == 'server_error' and b'1234' not in body
    finally:
        stop_server(p)
    err.seek(0); log = err.read()
    assert 'Traceback' in log and 'internal detail 1234' in log          # the traceback is in the server log


def test_a_bad_model_is_one_line_before_serving(tmp_path):
    bad = tmp_path/'model.tar.gz'; bad.write_bytes(b'not a tarball')
    r = subprocess.run([MLPROJ, 'serve', '--model', bad, '--port', '0'], capture_output=True, text=True, timeout=120,
                       env={**os.environ, 'MLPROJ_OUTPUTS': str(tmp_path)})
    assert r.returncode == 2 and 'Traceback' not in r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith('mlproj: error: ') and 'model.tar.gz' in last, r.stderr
