"""Serving from the registry (issues 19 and 20 joined): a pipeline run registers version 1 pending; serving the group's
latest approved package is refused until a person approves it, then `mlproj serve --model-package` answers through the
real boto3 `sagemaker-runtime` client with the batch-inference job's predictions; deploy refuses a rejected package naming
its status and an altered one by sha256; `serve deploy --backend sagemaker --model-package` against moto on loopback."""
import contextlib, io, json, os, signal, subprocess, sys, tarfile, urllib.error, urllib.request
from pathlib import Path
import pytest
from conftest import endpoint, script_run   # the local endpoint in a subprocess, stopped gracefully; `mlproj run`
from mlproj import __version__
WHEEL = f'mlproj-{__version__}-py3-none-any.whl'   # the wheel of this checkout's version (settings.ini)

pytestmark = pytest.mark.usefixtures('loopback_only')     # fixtures loopback_only, moto_server: tests/conftest.py
MLPROJ = str(Path(sys.executable).parent/'mlproj')
BUNDLED = Path(__file__).resolve().parents[1]/'mlproj'/'assets'/'penguins.csv'
ROLE = 'arn:aws:iam::123456789012:role/mlproj-test'
BUCKET = 'mlproj-test-bucket'


@pytest.fixture(scope='module')
def pipeline_run(tmp_path_factory):
    "One `mlproj run` (script engine, a small forest) in a fresh outputs folder: (outputs, run folder)."
    out = tmp_path_factory.mktemp('outputs')
    script_run(out, '--run-id', 'r1', '-p', 'train.n_estimators=30')
    return out, out/'r1'


def mlproj_in(outputs):
    "`run(*args) -> (exit code, stdout, stderr)`: the mlproj command in-process, with outputs (runs, registry) in `outputs`."
    from mlproj.cli import main
    def run(*args):
        old_env, old_sig = os.environ.get('MLPROJ_OUTPUTS'), signal.getsignal(signal.SIGTERM)
        os.environ['MLPROJ_OUTPUTS'] = str(outputs)
        out, err = io.StringIO(), io.StringIO()
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err): code = main([str(a) for a in args])
        finally:
            signal.signal(signal.SIGTERM, old_sig)
            if old_env is None: os.environ.pop('MLPROJ_OUTPUTS', None)
            else: os.environ['MLPROJ_OUTPUTS'] = old_env
        return code, out.getvalue(), err.getvalue()
    return run


def serving(outputs, *args):
    "`mlproj serve ARGS --port 0 --workers 1` in a subprocess: its base URL once /ping answers 200; SIGTERM at the end."
    return endpoint([MLPROJ, 'serve', '--port', '0', '--workers', '1', *args], outputs)


def test_approve_then_serve_the_latest_approved_package(pipeline_run):
    import boto3
    out, run_dir = pipeline_run
    rec = json.loads((run_dir/'run.json').read_text())
    assert {k: rec['model_package'][k] for k in ('group', 'version', 'status', 'created')} == {'group': 'mlproj', 'version': 1, 'status': 'PendingManualApproval', 'created': True}
    # nothing approved yet: refused in one line, before any port is taken
    r = subprocess.run([MLPROJ, 'serve', '--model-package', 'mlproj/latest-approved', '--port', '0'],
                       env={**os.environ, 'MLPROJ_OUTPUTS': str(out)}, capture_output=True, text=True, timeout=120)
    assert (r.returncode, r.stdout, r.stderr) == (2, '', 'mlproj: error: mlproj/latest-approved: group mlproj has no approved versions\n')
    mlproj = mlproj_in(out)
    assert mlproj('model', 'approve', 'mlproj/1', '-m', 'serves the bundled table') == (0, 'mlproj/1: PendingManualApproval -> Approved (serves the bundled table)\n', '')
    with serving(out, '--model-package', 'mlproj/latest-approved') as (url, log):
        assert urllib.request.urlopen(url + '/ping', timeout=10).status == 200
        rt = boto3.client('sagemaker-runtime', endpoint_url=url, region_name='us-east-1', aws_access_key_id='x', aws_secret_access_key='x')
        got = rt.invoke_endpoint(EndpointName='penguins', ContentType='text/csv', Accept='text/csv', Body=BUNDLED.read_bytes())
        # the very bytes the run's batch-inference job wrote for the same rows
        assert got['Body'].read() == (run_dir/'batch_inference/predictions/predictions-algo-1.csv').read_bytes()
        log.seek(0)
        assert f"model: package mlproj/1 (Approved), {out/'registry/mlproj/1/files/model.tar.gz'}" in log.read()


def test_deploy_refuses_a_rejected_package_and_an_altered_one(pipeline_run, tmp_path):
    from mlproj.registry import LocalRegistry
    _, run_dir = pipeline_run
    mlproj = mlproj_in(tmp_path/'outputs')             # a registry of its own, holding the same run's model
    assert mlproj('model', 'register', run_dir)[:2] == (0, 'mlproj/1 PendingManualApproval: registered\n')
    deploy = ('serve', 'deploy', '--backend', 'sagemaker', '--role', ROLE, '--bucket', BUCKET, '--model-package')
    code, out, err = mlproj(*deploy, 'mlproj/1')
    assert (code, out) == (2, '') and err == ('mlproj: error: model package mlproj/1 is PendingManualApproval, not Approved: it cannot be deployed '
                                              '(approve it with: mlproj model approve mlproj/1 -m WHY)\n')
    assert mlproj('model', 'reject', 'mlproj/1', '-m', 'not this one')[0] == 0
    for cmd in (deploy, ('serve', 'request', '--backend', 'sagemaker', '--role', ROLE, '--bucket', BUCKET, '--model-package'),
                ('transform', 'run', '--input', BUNDLED, '--model-package'), ('serve', '--port', '0', '--model-package')):
        code, out, err = mlproj(*cmd, 'mlproj/1')
        assert (code, out, err) == (2, '', 'mlproj: error: model package mlproj/1 is Rejected, not Approved: it cannot be deployed\n'), cmd
    assert mlproj('model', 'approve', 'mlproj/1', '-m', 'after all')[0] == 0
    f = LocalRegistry(tmp_path/'outputs'/'registry').files_dir('mlproj', 1)/'model.tar.gz'
    data = bytearray(f.read_bytes()); data[len(data) // 2] ^= 1; f.write_bytes(bytes(data))
    for cmd in (deploy, ('serve', '--port', '0', '--model-package'), ('transform', 'run', '--input', BUNDLED, '--model-package')):
        code, out, err = mlproj(*cmd, 'mlproj/latest-approved')
        assert (code, out) == (2, '') and err.count('\n') == 1, (cmd, err)
        assert err.startswith('mlproj: error: model package mlproj/1: file model.tar.gz was altered (sha256 '), (cmd, err)
    # one source of the model at a time
    from mlproj.cli import make_parser
    with pytest.raises(SystemExit) as e, contextlib.redirect_stderr(io.StringIO()) as err:
        make_parser().parse_args(['serve', '--model', str(f), '--model-package', 'mlproj/1'])
    assert e.value.code == 2 and 'argument --model-package: not allowed with argument --model' in err.getvalue()


def test_deploy_an_approved_package_to_sagemaker_on_moto(pipeline_run, moto_server, tmp_path):
    import boto3
    from mlproj.registry import LocalRegistry
    _, run_dir = pipeline_run
    mlproj = mlproj_in(tmp_path/'outputs')
    assert mlproj('model', 'register', run_dir)[0] == 0 and mlproj('model', 'approve', 'mlproj/1', '-m', 'ship it')[0] == 0
    code, out, err = mlproj('serve', 'deploy', '--backend', 'sagemaker', '--role', ROLE, '--bucket', BUCKET, '--endpoint-name', 'penguins-approved',
                            '--model-package', 'mlproj/latest-approved')
    assert code == 0, err
    assert 'model: package mlproj/1 (Approved)' in err
    res = json.loads(out)
    assert res['action'] == 'CreateEndpoint' and res['endpoint']['EndpointName'] == 'penguins-approved'
    sm, s3 = boto3.client('sagemaker'), boto3.client('s3')
    url = sm.describe_model(ModelName=res['requests']['CreateModel']['ModelName'])['PrimaryContainer']['ModelDataUrl']
    bucket, key = url[5:].split('/', 1)
    blob = s3.get_object(Bucket=bucket, Key=key)['Body'].read()
    with tarfile.open(fileobj=io.BytesIO(blob)) as t:
        assert sorted(t.getnames()) == ['code/inference.py', f'code/{WHEEL}', 'code/requirements.txt', 'model.tar.gz']
        served = t.extractfile('model.tar.gz').read()
    # what is deployed is the approved package's own model artifact, byte for byte
    assert served == (LocalRegistry(tmp_path/'outputs'/'registry').files_dir('mlproj', 1)/'model.tar.gz').read_bytes()


def test_a_registered_serving_package_deploys_as_it_is(pipeline_run, moto_server, tmp_path):
    "A package registered with its serving package (`register_run(..., serving=)`): serve and deploy use that file, unchanged."
    import boto3
    from mlproj.endpoint import package_model
    from mlproj.registry import LocalRegistry, register_run
    _, run_dir = pipeline_run
    reg = LocalRegistry(tmp_path/'outputs'/'registry')
    package_model(run_dir/'train'/'model', tmp_path/'serving'/'model.tar.gz')
    d = register_run(run_dir, 'served', 'Approved', reg, serving=tmp_path/'serving'/'model.tar.gz')
    registered = reg.files_dir('served', 1)/'serving.tar.gz'
    assert d['InferenceSpecification']['Containers'][0]['ModelDataUrl'] == registered.as_uri()
    mlproj = mlproj_in(tmp_path/'outputs')
    code, out, err = mlproj('serve', 'package', '--model-package', 'served/latest-approved')
    assert code == 0 and json.loads(out)['package'] == str(registered), err
    code, out, err = mlproj('serve', 'deploy', '--backend', 'sagemaker', '--role', ROLE, '--bucket', BUCKET, '--model-package', 'served/1')
    assert code == 0, err
    res = json.loads(out)
    assert res['requests']['CreateEndpoint']['EndpointName'] == 'mlproj-penguins'          # named from the artifact inside the package
    bucket, key = res['requests']['CreateModel']['PrimaryContainer']['ModelDataUrl'][5:].split('/', 1)
    assert boto3.client('s3').get_object(Bucket=bucket, Key=key)['Body'].read() == registered.read_bytes()
