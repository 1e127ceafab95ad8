"""The SageMaker backend against a real S3 + SageMaker API server on loopback (moto), never AWS.

moto marks a processing job Completed at once and runs nothing; the tests then play the job locally from the
request moto stored, with inputs read from and outputs written to moto's S3."""
import contextlib, copy, io, json, logging, os, subprocess, sys, tarfile, zipfile
from pathlib import Path
import pytest

from conftest import MOTO_BUCKET as BUCKET, FAKE_KEY_ID, FAKE_SECRET   # the loopback server's bucket and fake credentials

ROLE = 'arn:aws:iam::123456789012:role/service-role/MlprojProcessing'
pytestmark = pytest.mark.usefixtures('loopback_only')     # fixtures loopback_only and moto_server: tests/conftest.py


def keys(prefix=''):
    import boto3
    r = boto3.client('s3').list_objects_v2(Bucket=BUCKET, Prefix=prefix)
    return sorted(o['Key'] for o in r.get('Contents', []))


def local_request(step, tmp_path, engine='notebook', instance_count=1, name=None, params=None, inputs=None):
    from mlproj.data import bundled_path
    from mlproj.jobs import step_job, render_request, write_code_bundle
    from mlproj.steps import get_step
    ins = inputs or {'raw': str(bundled_path())}
    outs = {ch: str(tmp_path/'out'/ch) for ch in get_step(step).outputs + (('report',) if engine == 'notebook' else ())}
    return render_request(step_job(step, ins, outs, params, instance_count=instance_count, engine=engine, name=name, role=ROLE,
                                   code=str(write_code_bundle(step, engine, tmp_path/'code'))))


@pytest.fixture(scope='module')
def submitted(moto_server, tmp_path_factory):
    "A preprocess notebook job submitted through the SDK, stock-image route (mlproj wheel only, no dependency wheels)."
    from mlproj.sagemaker_backend import run_sagemaker
    tmp = tmp_path_factory.mktemp('sm')
    req = local_request('preprocess', tmp, name='sm-preprocess-1', params={'seed': 7})
    captured, said = [], []
    printed, logged = io.StringIO(), io.StringIO()
    handler = logging.StreamHandler(logged)       # whatever the client side logs at the levels configured
    handler.addFilter(lambda r: not r.name.startswith(('werkzeug', 'moto')))    # not the server's own request log
    logging.getLogger().addHandler(handler)
    try:
        with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(printed):
            d = run_sagemaker(req, BUCKET, ROLE, prefix='team', dependencies=False, poll=0.05, say=said.append, capture=captured)
    finally:
        logging.getLogger().removeHandler(handler)
    return {'local': req, 'describe': d, 'captured': captured, 'said': said, 'printed': printed.getvalue(),
            'logged': logged.getvalue(), 'tmp': tmp}


def test_code_and_inputs_are_uploaded(submitted):
    ks = keys('team/sm-preprocess-1/')
    assert 'team/sm-preprocess-1/input/raw/penguins.csv' in ks
    assert 'team/sm-preprocess-1/code/entry.py' in ks and 'team/sm-preprocess-1/code/preprocess.ipynb' in ks
    assert any(k.startswith('team/sm-preprocess-1/code/wheels/mlproj-') and k.endswith('.whl') for k in ks)


def test_job_created_through_the_sdk_and_followed(submitted):
    d = submitted['describe']
    assert d['ProcessingJobName'] == 'sm-preprocess-1' and d['ProcessingJobStatus'] == 'Completed'
    assert len(submitted['captured']) == 1
    assert any('sm-preprocess-1: Completed' in m for m in submitted['said'])
    # no --image-uri: the stock scikit-learn processing image of the pinned version, in the session's region
    from mlproj.sagemaker_backend import stock_image_uri, DEFAULT_SKLEARN_VERSION
    image = d['AppSpecification']['ImageUri']
    assert image == stock_image_uri('us-east-1'), image
    assert '.dkr.ecr.us-east-1.amazonaws.com/sagemaker-scikit-learn:' in image and f':{DEFAULT_SKLEARN_VERSION}-' in image, image


def test_request_at_the_server_equals_the_local_request_but_uris_and_image(submitted):
    sent, local = copy.deepcopy(submitted['captured'][0]), copy.deepcopy(submitted['local'])
    for r in (sent, local):
        r['AppSpecification']['ImageUri'] = '<image>'
        for i in r['ProcessingInputs']: i['S3Input']['S3Uri'] = f"<{i['InputName']}>"
        for o in r['ProcessingOutputConfig']['Outputs']: o['S3Output']['S3Uri'] = f"<{o['OutputName']}>"
    assert sorted(sent) == sorted(local)
    for field in local: assert sent[field] == local[field], field
    # and what moto stored is what was sent
    d = submitted['describe']
    assert d['ProcessingInputs'] == submitted['captured'][0]['ProcessingInputs']
    assert d['AppSpecification'] == submitted['captured'][0]['AppSpecification']


def test_replay_locally_puts_outputs_in_moto_s3(submitted, tmp_path):
    from mlproj.local import run_local
    from mlproj.sagemaker_backend import describe_remote, download_outputs, aws_session
    stored = describe_remote('sm-preprocess-1', aws_session())
    req = {k: stored[k] for k in ('ProcessingJobName', 'ProcessingInputs', 'ProcessingOutputConfig', 'AppSpecification', 'RoleArn', 'StoppingCondition')}
    req['ProcessingResources'] = stored.get('ProcessingResources') or submitted['captured'][0]['ProcessingResources']
    d = run_local(req, jobs_dir=tmp_path/'jobs', stream=None)
    assert d['ProcessingJobStatus'] == 'Completed', d.get('FailureReason')
    out = keys('team/sm-preprocess-1/output/')
    assert 'team/sm-preprocess-1/output/train/train-algo-1.csv' in out and 'team/sm-preprocess-1/output/test/test-algo-1.csv' in out
    assert 'team/sm-preprocess-1/output/report/preprocess.html' in out
    # --download brings them back
    got = download_outputs(stored, {'train': str(tmp_path/'back/train')}, aws_session(), say=lambda m: None, root=tmp_path/'back')
    assert (tmp_path/'back/train/train-algo-1.csv').exists() and (tmp_path/'back/sm-preprocess-1/test/test-algo-1.csv').exists()
    assert set(got) == {'train', 'test', 'report'}


def test_three_instances_sharded_by_key(moto_server, tmp_path):
    from mlproj.sagemaker_backend import run_sagemaker
    rows = tmp_path/'rows'; rows.mkdir()
    for i in range(4): (rows/f'part-{i}.csv').write_text('penguin_id\n1\n')
    req = local_request('batch_inference', tmp_path, engine='script', instance_count=3, name='sm-bi-3',
                        inputs={'model': 's3://models-elsewhere/m/', 'data': str(rows)})
    captured = []
    d = run_sagemaker(req, BUCKET, ROLE, image_uri='123456789012.dkr.ecr.us-east-1.amazonaws.com/mlproj:1', poll=0.05,
                      say=lambda m: None, capture=captured)
    sent = captured[0]
    assert sent['ProcessingResources']['ClusterConfig']['InstanceCount'] == 3
    dist = {i['InputName']: (i['S3Input']['S3Uri'], i['S3Input']['S3DataDistributionType']) for i in sent['ProcessingInputs']}
    assert dist['data'] == ('s3://mlproj-test-bucket/mlproj/sm-bi-3/input/data/', 'ShardedByS3Key')
    assert dist['model'] == ('s3://models-elsewhere/m/', 'FullyReplicated')
    assert len(keys('mlproj/sm-bi-3/input/data/')) == 4
    # prebuilt image route: no wheels shipped
    assert not [k for k in keys('mlproj/sm-bi-3/code/') if '/wheels/' in k]
    assert d['ProcessingJobStatus'] == 'Completed'


def test_stop(moto_server, tmp_path):
    from mlproj.sagemaker_backend import run_sagemaker, stop_remote, aws_session
    req = local_request('preprocess', tmp_path, engine='script', name='sm-stop-1')
    run_sagemaker(req, BUCKET, ROLE, image_uri='img:1', wait=False, say=lambda m: None)
    assert stop_remote('sm-stop-1', aws_session())['ProcessingJobStatus'] == 'Stopped'


def test_failed_job_prints_reason_and_exit_message_and_exits_non_zero(moto_server, tmp_path, monkeypatch, capsys):
    "A job SageMaker fails: FailureReason and ExitMessage printed, non-zero exit (moto made to fail the job)."
    from moto.sagemaker import models
    real_init = models.FakeProcessingJob.__init__
    def failing(self, *a, **kw):
        real_init(self, *a, **kw)
        self.processing_job_status = 'Failed'
        self.failure_reason = 'AlgorithmError: see job logs'
        self.exit_message = "preprocess.ipynb cell 3: InputError: raw.csv row 7, column 'island': unknown category 'Atlantis'"
    monkeypatch.setattr(models.FakeProcessingJob, '__init__', failing)
    monkeypatch.setenv('MLPROJ_OUTPUTS', str(tmp_path/'outputs'))
    from mlproj.cli import main
    code = main(['job', 'run', 'preprocess', '--backend', 'sagemaker', '--role', ROLE, '--bucket', BUCKET, '--image-uri', 'img:1',
                 '--engine', 'script', '--name', 'sm-fail-1'])
    err = capsys.readouterr().err
    assert code == 1
    assert 'FailureReason: AlgorithmError: see job logs' in err
    assert "ExitMessage: preprocess.ipynb cell 3: InputError: raw.csv row 7, column 'island': unknown category 'Atlantis'" in err
    assert main(['job', 'show', 'sm-fail-1', '--backend', 'sagemaker']) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown['ProcessingJobStatus'] == 'Failed' and shown['FailureReason'] == 'AlgorithmError: see job logs'


def test_job_request_for_sagemaker_prints_the_remote_request(moto_server, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv('MLPROJ_OUTPUTS', str(tmp_path/'outputs'))
    from mlproj.cli import main
    assert main(['job', 'request', 'batch_inference', '--backend', 'sagemaker', '--role', ROLE, '--bucket', BUCKET,
                 '--input', 'model=s3://m/model/', '--input', 'data=s3://d/rows/', '--instance-count', '2', '--name', 'req-1']) == 0
    req = json.loads(capsys.readouterr().out)
    assert req['RoleArn'] == ROLE and 'sagemaker-scikit-learn' in req['AppSpecification']['ImageUri']
    assert {i['InputName']: i['S3Input']['S3Uri'] for i in req['ProcessingInputs']} == {
        'model': 's3://m/model/', 'data': 's3://d/rows/', 'code': 's3://mlproj-test-bucket/mlproj/req-1/code/'}
    assert not keys('mlproj/req-1/')          # printing a request uploads nothing


@pytest.mark.parametrize('args,message', [
    (['--bucket', BUCKET], '--role is required'),
    (['--role', ROLE], '--bucket is required'),
    (['--role', ROLE, '--bucket', 'no-such-bucket-here'], 'AWS HeadBucket'),
])
def test_missing_role_or_bucket_is_one_line(moto_server, tmp_path, monkeypatch, capsys, args, message):
    monkeypatch.setenv('MLPROJ_OUTPUTS', str(tmp_path/'outputs'))
    from mlproj.cli import main
    code = main(['job', 'run', 'preprocess', '--backend', 'sagemaker', '--image-uri', 'img:1', '--engine', 'script', *args])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.strip().count('\n') == 0, err


def test_missing_credentials_is_one_line(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith('AWS_')}
    env.update({'AWS_CONFIG_FILE': '/dev/null', 'AWS_SHARED_CREDENTIALS_FILE': '/dev/null', 'AWS_EC2_METADATA_DISABLED': 'true',
                'MLPROJ_OUTPUTS': str(tmp_path), 'HTTP_PROXY': 'http://127.0.0.1:9', 'HTTPS_PROXY': 'http://127.0.0.1:9', 'NO_PROXY': '127.0.0.1,localhost'})
    r = subprocess.run([str(Path(sys.executable).parent/'mlproj'), 'job', 'run', 'preprocess', '--backend', 'sagemaker', '--role', ROLE,
                        '--bucket', BUCKET, '--region', 'us-east-1', '--engine', 'script'], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip() == 'mlproj: error: no AWS credentials found: set AWS_PROFILE, or AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or run where an instance role is available'


def _texts_of(path: Path):
    "The bytes of a file, and of each member when it is a zip (wheel) or tar archive, whose compression would hide a string."
    yield path, path.read_bytes()
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            for n in z.namelist(): yield f'{path}!{n}', z.read(n)
    elif tarfile.is_tarfile(path):
        with tarfile.open(path) as t:
            for m in t.getmembers():
                if m.isfile(): yield f'{path}!{m.name}', t.extractfile(m).read()


def test_secrets_never_reach_output_or_artifacts(submitted, moto_server, tmp_path):
    "The credentials' values appear nowhere: not said, printed or logged, not in the request or describe result, not in any file written or uploaded."
    assert os.environ['AWS_SECRET_ACCESS_KEY'] == FAKE_SECRET and os.environ['AWS_ACCESS_KEY_ID'] == FAKE_KEY_ID   # the job ran with them
    said = '\n'.join(submitted['said']) + submitted['printed'] + submitted['logged']
    assert submitted['said'] and 'sm-preprocess-1' in said          # something was said, so the search below means something
    blob = json.dumps(submitted['describe'], default=str) + json.dumps(submitted['captured'], default=str)
    files = [f for root in (submitted['tmp'], Path(os.environ['MLPROJ_OUTPUTS'])) for f in Path(root).rglob('*') if f.is_file()]
    assert any(f.name == 'entry.py' for f in files)                 # the code bundle is among them
    import boto3
    s3 = boto3.client('s3')
    uploaded = [(f'{BUCKET}/{k}', s3.get_object(Bucket=BUCKET, Key=k)['Body'].read()) for k in keys('team/sm-preprocess-1/')]
    assert any(k.endswith('.whl') for k, _ in uploaded)
    for k, b in uploaded:                     # uploaded objects, wheels opened
        (tmp_path/'s3'/k).parent.mkdir(parents=True, exist_ok=True); (tmp_path/'s3'/k).write_bytes(b)
    files += [f for f in (tmp_path/'s3').rglob('*') if f.is_file()]
    for value in (FAKE_KEY_ID, FAKE_SECRET):
        assert value not in said, f'{value} was said or printed'
        assert value not in blob, f'{value} is in the request or the describe result'
        for where, data in (x for f in files for x in _texts_of(f)):
            assert value.encode() not in data, f'{value} written to {where}'


def test_local_path_never_imports_the_sdk(tmp_path):
    "Building every step's local job request (both engines) and running a local job never import the SageMaker SDK."
    code = f"""
import sys, os
os.environ['MLPROJ_OUTPUTS'] = {str(tmp_path/'outputs')!r}
import mlproj.cli, mlproj.local, mlproj.pipeline, mlproj.runner, mlproj.steps, mlproj.jobs, mlproj.scripts
import mlproj.scripts.preprocess, mlproj.scripts.train, mlproj.scripts.evaluate, mlproj.scripts.batch_inference
from mlproj.data import bundled_path
from mlproj.jobs import step_job, render_request
from mlproj.local import run_local
from mlproj.steps import STEPS
t = {str(tmp_path)!r}
n = 0
for step, st in STEPS.items():
    for engine in ('script', 'notebook'):
        outs = {{ch: f'{{t}}/out/{{step}}/{{ch}}' for ch in st.outputs + (('report',) if engine == 'notebook' else ())}}
        req = render_request(step_job(step, {{ch: f'{{t}}/in/{{ch}}' for ch in st.inputs}}, outs, engine=engine))
        assert req['ProcessingJobName'] and req['AppSpecification']['ContainerArguments'], req
        n += 1
req = render_request(step_job('preprocess', {{'raw': str(bundled_path())}}, {{'train': f'{{t}}/pp/train', 'test': f'{{t}}/pp/test'}}, engine='script'))
d = run_local(req, jobs_dir=f'{{t}}/jobs', stream=None)
assert d['ProcessingJobStatus'] == 'Completed', d
assert os.path.exists(f'{{t}}/pp/train/train-algo-1.csv')
bad = sorted(m for m in sys.modules if m == 'sagemaker' or m.startswith('sagemaker.'))
print('REQUESTS', n)
print('SDK MODULES', bad)
"""
    r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    from mlproj.steps import STEPS
    assert f'REQUESTS {2 * len(STEPS)}' in r.stdout, r.stdout          # every step, both engines
    assert 'SDK MODULES []' in r.stdout, r.stdout.splitlines()[-1][:500]     # the last line: the SDK modules imported


# --- the storage layer against S3 (mlproj.storage) -------------------------------------

def test_one_object_prefix_is_that_object_everywhere(moto_server, tmp_path):
    "An S3 'prefix' that is exactly one object's key: listed, staged by the local executor and downloaded by the backend alike."
    import boto3
    from mlproj import storage
    s3 = boto3.client('s3')
    s3.put_object(Bucket=BUCKET, Key='one/rows.csv', Body=b'a,b\n1,2\n')
    s3.put_object(Bucket=BUCKET, Key='one/rows.csv.bak', Body=b'old')          # shares the prefix
    s3.put_object(Bucket=BUCKET, Key='many/part-1.csv', Body=b'1'); s3.put_object(Bucket=BUCKET, Key='many/sub/part-2.csv', Body=b'2')
    s3.put_object(Bucket=BUCKET, Key='many/', Body=b'')                          # a console folder marker
    # listing: the exact key lands under its own name, like a local file
    assert [r for r, _ in storage.list_objects(f's3://{BUCKET}/one/rows.csv')] == ['rows.csv', 'rows.csv.bak']
    assert [r for r, _ in storage.list_objects(f's3://{BUCKET}/many/')] == ['part-1.csv', 'sub/part-2.csv']
    # download (the SageMaker backend's --download) and staging (the local executor) use that same listing
    assert storage.download(f's3://{BUCKET}/one/rows.csv', tmp_path/'dl', s3) == ['rows.csv', 'rows.csv.bak']
    assert (tmp_path/'dl/rows.csv').read_bytes() == b'a,b\n1,2\n'
    from mlproj.jobs import JobSpec, JobInput, render_request
    from mlproj.local import prepare_sandbox, stage_inputs
    req = render_request(JobSpec('stage-one', ['python3', '-c', 'pass'], inputs=[JobInput('data', f's3://{BUCKET}/many/')]))
    roots = prepare_sandbox(req, tmp_path/'jobs/stage-one')
    stage_inputs(req, roots, say=lambda m: None)
    staged = roots[0]/'processing/input/data'
    assert sorted(p.relative_to(staged).as_posix() for p in staged.rglob('*') if p.is_file()) == ['part-1.csv', 'sub/part-2.csv']
    # upload and digest through the same handler
    (tmp_path/'up').mkdir(); (tmp_path/'up/x.txt').write_text('x')
    assert storage.upload(tmp_path/'up', f's3://{BUCKET}/up/', s3) == ['x.txt']
    import hashlib
    assert storage.digests(f's3://{BUCKET}/up/', s3) == {'x.txt': hashlib.sha256(b'x').hexdigest()}
    assert storage.digests(f's3://{BUCKET}/nothing-here/', s3) == {}
