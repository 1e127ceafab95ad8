"""`mlproj transform request|run`: a CreateTransformJob executed through the local endpoint, from the same handlers;
its `.out` files hold, row for row, the batch-inference job's predictions. `--backend sagemaker` on moto."""
import json, os, subprocess, sys
from pathlib import Path
import pandas as pd
import pytest

pytestmark = pytest.mark.usefixtures('loopback_only')
MLPROJ = str(Path(sys.executable).parent/'mlproj')
BUNDLED = Path(__file__).resolve().parents[1]/'mlproj'/'assets'/'penguins.csv'
FEATURES = ['island', 'bill_length_mm', 'bill_depth_mm', 'flipper_length_mm', 'body_mass_g', 'sex']
PRED = ['predicted_species', 'proba_Adelie', 'proba_Chinstrap', 'proba_Gentoo']


def mlproj(outputs, *args):
    return subprocess.run([MLPROJ, *map(str, args)], capture_output=True, text=True, timeout=600, env={**os.environ, 'MLPROJ_OUTPUTS': str(outputs)})


@pytest.fixture(scope='module')
def shards(tmp_path_factory, opt_ml_trained, opt_ml_tree_factory):
    "The bundled table in 3 shards (under a sub-folder too), with and without header; the batch-inference job's predictions of them."
    base = tmp_path_factory.mktemp('shards')
    raw = pd.read_csv(BUNDLED, dtype=str, keep_default_na=False)
    parts = {'a.csv': raw.iloc[:100], 'b.csv': raw.iloc[100:250], 'sub/c.csv': raw.iloc[250:]}
    for kind in ('header', 'plain'):
        for rel, df in parts.items():
            p = base/kind/rel; p.parent.mkdir(parents=True, exist_ok=True)
            (df.to_csv(p, index=False) if kind == 'header' else df[FEATURES].to_csv(p, index=False, header=False))
    tree = opt_ml_tree_factory(base/'opt_ml')
    tree.stage('model', opt_ml_trained['model'])
    import shutil; shutil.copytree(base/'header', tree.input('data'))
    tree.run_ok('batch_inference')
    preds = pd.read_csv(tree.output('predictions')/'predictions-algo-1.csv', dtype={'penguin_id': str})
    return base, preds, {rel: len(df) for rel, df in parts.items()}


def test_line_split_multirecord_out_files_are_the_batch_predictions(shards, opt_ml_trained, tmp_path):
    base, preds, sizes = shards
    r = mlproj(tmp_path, 'transform', 'run', '--model', opt_ml_trained['model'], '--input', base/'plain', '--output', tmp_path/'out',
               '--split-type', 'Line', '--batch-strategy', 'MultiRecord', '--max-payload', 1, '--max-concurrent', 2, '--workers', 2)
    assert r.returncode == 0, r.stderr[-2000:]
    d = json.loads(r.stdout)
    assert d['TransformJobStatus'] == 'Completed' and d['MaxConcurrentTransforms'] == 2
    assert sorted(p.relative_to(tmp_path/'out').as_posix() for p in (tmp_path/'out').rglob('*') if p.is_file()) == ['a.csv.out', 'b.csv.out', 'sub/c.csv.out']
    got = pd.concat([pd.read_csv(tmp_path/'out'/f'{rel}.out', header=None, names=PRED) for rel in sizes], ignore_index=True)
    assert got.to_dict('records') == preds[PRED].to_dict('records')          # row for row


def test_whole_objects_with_header_are_the_batch_predictions_bytes(shards, opt_ml_trained, tmp_path):
    "SplitType None: each shard in one request, header and id included: its .out is the batch job's CSV for those rows."
    base, preds, sizes = shards
    r = mlproj(tmp_path, 'transform', 'run', '--model', opt_ml_trained['model'], '--input', base/'header', '--output', tmp_path/'out',
               '--split-type', 'None', '--workers', 1)
    assert r.returncode == 0, r.stderr[-2000:]
    first = 0
    for rel, n in sizes.items():
        want = preds.iloc[first:first + n]; first += n
        got = pd.read_csv(tmp_path/'out'/f'{rel}.out', dtype={'penguin_id': str})
        assert got.to_dict('records') == want.to_dict('records')


def test_a_bad_record_fails_its_file_alone(shards, opt_ml_trained, tmp_path):
    base, _, _ = shards
    import shutil
    src = tmp_path/'in'; shutil.copytree(base/'plain', src)
    lines = (src/'b.csv').read_text().splitlines()
    lines[7] = 'Dream,39.1,18.7,181,3750,robot'
    (src/'b.csv').write_text('\n'.join(lines) + '\n')
    r = mlproj(tmp_path, 'transform', 'run', '--model', opt_ml_trained['model'], '--input', src, '--output', tmp_path/'out',
               '--batch-strategy', 'SingleRecord', '--max-concurrent', 2, '--workers', 2)
    assert r.returncode == 1
    d = json.loads(r.stdout)
    assert d['TransformJobStatus'] == 'Failed'
    assert d['FailureReason'].startswith('1 of 3 input file(s) failed; first: b.csv: record 8: HTTP 400:'), d['FailureReason']
    assert "column 'sex': unknown category 'robot'" in d['FailureReason']
    assert sorted(p.relative_to(tmp_path/'out').as_posix() for p in (tmp_path/'out').rglob('*') if p.is_file()) == ['a.csv.out', 'sub/c.csv.out']


def test_join_source_input_appends_the_predictions_to_each_line(shards, opt_ml_trained, tmp_path):
    base, preds, _ = shards
    r = mlproj(tmp_path, 'transform', 'run', '--model', opt_ml_trained['model'], '--input', base/'plain'/'a.csv', '--output', tmp_path/'out',
               '--join-source', 'Input', '--workers', 1)
    assert r.returncode == 0, r.stderr[-2000:]
    out = (tmp_path/'out'/'a.csv.out').read_text().splitlines()
    ins = (base/'plain'/'a.csv').read_text().splitlines()
    assert len(out) == len(ins) == 100
    assert all(o.startswith(i + ',') for i, o in zip(ins, out))
    got = pd.read_csv(tmp_path/'out'/'a.csv.out', header=None, names=FEATURES + PRED)
    assert got[PRED].to_dict('records') == preds[PRED].head(100).to_dict('records')


def test_request_is_validated_and_refusals_are_one_line(opt_ml_trained, tmp_path):
    r = mlproj(tmp_path, 'transform', 'request', '--model', opt_ml_trained['model'], '--input', tmp_path, '--name', 'tj-1', '--max-concurrent', 4)
    assert r.returncode == 0, r.stderr
    req = json.loads(r.stdout)
    assert (req['TransformJobName'], req['MaxConcurrentTransforms'], req['TransformInput']['SplitType']) == ('tj-1', 4, 'Line')
    r = mlproj(tmp_path, 'transform', 'request', '--model', opt_ml_trained['model'], '--input', tmp_path, '--name', 'bad name')
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith('mlproj: error: invalid CreateTransformJob request: TransformJobName')


def test_sagemaker_backend_submits_the_same_request(moto_server, shards, opt_ml_trained, cli):
    import boto3
    base, _, _ = shards
    code, out, err = cli('transform', 'run', '--backend', 'sagemaker', '--model', opt_ml_trained['model'], '--input', base/'plain',
                         '--name', 'tj-moto', '--role', 'arn:aws:iam::123456789012:role/mlproj-test', '--bucket', 'mlproj-test-bucket', '--max-concurrent', 2)
    assert code == 0, err
    res = json.loads(out)
    sent = res['request']
    assert sent['TransformInput']['DataSource']['S3DataSource']['S3Uri'] == 's3://mlproj-test-bucket/mlproj/transform/tj-moto/input/'
    d = boto3.client('sagemaker').describe_transform_job(TransformJobName='tj-moto')
    assert d['ModelName'] == sent['ModelName'] and d['TransformInput']['SplitType'] == 'Line' and d['MaxConcurrentTransforms'] == 2
    keys = sorted(o['Key'] for o in boto3.client('s3').list_objects_v2(Bucket='mlproj-test-bucket', Prefix='mlproj/transform/tj-moto/input/')['Contents'])
    assert keys == [f'mlproj/transform/tj-moto/input/{k}' for k in ('a.csv', 'b.csv', 'sub/c.csv')]
