"""The pipeline exports: written with no credentials and nothing reached, checked by the field's own validators
(botocore's service model, asl-validator, cfn-lint) — each shown to fail on a broken copy — equal to what
`mlproj job request` prints for every step, and deployed, started and shown against moto's server on loopback."""
import contextlib, copy, io, json, os, socket, subprocess, sys
from pathlib import Path
import pytest

from conftest import MOTO_BUCKET, FAKE_KEY_ID
from mlproj.pipeline import PIPELINE

REPO = Path(__file__).resolve().parents[1]
ROLE = 'arn:aws:iam::123456789012:role/r'
SFN_ROLE = 'arn:aws:iam::123456789012:role/sfn'
ASL_VALIDATOR = REPO/'node_modules/.bin/asl-validator'
pytestmark = pytest.mark.usefixtures('loopback_only')


def cli(*argv) -> tuple[int, str, str]:
    "(exit code, stdout, stderr) of `mlproj *argv`, in this process."
    from mlproj.cli import main
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err): code = main(list(argv))
    return code, out.getvalue(), err.getvalue()


@pytest.fixture
def no_aws(monkeypatch):
    "No credentials anywhere, a region set, and no socket may connect at all (not even loopback)."
    for k in list(os.environ):
        if k.startswith('AWS_'): monkeypatch.delenv(k)
    monkeypatch.setenv('AWS_CONFIG_FILE', '/dev/null'); monkeypatch.setenv('AWS_SHARED_CREDENTIALS_FILE', '/dev/null')
    monkeypatch.setenv('AWS_EC2_METADATA_DISABLED', 'true'); monkeypatch.setenv('AWS_DEFAULT_REGION', 'us-east-1')
    attempts = []
    def refuse(self, address):
        attempts.append(address); raise ConnectionRefusedError(f'export tried to reach {address}')
    monkeypatch.setattr(socket.socket, 'connect', refuse)
    yield
    assert not attempts, f'export reached out: {attempts}'


@pytest.fixture(scope='module')
def exported(tmp_path_factory):
    "The three formats, written by `mlproj pipeline export` (region only, stock image)."
    d = tmp_path_factory.mktemp('export')
    out = {}
    for fmt in ('sagemaker', 'stepfunctions', 'cloudformation'):
        code, _, err = cli('pipeline', 'export', '--format', fmt, '--bucket', 'bkt', '--role', ROLE, '--region', 'us-east-1', '-o', str(d/f'{fmt}.json'))
        assert code == 0, err
        out[fmt] = d/f'{fmt}.json'
    return out


def load(p): return json.loads(Path(p).read_text())


# --- export needs no credentials and reaches nothing -------------------------------------------------------------

@pytest.mark.parametrize('fmt', ['sagemaker', 'stepfunctions', 'cloudformation'])
def test_export_with_no_credentials_reaches_nothing_and_uploads_nothing(fmt, no_aws, tmp_path):
    outputs = Path(os.environ['MLPROJ_OUTPUTS'])
    before = sorted(outputs.rglob('*'))
    code, out, err = cli('pipeline', 'export', '--format', fmt, '--bucket', 'bkt', '--role', ROLE, '--region', 'us-east-1')
    assert code == 0, err
    doc = json.loads(out)
    assert {'sagemaker': 'Steps', 'stepfunctions': 'States', 'cloudformation': 'Resources'}[fmt] in doc
    assert sorted(outputs.rglob('*')) == before                  # nothing written, not even a code bundle


def test_export_refuses_in_one_line(no_aws, monkeypatch):
    code, out, err = cli('pipeline', 'export', '--format', 'sagemaker', '--bucket', 'bkt', '--role', ROLE, '--region', 'us-east-1', '--input', 'raw=/tmp/rows')
    assert code == 2 and out == '' and err.strip() == 'mlproj: error: --input raw=/tmp/rows: an exported pipeline reads its inputs from S3; give an s3:// URI'
    monkeypatch.delenv('AWS_DEFAULT_REGION')
    code, _, err = cli('pipeline', 'export', '--format', 'sagemaker', '--bucket', 'bkt', '--role', ROLE)   # no region, no image
    assert code == 2 and 'no AWS region' in err, err


def test_export_writes_a_file_whole(exported, tmp_path):
    code, _, err = cli('pipeline', 'export', '--format', 'sagemaker', '--bucket', 'bkt', '--role', ROLE, '--image-uri', 'img:1', '-o', str(tmp_path/'d.json'))
    assert code == 0 and 'wrote sagemaker definition' in err
    assert [p.name for p in tmp_path.iterdir()] == ['d.json']    # no temp file left beside it
    assert load(tmp_path/'d.json')['Version'] == '2020-12-01'


# --- validators --------------------------------------------------------------------------------------------------

def botocore_check(args: dict):
    "botocore's own validation of a CreateProcessingJob request (raises ParamValidationError)."
    import botocore.session
    from botocore.validate import validate_parameters
    shape = botocore.session.get_session().get_service_model('sagemaker').operation_model('CreateProcessingJob').input_shape
    validate_parameters(args, shape)


def test_sagemaker_steps_are_valid_create_processing_job_requests(exported):
    from mlproj.export import processing_steps, resolve_sagemaker
    from mlproj.jobs import validate_request
    defn = load(exported['sagemaker'])
    steps = processing_steps(resolve_sagemaker(defn))          # Get references replaced by sample URIs and defaults
    assert list(steps) == list(PIPELINE.steps)
    for name, args in steps.items():
        req = {'ProcessingJobName': f'check-{name}'.replace('_', '-'), **args}
        botocore_check(req)
        validate_request(req, local_uris=False)                 # patterns and enums too, which botocore leaves to the service
    # the check fails on a broken definition
    bad = copy.deepcopy(defn)
    bad['Steps'][1]['Arguments']['ProcessingResources']['ClusterConfig']['InstanceCount'] = 'one'
    from botocore.exceptions import ParamValidationError
    with pytest.raises(ParamValidationError, match='InstanceCount'):
        botocore_check({'ProcessingJobName': 'x', **processing_steps(resolve_sagemaker(bad))['train']})


def asl_validate(path) -> subprocess.CompletedProcess:
    assert ASL_VALIDATOR.exists(), f'{ASL_VALIDATOR} is missing: run `make install-dev` (npm ci installs asl-validator from package-lock.json)'
    return subprocess.run([str(ASL_VALIDATOR), '--json-path', str(path)], capture_output=True, text=True, timeout=120)


def test_state_machine_passes_asl_validator(exported, tmp_path):
    r = asl_validate(exported['stepfunctions'])
    assert r.returncode == 0, r.stdout + r.stderr
    bad = load(exported['stepfunctions'])
    bad['States']['train']['Next'] = 'Nowhere'
    (tmp_path/'bad.json').write_text(json.dumps(bad))
    r = asl_validate(tmp_path/'bad.json')
    assert r.returncode != 0 and 'MISSING_TRANSITION_TARGET' in r.stdout + r.stderr, r.stdout + r.stderr
    bad = load(exported['stepfunctions'])                       # an intrinsic function asl-validator cannot read
    bad['States']['train']['Parameters']['ProcessingJobName.$'] = "States.Format('x-{}', $$.Execution.Name"
    (tmp_path/'bad2.json').write_text(json.dumps(bad))
    r = asl_validate(tmp_path/'bad2.json')
    assert r.returncode != 0 and 'ProcessingJobName.$' in r.stdout + r.stderr, r.stdout + r.stderr    # refused for that field, not a crash


def test_state_machine_tasks_are_valid_create_processing_job_requests(exported):
    from mlproj.export import resolve_stepfunctions, stepfunctions_state, SFN_SYNC
    defn = load(exported['stepfunctions'])
    st = stepfunctions_state(defn)
    tasks = {n: s for n, s in defn['States'].items() if s.get('Resource') == SFN_SYNC}
    assert list(tasks) == list(PIPELINE.steps)
    for name, s in tasks.items(): botocore_check(resolve_stepfunctions(s['Parameters'], st, {'Execution': {'Name': 'e-1'}}))


def cfn_lint(path) -> subprocess.CompletedProcess:
    return subprocess.run([str(Path(sys.executable).parent/'cfn-lint'), str(path)], capture_output=True, text=True, timeout=300)


def test_cloudformation_template_passes_cfn_lint(exported, tmp_path):
    r = cfn_lint(exported['cloudformation'])
    assert r.returncode == 0, r.stdout + r.stderr
    t = load(exported['cloudformation'])
    # the state machine inside it is the exported one, and passes asl-validator too
    sm = t['Resources']['StateMachine']['Properties']['Definition']
    (tmp_path/'sm.json').write_text(json.dumps(sm))
    assert asl_validate(tmp_path/'sm.json').returncode == 0
    assert json.loads(json.dumps(sm).replace('${ProcessingRoleArn}', ROLE)) == load(exported['stepfunctions'])
    body = t['Resources']['SageMakerPipeline']['Properties']['PipelineDefinition']['PipelineDefinitionBody']['Fn::Sub']
    assert json.loads(body.replace('${ProcessingRoleArn}', ROLE)) == load(exported['sagemaker'])
    # cfn-lint fails on a broken template: a state type that does not exist, a role that is not an ARN
    bad = copy.deepcopy(t); bad['Resources']['StateMachine']['Properties']['Definition']['States']['train']['Type'] = 'Taskk'
    (tmp_path/'bad.json').write_text(json.dumps(bad))
    r = cfn_lint(tmp_path/'bad.json')
    assert r.returncode != 0 and 'E3601' in r.stdout, r.stdout
    bad = copy.deepcopy(t); bad['Resources']['SageMakerPipeline']['Properties']['RoleArn'] = 'admin'
    (tmp_path/'bad2.json').write_text(json.dumps(bad))
    r = cfn_lint(tmp_path/'bad2.json')
    assert r.returncode != 0 and 'E3031' in r.stdout and "'admin'" in r.stdout, r.stdout + r.stderr                 # the role ARN's pattern


def test_gate_and_parameters_serialise_as_the_sdk_does(exported, no_aws):
    "The parts of the SageMaker definition no validator covers, against the SDK's own workflow classes (offline: region only)."
    from sagemaker.core.workflow.parameters import ParameterInteger, ParameterFloat, ParameterString
    from sagemaker.core.workflow.properties import PropertyFile
    from sagemaker.core.workflow.functions import JsonGet, Join
    from sagemaker.core.workflow.conditions import ConditionGreaterThanOrEqualTo
    from sagemaker.mlops.workflow.fail_step import FailStep
    from sagemaker.mlops.workflow.condition_step import ConditionStep
    from sagemaker.mlops.workflow.pipeline import Pipeline
    from mlproj.export import message_parts, PROPERTY_FILE, GATE_STEP, FAIL_STEP
    from mlproj.pipeline import PIPELINE
    ours = load(exported['sagemaker'])
    kinds = {'Integer': ParameterInteger, 'Float': ParameterFloat, 'String': ParameterString}
    params = [kinds[q['Type']](name=q['Name'], default_value=q['DefaultValue']) for q in ours['Parameters']]
    g = PIPELINE.gate
    pf = PropertyFile(name=PROPERTY_FILE, output_name=g.channel, path=g.file)
    metric = JsonGet(step_name=g.step, property_file=pf, json_path=g.metric)
    threshold = next(q for q in params if q.name == 'GateThreshold')
    pre, mid, post = message_parts()
    fail = FailStep(name=FAIL_STEP, error_message=Join(on='', values=[pre, metric, mid, threshold, post]))
    cond = ConditionStep(name=GATE_STEP, conditions=[ConditionGreaterThanOrEqualTo(left=metric, right=threshold)], if_steps=[], else_steps=[fail])
    stand_in = FailStep(name=g.step, error_message='stand-in for the evaluate step')   # the SDK checks the referenced step exists
    sdk = json.loads(Pipeline(name='mlproj', parameters=params, steps=[stand_in, cond]).definition())
    for k in ('Version', 'Metadata', 'Parameters', 'PipelineExperimentConfig'): assert ours[k] == sdk[k], k
    mine, theirs = ours['Steps'][-1]['Arguments'], sdk['Steps'][-1]['Arguments']
    assert mine['Conditions'] == theirs['Conditions']
    assert mine['ElseSteps'] == theirs['ElseSteps']
    assert next(s for s in ours['Steps'] if s['Name'] == g.step)['PropertyFiles'] == [pf.expr]


# --- parity: each exported step is the request `mlproj job request` prints --------------------------------------

def sample_values():
    "Values of every pipeline parameter other than their defaults ({'group.name': value})."
    from mlproj.pipeline import PIPELINE
    from mlproj.export import LOCAL_ONLY
    vals = {f'input.{ch}': f's3://data-bkt/{ch}/' for ch in PIPELINE.inputs}
    for k, q in PIPELINE.parameters().items():
        name = k.partition('.')[2]
        if k in LOCAL_ONLY: continue                                   # champion/challenger: not exported
        if k == 'register.approval_status': vals[k] = 'Approved'
        elif name == 'instance_type': vals[k] = 'ml.c5.2xlarge'
        elif name == 'instance_count': vals[k] = 2
        elif q.type is bool: vals[k] = not q.default
        elif q.type is int: vals[k] = q.default + 1
        elif q.type is float: vals[k] = round(q.default * 1.25, 6)
        else: vals[k] = 'island'
    return vals


def masked(req: dict) -> dict:
    "A request without what may differ: job name, image, S3 URIs."
    r = copy.deepcopy(req)
    r.pop('ProcessingJobName', None)
    r['AppSpecification']['ImageUri'] = '<image>'
    for i in r['ProcessingInputs']: i['S3Input']['S3Uri'] = f"<{i['InputName']}>"
    for o in r.get('ProcessingOutputConfig', {}).get('Outputs', []): o['S3Output']['S3Uri'] = f"<{o['OutputName']}>"
    return r


@pytest.mark.parametrize('engine', ['notebook', 'script'])
def test_every_exported_step_equals_the_cli_request(engine, tmp_path):
    from mlproj.export import processing_steps, resolve_sagemaker, resolve_stepfunctions, stepfunctions_state, SFN_SYNC
    from mlproj.pipeline import PIPELINE
    from mlproj.steps import STEPS, step_sources
    flags = ['--bucket', 'bkt', '--role', ROLE, '--region', 'us-east-1', '--engine', engine]
    defs = {}
    for fmt in ('sagemaker', 'stepfunctions'):
        code, _, err = cli('pipeline', 'export', '--format', fmt, *flags, '-o', str(tmp_path/f'{fmt}.json'))
        assert code == 0, err
        defs[fmt] = load(tmp_path/f'{fmt}.json')
    from mlproj.export import execution_values
    vals = sample_values()
    given = execution_values({k: str(v) for k, v in vals.items()})     # what `mlproj pipeline start -p` would send
    sm = processing_steps(resolve_sagemaker(defs['sagemaker'], given, execution='e-1'))
    st = stepfunctions_state(defs['stepfunctions'], given)
    sfn = {n: resolve_stepfunctions(s['Parameters'], st, {'Execution': {'Name': 'e-1'}})
           for n, s in defs['stepfunctions']['States'].items() if s.get('Resource') == SFN_SYNC}
    assert list(sm) == list(sfn) == list(PIPELINE.steps)
    for step in PIPELINE.steps:
        argv = ['job', 'request', step, '--backend', 'sagemaker', *flags, '--instance-type', vals[f'{step}.instance_type']]
        argv += [a for ch in step_sources(step) for a in ('--input', f'{ch}=s3://bkt/x/{ch}/')]
        argv += [a for n in STEPS[step].params if f'{step}.{n}' in vals for a in ('-p', f'{n}={vals[f"{step}.{n}"]}')]
        if f'{step}.instance_count' in vals: argv += ['--instance-count', str(vals[f'{step}.instance_count'])]
        code, out, err = cli(*argv)
        assert code == 0, err
        want = masked(json.loads(out))
        for engine_name, got in (('sagemaker', sm[step]), ('stepfunctions', sfn[step])):
            got = masked(got)
            assert sorted(got) == sorted(want), (engine_name, step)
            for field in want: assert got[field] == want[field], (engine_name, step, field)
        # the parameters really flow: a value other than the default is in the exported arguments
        for n in STEPS[step].params:
            if f'{step}.{n}' in vals: assert any(a.endswith(str(vals[f'{step}.{n}'])) for a in sm[step]['AppSpecification']['ContainerArguments']), (step, n)
    # step-to-step locations: each input is where its producer wrote, in both engines
    for step in PIPELINE.steps:
        for ch, src in step_sources(step).items():
            for got in (sm, sfn):
                uri = next(i['S3Input']['S3Uri'] for i in got[step]['ProcessingInputs'] if i['InputName'] == ch)
                if src == 'bundled': assert uri == vals[f'input.{ch}']
                else: assert uri == next(o['S3Output']['S3Uri'] for o in got[src[0]]['ProcessingOutputConfig']['Outputs'] if o['OutputName'] == src[1])
    assert 'e-1' in sm['train']['ProcessingInputs'][0]['S3Input']['S3Uri'] and 'e-1' in sfn['train']['ProcessingInputs'][0]['S3Input']['S3Uri']


def create_model_package_check(args: dict):
    "botocore's own validation of a CreateModelPackage request (raises ParamValidationError)."
    import botocore.session
    from botocore.validate import validate_parameters
    validate_parameters(args, botocore.session.get_session().get_service_model('sagemaker').operation_model('CreateModelPackage').input_shape)


def test_register_step_is_the_same_create_model_package_in_both_engines(exported, tmp_path):
    """The register step: inside the gate's IfSteps / after the Choice's pass branch, a valid CreateModelPackage request whose files are the
    train and evaluate steps' outputs in the same execution, equal in both engines, its parameters flowing; CloudFormation creates the group."""
    from mlproj.export import (processing_steps, resolve_sagemaker, resolve_stepfunctions, stepfunctions_state, execution_values,
                               SM_REGISTER, SFN_CREATE_MODEL_PACKAGE, GATE_STEP, GATE_STATE)
    from botocore.exceptions import ParamValidationError
    sm_def, sfn_def = load(exported['sagemaker']), load(exported['stepfunctions'])
    cond = next(s for s in sm_def['Steps'] if s['Name'] == GATE_STEP)
    assert [s['Name'] for s in cond['Arguments']['IfSteps'] if s['Type'] == SM_REGISTER] == ['register']
    assert sfn_def['States'][GATE_STATE]['Choices'][0]['Next'] == 'register' and sfn_def['States']['register']['Resource'] == SFN_CREATE_MODEL_PACKAGE
    given = execution_values({'register.group': 'penguins', 'register.approval_status': 'Approved', 'train.seed': '7'})
    sm = resolve_sagemaker(sm_def, given, execution='e-1')
    reg = processing_steps(sm, SM_REGISTER)['register']
    st = stepfunctions_state(sfn_def, given)
    sfn = resolve_stepfunctions(sfn_def['States']['register']['Parameters'], st, {'Execution': {'Name': 'e-1'}})
    assert sfn == reg
    create_model_package_check(reg)
    assert (reg['ModelPackageGroupName'], reg['ModelApprovalStatus']) == ('penguins', 'Approved')
    jobs = processing_steps(sm)
    out = lambda step, ch: next(o['S3Output']['S3Uri'] for o in jobs[step]['ProcessingOutputConfig']['Outputs'] if o['OutputName'] == ch)
    g = PIPELINE.gate
    assert reg['ModelMetrics']['ModelQuality']['Statistics']['S3Uri'] == out(g.step, g.channel) + g.file
    assert reg['InferenceSpecification']['Containers'][0]['ModelDataUrl'] == out('train', 'model') + 'model.tar.gz'
    assert reg['InferenceSpecification']['Containers'][0]['Image'] == jobs['train']['AppSpecification']['ImageUri']
    # the check fails on a broken request
    bad = copy.deepcopy(reg); bad['ModelMetrics']['ModelQuality']['Statistics'] = {'S3Uri': 3}
    with pytest.raises(ParamValidationError, match='S3Uri'): create_model_package_check(bad)
    # CloudFormation: the group the executions register into, checked by cfn-lint (with a broken name refused)
    t = load(exported['cloudformation'])
    assert t['Resources']['ModelPackageGroup']['Type'] == 'AWS::SageMaker::ModelPackageGroup'
    assert t['Resources']['ModelPackageGroup']['Properties']['ModelPackageGroupName'] == next(q['DefaultValue'] for q in sm_def['Parameters'] if q['Name'] == 'RegisterGroup')
    bad = copy.deepcopy(t); bad['Resources']['ModelPackageGroup']['Properties']['ModelPackageGroupName'] = 'no spaces allowed'
    (tmp_path/'bad.json').write_text(json.dumps(bad))
    r = cfn_lint(tmp_path/'bad.json')
    assert r.returncode != 0 and "E3031 'no spaces allowed'" in r.stdout, r.stdout


def test_champion_challenger_is_local_only(no_aws):
    code, out, err = cli('pipeline', 'start', '--backend', 'sagemaker', '-p', 'gate.against=approved')
    assert (code, out) == (2, '') and err.strip() == 'mlproj: error: -p gate.against: champion/challenger runs only in `mlproj run`: a SageMaker Pipelines Condition cannot look up the Model Registry', err


def test_gate_message_is_the_local_one(exported):
    from mlproj.export import resolve_sagemaker, resolve_stepfunctions, stepfunctions_state, _intrinsic, READ_METRIC, FAIL_STEP, GATE_STATE
    from mlproj.pipeline import PIPELINE
    g = PIPELINE.gate
    sm = resolve_sagemaker(load(exported['sagemaker']), {'GateThreshold': 0.95}, metric=0.5)
    assert sm['Steps'][-1]['Arguments']['ElseSteps'][0]['Arguments']['ErrorMessage'] == g.message(0.5, 0.95)
    defn = load(exported['stepfunctions'])
    st = stepfunctions_state(defn, {'GateThreshold': 0.95})
    doc = {'multiclass_classification_metrics': {'accuracy': {'value': 0.5}}}
    st['gate'] = resolve_stepfunctions(defn['States'][READ_METRIC]['ResultSelector'], {'Body': json.dumps(doc)}, {})
    assert _intrinsic(defn['States'][FAIL_STEP]['CausePath'], st, {}) == g.message(0.5, 0.95)
    choice = defn['States'][GATE_STATE]['Choices'][0]
    assert _intrinsic(choice['Variable'], st, {}) == 0.5 and choice['NumericGreaterThanEqualsPath'] == '$.p.GateThreshold'


# --- upsert, start, show against moto on loopback ----------------------------------------------------------------

def keys(prefix=''):
    import boto3
    r = boto3.client('s3').list_objects_v2(Bucket=MOTO_BUCKET, Prefix=prefix)
    return sorted(o['Key'] for o in r.get('Contents', []))


def test_upsert_start_show_sagemaker(moto_server):
    import boto3
    from mlproj.export import Target, s3_layout, sagemaker_definition
    flags = ['--bucket', MOTO_BUCKET, '--role', ROLE, '--image-uri', 'img:1', '--prefix', 'team']
    sm = boto3.client('sagemaker')
    if any(x['PipelineName'] == 'mlproj' for x in sm.list_pipelines()['PipelineSummaries']):   # another test of this module's server upserted it
        sm.delete_pipeline(PipelineName='mlproj')
    code, _, err = cli('pipeline', 'upsert', '--backend', 'sagemaker', *flags)
    assert code == 0, err
    assert 'created arn:aws:sagemaker:us-east-1:' in err
    lay = s3_layout(Target(MOTO_BUCKET, ROLE, 'img:1', 'team'))
    code_prefix = lay['code'].split(MOTO_BUCKET + '/', 1)[1]
    assert {'entry.py', 'preprocess.ipynb', 'train.ipynb', 'evaluate.ipynb', 'batch_inference.ipynb', 'mlproj-source.sha256'} <= {k[len(code_prefix):] for k in keys(code_prefix)}
    assert not any('/wheels/' in k for k in keys('team/'))            # a prebuilt image: no wheels
    assert code_prefix + 'serving/sourcedir.tar.gz' in keys(code_prefix)  # the serving code: its requirements name mlproj's version (tested with the stock image)
    assert keys('team/mlproj/input/raw/') == ['team/mlproj/input/raw/penguins.csv']
    sm = boto3.client('sagemaker')
    stored = json.loads(sm.describe_pipeline(PipelineName='mlproj')['PipelineDefinition'])
    assert stored == sagemaker_definition(Target(MOTO_BUCKET, ROLE, 'img:1', 'team'))
    # again: updated, not created twice
    code, _, err = cli('pipeline', 'upsert', '--backend', 'sagemaker', *flags, '--input', 'data=s3://elsewhere/rows/')
    assert code == 0 and 'updated arn:aws:sagemaker' in err, err
    stored = json.loads(sm.describe_pipeline(PipelineName='mlproj')['PipelineDefinition'])
    assert next(q for q in stored['Parameters'] if q['Name'] == 'InputData')['DefaultValue'] == 's3://elsewhere/rows/'
    code, out, err = cli('pipeline', 'start', '--backend', 'sagemaker', '-p', 'train.seed=7', '-p', 'gate.threshold=0.95', '-p', 'preprocess.instance_count=2')
    assert code == 0, err
    arn = out.strip()
    assert ':pipeline/mlproj/execution/' in arn
    code, out, err = cli('pipeline', 'show', '--backend', 'sagemaker')
    assert code == 0, err
    shown = json.loads(out)
    assert shown['execution'] == arn and shown['status'] in ('Executing', 'Succeeded')
    assert shown['parameters'] == {'TrainSeed': '7', 'GateThreshold': '0.95', 'PreprocessInstanceCount': '2'}
    # a bad parameter is refused before anything is started
    code, _, err = cli('pipeline', 'start', '--backend', 'sagemaker', '-p', 'train.sed=7')
    assert code == 2 and "did you mean 'seed'" in err, err


def test_upsert_start_show_stepfunctions(moto_server):
    import boto3
    from mlproj.export import Target, stepfunctions_definition
    flags = ['--bucket', MOTO_BUCKET, '--role', ROLE, '--image-uri', 'img:1', '--prefix', 'sfn']
    # --code-only: the uploads a CloudFormation deploy needs, and nothing created
    code, _, err = cli('pipeline', 'upsert', '--backend', 'stepfunctions', *flags, '--code-only')
    assert code == 0 and 'uploaded' in err and 'created' not in err, err
    assert any(k.endswith('/entry.py') for k in keys('sfn/mlproj/code/'))
    assert not [m for m in boto3.client('stepfunctions').list_state_machines()['stateMachines'] if m['name'] == 'mlproj']
    code, _, err = cli('pipeline', 'upsert', '--backend', 'stepfunctions', *flags)
    assert code == 2 and '--state-machine-role is required' in err
    code, _, err = cli('pipeline', 'upsert', '--backend', 'stepfunctions', *flags, '--state-machine-role', SFN_ROLE)
    assert code == 0 and 'created arn:aws:states:us-east-1:' in err, err
    sfn = boto3.client('stepfunctions')
    arn = next(m['stateMachineArn'] for m in sfn.list_state_machines()['stateMachines'] if m['name'] == 'mlproj')
    d = sfn.describe_state_machine(stateMachineArn=arn)
    assert json.loads(d['definition']) == stepfunctions_definition(Target(MOTO_BUCKET, ROLE, 'img:1', 'sfn')) and d['roleArn'] == SFN_ROLE
    code, _, err = cli('pipeline', 'upsert', '--backend', 'stepfunctions', *flags, '--state-machine-role', SFN_ROLE)
    assert code == 0 and 'updated arn:aws:states' in err, err
    assert len([m for m in sfn.list_state_machines()['stateMachines'] if m['name'] == 'mlproj']) == 1
    code, out, err = cli('pipeline', 'start', '--backend', 'stepfunctions', '-p', 'train.seed=7', '-p', 'gate.threshold=0.95', '--name', 'run-1')
    assert code == 0, err
    ex = out.strip()
    assert ex.endswith(':execution:mlproj:run-1')
    assert json.loads(sfn.describe_execution(executionArn=ex)['input']) == {'TrainSeed': 7, 'GateThreshold': 0.95}   # typed
    code, out, err = cli('pipeline', 'show', '--backend', 'stepfunctions', ex)
    assert code == 0, err
    shown = json.loads(out)
    assert shown['execution'] == ex and shown['status'] in ('RUNNING', 'SUCCEEDED') and shown['parameters'] == {'TrainSeed': 7, 'GateThreshold': 0.95}
    # each state the execution's history names, in order, with its latest event (moto's history is a canned one: the reading is what is checked)
    events = [e.get('stateEnteredEventDetails') or e.get('stateExitedEventDetails') for e in sfn.get_execution_history(executionArn=ex)['events']]
    named = [d['name'] for d in events if d]
    assert named and [s['step'] for s in shown['steps']] == list(dict.fromkeys(named)), (named, shown['steps'])
    assert {s['status'] for s in shown['steps']} <= {'Entered', 'Exited'}


def test_upsert_stock_image_ships_the_wheel(moto_server, tmp_path):
    "Without --image-uri the code channel carries the mlproj wheel, as `mlproj job run --backend sagemaker` ships it; the registered model's serving code carries it too."
    code, _, err = cli('pipeline', 'upsert', '--backend', 'sagemaker', '--bucket', MOTO_BUCKET, '--role', ROLE, '--prefix', 'stock', '--no-dependency-wheels')
    assert code == 0, err
    wheels = [k for k in keys('stock/mlproj/code/') if '/wheels/' in k]
    assert len(wheels) == 1 and wheels[0].split('/wheels/')[1].startswith('mlproj-') and wheels[0].endswith('.whl'), wheels
    # the register step's serving code: the handlers' entry script, requirements naming that very wheel, and the wheel
    import boto3, io, tarfile
    from mlproj.export import Target, s3_layout, sagemaker_definition
    from mlproj.endpoint import INFERENCE_PY, load_program
    s3 = boto3.client('s3')
    t = Target(MOTO_BUCKET, ROLE, 'img', 'stock')
    src_key = s3_layout(t)['serving'].split(MOTO_BUCKET + '/', 1)[1]
    wheel = wheels[0].split('/wheels/')[1]
    with tarfile.open(fileobj=io.BytesIO(s3.get_object(Bucket=MOTO_BUCKET, Key=src_key)['Body'].read())) as tar:
        assert tar.getnames() == ['inference.py', 'requirements.txt', wheel]
        assert tar.extractfile('inference.py').read().decode() == INFERENCE_PY
        assert tar.extractfile('requirements.txt').read().decode() == f'./{wheel}\n'
        assert tar.extractfile(wheel).read() == s3.get_object(Bucket=MOTO_BUCKET, Key=wheels[0])['Body'].read()
        tar.extractall(tmp_path/'code', filter='data')
    # found and imported as the serving container finds its entry script: the notebook's handlers
    import mlproj.serve
    assert load_program(tmp_path, {'SAGEMAKER_SUBMIT_DIRECTORY': str(tmp_path/'code')})['predict_fn'] is mlproj.serve.predict_fn
    stored = json.loads(boto3.client('sagemaker').describe_pipeline(PipelineName='mlproj')['PipelineDefinition'])
    cond = next(x for x in stored['Steps'] if x['Type'] == 'Condition')
    env = next(x for x in cond['Arguments']['IfSteps'] if x['Type'] == 'RegisterModel')['Arguments']['InferenceSpecification']['Containers'][0]['Environment']
    assert env == {'SAGEMAKER_PROGRAM': 'inference.py', 'SAGEMAKER_SUBMIT_DIRECTORY': f's3://{MOTO_BUCKET}/{src_key}'}
    for k in keys('stock/'):                                          # the fake credentials went nowhere near S3
        import boto3
        assert FAKE_KEY_ID.encode() not in boto3.client('s3').get_object(Bucket=MOTO_BUCKET, Key=k)['Body'].read()
