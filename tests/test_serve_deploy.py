"""`mlproj serve request|deploy --backend sagemaker` against moto's SageMaker and S3 on loopback, never AWS."""
import io, json, tarfile
from pathlib import Path
import pytest
from mlproj import __version__
WHEEL = f'mlproj-{__version__}-py3-none-any.whl'   # the wheel of this checkout's version (settings.ini)

pytestmark = pytest.mark.usefixtures('loopback_only')     # fixtures loopback_only, moto_server, cli: tests/conftest.py
ROLE = 'arn:aws:iam::123456789012:role/mlproj-test'
BUCKET = 'mlproj-test-bucket'


def test_request_prints_three_valid_requests(moto_server, opt_ml_trained, cli):
    from mlproj.endpoint import validate_operation
    code, out, err = cli('serve', 'request', '--model', opt_ml_trained['model'], '--backend', 'sagemaker', '--role', ROLE, '--bucket', BUCKET,
                         '--no-wheel', '--endpoint-name', 'penguins', '--capture-uri', f's3://{BUCKET}/capture', '--sampling', 20)
    assert code == 0, err
    reqs = json.loads(out)
    assert list(reqs) == ['CreateModel', 'CreateEndpointConfig', 'CreateEndpoint']
    for op, r in reqs.items(): validate_operation(op, r)            # botocore's model of the API accepts each
    m = reqs['CreateModel']
    assert m['PrimaryContainer']['ModelDataUrl'].startswith(f's3://{BUCKET}/mlproj/models/') and m['ExecutionRoleArn'] == ROLE
    assert m['PrimaryContainer']['Environment']['SAGEMAKER_PROGRAM'] == 'inference.py'
    assert 'sagemaker-scikit-learn' in m['PrimaryContainer']['Image']
    dc = reqs['CreateEndpointConfig']['DataCaptureConfig']
    assert (dc['DestinationS3Uri'], dc['InitialSamplingPercentage']) == (f's3://{BUCKET}/capture', 20)
    assert reqs['CreateEndpoint']['EndpointName'] == 'penguins'


def test_deploy_uploads_the_package_and_creates_the_endpoint(moto_server, opt_ml_trained, cli):
    import boto3
    code, out, err = cli('serve', 'deploy', '--model', opt_ml_trained['model'], '--backend', 'sagemaker', '--role', ROLE, '--bucket', BUCKET,
                         '--endpoint-name', 'penguins-live')
    assert code == 0, err
    res = json.loads(out)
    assert res['action'] == 'CreateEndpoint' and res['endpoint']['EndpointName'] == 'penguins-live'
    sm, s3 = boto3.client('sagemaker'), boto3.client('s3')
    d = sm.describe_endpoint(EndpointName='penguins-live')
    assert d['EndpointConfigName'] == res['requests']['CreateEndpoint']['EndpointConfigName']
    model = sm.describe_model(ModelName=res['requests']['CreateModel']['ModelName'])
    url = model['PrimaryContainer']['ModelDataUrl']
    assert url == res['requests']['CreateModel']['PrimaryContainer']['ModelDataUrl']
    bucket, key = url[5:].split('/', 1)
    blob = s3.get_object(Bucket=bucket, Key=key)['Body'].read()
    with tarfile.open(fileobj=io.BytesIO(blob)) as t: names = sorted(t.getnames())
    assert names == ['code/inference.py', f'code/{WHEEL}', 'code/requirements.txt', 'model.tar.gz']


def test_deploy_needs_the_sagemaker_backend(moto_server, opt_ml_trained, cli):
    code, out, err = cli('serve', 'deploy', '--model', opt_ml_trained['model'], '--role', ROLE, '--bucket', BUCKET)
    assert code == 2 and err.strip().splitlines()[-1] == 'mlproj: error: serve deploy: give --backend sagemaker (a local endpoint is `mlproj serve`)'
