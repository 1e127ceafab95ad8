"""The runtime scripts as SageMaker Processing runs them: `--help`, a silent import, and the full chain
(preprocess -> train -> evaluate -> batch_inference) with the container's default paths and with explicit paths."""
import json, math, re, tarfile, hashlib
import pytest

IN, OUT = '/opt/ml/processing/input', '/opt/ml/processing/output'
# every location argument of every script, with its container default
LOCATIONS = {
    'preprocess': {'raw': f'{IN}/raw', 'train': f'{OUT}/train', 'test': f'{OUT}/test'},
    'train': {'train': f'{IN}/train', 'model': f'{OUT}/model'},
    'evaluate': {'model': f'{IN}/model', 'test': f'{IN}/test', 'evaluation': f'{OUT}/evaluation'},
    'batch_inference': {'model': f'{IN}/model', 'data': f'{IN}/data', 'predictions': f'{OUT}/predictions'},
    'monitor': {'model': f'{IN}/model', 'data': f'{IN}/data', 'predictions': f'{IN}/predictions', 'monitoring': f'{OUT}/monitoring'},
}
SCHEMA_COLUMNS = ['penguin_id', 'species', 'island', 'bill_length_mm', 'bill_depth_mm', 'flipper_length_mm',
                  'body_mass_g', 'sex', 'year']
SPECIES = ['Adelie', 'Chinstrap', 'Gentoo']
PRED_COLUMNS = ['penguin_id', 'predicted_species'] + [f'proba_{s}' for s in SPECIES]
N_ROWS = 344


@pytest.mark.parametrize('step', list(LOCATIONS))
def test_help_lists_locations_with_container_defaults(step, opt_ml_tree):
    p = opt_ml_tree.run(step, '--help', env={'COLUMNS': '250'})   # wide, so argparse does not wrap a default
    assert p.returncode == 0, p.stderr
    assert 'Traceback' not in p.stderr
    for arg, default in LOCATIONS[step].items():
        pat = re.compile(rf'^\s*--{re.escape(arg)}\b.*\(default: {re.escape(default)}\)\s*$', re.M)
        assert pat.search(p.stdout), f'--{arg} with default {default} not in help of {step}:\n{p.stdout}'
    # asking for help touches nothing
    assert not opt_ml_tree.root.exists()
    assert list(opt_ml_tree.cwd.iterdir()) == []


@pytest.mark.parametrize('step', list(LOCATIONS))
def test_import_is_silent_and_writes_nothing(step, opt_ml_tree):
    p = opt_ml_tree.python('-c', f'import mlproj.scripts.{step}')
    assert p.returncode == 0, p.stderr
    assert p.stdout == ''
    assert p.stderr == ''
    assert not opt_ml_tree.root.exists(), opt_ml_tree.files_under(opt_ml_tree.root)
    assert list(opt_ml_tree.cwd.iterdir()) == []


def _no_hidden_files(tree):
    hidden = [f for f in tree.files_under(tree.root) if any(part.startswith('.') for part in f.relative_to(tree.root).parts)]
    assert hidden == [], f'temporary files left behind: {hidden}'


def _check_predictions(tree, path, ids_in_order):
    header, rows = tree.read_csv(path)
    assert header == PRED_COLUMNS
    assert len(rows) == len(ids_in_order)
    assert [r['penguin_id'] for r in rows] == ids_in_order
    for r in rows:
        probas = [float(r[f'proba_{s}']) for s in SPECIES]
        assert all(0 <= q <= 1 for q in probas), r
        assert math.isclose(sum(probas), 1.0, abs_tol=1e-5), r
        assert r['predicted_species'] in SPECIES, r
        assert float(r[f"proba_{r['predicted_species']}"]) == max(probas), r     # the predicted class is the most probable
    return rows


def test_full_chain_with_container_defaults(opt_ml_tree, opt_ml_penguins):
    t = opt_ml_tree
    t.stage('raw', opt_ml_penguins)
    _, raw_rows = t.read_csv(opt_ml_penguins)
    raw_ids = [r['penguin_id'] for r in raw_rows]
    assert len(raw_ids) == N_ROWS

    # preprocess, no arguments: /opt/ml/processing/input/raw -> output/train, output/test
    t.run_ok('preprocess')
    train_csv, test_csv = t.output('train') / 'train-algo-1.csv', t.output('test') / 'test-algo-1.csv'
    assert train_csv.is_file() and test_csv.is_file()
    tr_header, tr = t.read_csv(train_csv)
    te_header, te = t.read_csv(test_csv)
    assert tr_header == SCHEMA_COLUMNS and te_header == SCHEMA_COLUMNS
    tr_ids, te_ids = {r['penguin_id'] for r in tr}, {r['penguin_id'] for r in te}
    assert not tr_ids & te_ids, 'a row is in both splits'
    assert tr_ids | te_ids == set(raw_ids)
    assert len(tr) + len(te) == N_ROWS
    assert 0.15 * N_ROWS <= len(te) <= 0.25 * N_ROWS         # default test_size 0.2

    # train: processing/output/train -> processing/input/train, as the next job's input
    t.promote('train'); t.promote('test')
    t.run_ok('train', '--n_estimators', 50)
    model = t.output('model') / 'model.tar.gz'
    assert model.is_file()
    with tarfile.open(model, 'r:gz') as tar:
        names = tar.getnames()
        assert {'model.skops', 'manifest.json'} <= set(names), names
        blob = tar.extractfile('model.skops').read()
        manifest = json.loads(tar.extractfile('manifest.json').read())
    assert manifest['model_sha256'] == hashlib.sha256(blob).hexdigest()
    assert manifest['params']['n_estimators'] == 50
    assert manifest['classes'] == SPECIES

    # evaluate
    t.promote('model')
    t.run_ok('evaluate')
    ev = t.output('evaluation') / 'evaluation.json'
    assert ev.is_file()
    report = json.loads(ev.read_text(encoding='utf-8'))
    mm = report['multiclass_classification_metrics']
    assert mm['accuracy']['value'] >= 0.95, mm['accuracy']
    assert mm['n_rows'] == len(te)
    assert sum(sum(row.values()) for row in mm['confusion_matrix'].values()) == len(te)
    for png in ('confusion_matrix.png', 'per_class.png'):
        assert (t.output('evaluation') / png).read_bytes()[:8] == b'\x89PNG\r\n\x1a\n', png

    # batch inference over the raw table
    t.stage('data', opt_ml_penguins)
    t.run_ok('batch_inference')
    pred = t.output('predictions') / 'predictions-algo-1.csv'
    assert pred.is_file()
    rows = _check_predictions(t, pred, raw_ids)
    # the model is good on the data it was (mostly) trained on
    agree = sum(r['predicted_species'] == raw['species'] for r, raw in zip(rows, raw_rows))
    assert agree / N_ROWS >= 0.95

    _no_hidden_files(t)
    assert not t.message.exists(), t.message.read_text()


def test_chain_with_explicit_paths(tmp_path, opt_ml_tree_factory, opt_ml_penguins):
    "Locations outside /opt/ml are used as given (files or folders), and nothing is written under the container root."
    t = opt_ml_tree_factory(tmp_path / 'runner')
    w = tmp_path / 'elsewhere'
    (w / 'raw').mkdir(parents=True)
    raw = w / 'raw' / 'penguins.csv'
    raw.write_bytes(opt_ml_penguins.read_bytes())
    ids = [r['penguin_id'] for r in t.read_csv(raw)[1]]

    t.run_ok('preprocess', '--raw', raw, '--train', w / 'split' / 'train', '--test', w / 'split' / 'test')
    train_csv, test_csv = w / 'split' / 'train' / 'train-algo-1.csv', w / 'split' / 'test' / 'test-algo-1.csv'
    assert train_csv.is_file() and test_csv.is_file()

    t.run_ok('train', '--train', train_csv, '--model', w / 'model', '--n_estimators', 20)      # input given as a file
    model = w / 'model' / 'model.tar.gz'
    assert model.is_file()

    t.run_ok('evaluate', '--model', model, '--test', w / 'split' / 'test', '--evaluation', w / 'eval')
    report = json.loads((w / 'eval' / 'evaluation.json').read_text(encoding='utf-8'))
    assert report['multiclass_classification_metrics']['n_rows'] == len(t.read_csv(test_csv)[1])

    t.run_ok('batch_inference', '--model', w / 'model', '--data', w / 'raw', '--predictions', w / 'pred')
    t.run_ok('batch_inference', '--model', model, '--data', raw, '--predictions', w / 'pred100', '--chunksize', 100)
    whole, chunked = w / 'pred' / 'predictions-algo-1.csv', w / 'pred100' / 'predictions-algo-1.csv'
    _check_predictions(t, whole, ids)
    assert chunked.read_bytes() == whole.read_bytes(), 'scoring in chunks of 100 rows changed the output'

    assert not t.root.exists(), f'explicit paths given, yet the container root was written: {t.files_under(t.root)}'
