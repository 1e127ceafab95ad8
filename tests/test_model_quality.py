"""Model quality by task: `evaluation.json` and the monitor's model-quality files in SageMaker's shapes, for a binary and a
regression table built here from scikit-learn's bundled datasets (no network), through the step scripts and the job notebooks.

The model artifact is made in-process (the preprocess and train steps read the project's one `SCHEMA`; changing it in a copy
of the project and running the whole pipeline is `tests/test_tasks*`' business); evaluate, batch inference and monitor then
run as the container runs them, taking the schema and task from the artifact's manifest."""
import json
from pathlib import Path
import numpy as np
import pandas as pd
import pytest

FIXTURES = Path(__file__).parent / 'fixtures' / 'model_quality'
FIXTURE = {'binary': 'binary_classification.json', 'regression': 'regression.json', 'multiclass': 'multiclass_classification.json'}
BLOCK = {'binary': 'binary_classification_metrics', 'regression': 'regression_metrics', 'multiclass': 'multiclass_classification_metrics'}


def shape(x):
    "The shape of a JSON value: dicts by key, lists by the shapes of their items, scalars as 'number' ('NaN' is Model Monitor's number) or their type."
    if isinstance(x, dict): return {k: shape(v) for k, v in x.items()}
    if isinstance(x, list): return ('list', tuple(sorted({str(shape(v)) for v in x})))
    if isinstance(x, bool): return 'bool'
    if isinstance(x, (int, float)) or x == 'NaN': return 'number'
    return type(x).__name__


def test_shape_tells_documents_apart():
    "The checker itself: a missing key, a text value or a list of text differ; 1, 0.5 and 'NaN' are all numbers."
    good = {'a': {'value': 1, 'standard_deviation': 'NaN'}, 'c': [0.1, 1]}
    assert shape(good) == shape({'a': {'value': 0.5, 'standard_deviation': 0.2}, 'c': [0, 0.3]})
    assert shape(good) != shape({'a': {'value': 1}, 'c': [0.1]})
    assert shape(good) != shape({'a': {'value': '1', 'standard_deviation': 'NaN'}, 'c': [0.1]})
    assert shape(good) != shape({'a': {'value': 1, 'standard_deviation': 'NaN'}, 'c': ['x']})


# --- tables ---------------------------------------------------------------------------------------------------------

def binary_table():
    "Breast-cancer diagnoses from three weak features (so the model errs a little): 569 rows, positive class 'malignant'."
    from sklearn.datasets import load_breast_cancer
    from mlproj.data import Column, Schema
    d = load_breast_cancer(as_frame=True).frame
    df = pd.DataFrame({'case_id': [f'c{i:04d}' for i in range(len(d))], 'texture': d['mean texture'].round(4),
                       'smoothness': d['mean smoothness'].round(6), 'symmetry': d['mean symmetry'].round(6),
                       'diagnosis': np.where(d['target'] == 0, 'malignant', 'benign')})
    schema = Schema('tumours', (Column('case_id', 'id', nullable=False), Column('texture', 'number'), Column('smoothness', 'number'),
                                Column('symmetry', 'number'), Column('diagnosis', 'category', ('benign', 'malignant'), nullable=False)),
                    'diagnosis', ('texture', 'smoothness', 'symmetry'), id='case_id')
    return df, schema


def regression_table():
    "Diabetes progression a year on from four measurements: 442 rows, a number target."
    from sklearn.datasets import load_diabetes
    from mlproj.data import Column, Schema
    d = load_diabetes(as_frame=True, scaled=False).frame
    df = pd.DataFrame({'patient_id': [f'p{i:04d}' for i in range(len(d))], 'age': d['age'], 'bmi': d['bmi'], 'bp': d['bp'], 's5': d['s5'],
                       'progression': d['target']})
    schema = Schema('diabetes', (Column('patient_id', 'id', nullable=False), Column('age', 'number'), Column('bmi', 'number'),
                                 Column('bp', 'number'), Column('s5', 'number'), Column('progression', 'number', nullable=False)),
                    'progression', ('age', 'bmi', 'bp', 's5'), id='patient_id')
    return df, schema


TABLES = {'binary': binary_table, 'regression': regression_table}


@pytest.fixture(scope='module', params=['binary', 'regression'])
def project(request, tmp_path_factory, opt_ml_tree_factory):
    "A model of the task trained on 70% of its table (with its data-quality baseline), the held-out 30%, and all rows with their labels."
    from mlproj.train import train_model, write_model_artifact
    from mlproj.monitor import suggest_baseline
    task = request.param
    df, schema = TABLES[task]()
    assert schema.task == task
    base = tmp_path_factory.mktemp(task)
    tr, te = _split(df, 0.3)
    for name, part in (('test', te), ('rows', df)):
        (base/name).mkdir(); part.to_csv(base/name/f'{name}.csv', index=False)
    (base/'model').mkdir()
    m = train_model(tr, seed=0, n_estimators=50, schema=schema)
    write_model_artifact(m, base/'model'/'model.tar.gz', {'seed': 0, 'n_estimators': 50}, suggest_baseline(tr, schema))
    return {'task': task, 'schema': schema, 'df': df, 'base': base, 'tree': opt_ml_tree_factory(base)}


def _split(df, share):
    "(train, held-out) rows, a seeded shuffle (the split step reads the project's own schema)."
    idx = np.random.default_rng(0).permutation(len(df))
    k = int(len(df) * share)
    return df.iloc[np.sort(idx[k:])], df.iloc[np.sort(idx[:k])]


@pytest.fixture(scope='module')
def evaluated(project):
    "The evaluate and batch-inference scripts run once over the project: their outputs."
    b, t = project['base'], project['tree']
    ev = t.run_ok('evaluate', '--model', b/'model', '--test', b/'test', '--evaluation', b/'evaluation')
    bi = t.run_ok('batch_inference', '--model', b/'model', '--data', b/'rows', '--predictions', b/'predictions')
    return {**project, 'evaluate': ev, 'batch_inference': bi}


# --- evaluate -------------------------------------------------------------------------------------------------------

def test_evaluation_json_has_the_pinned_sagemaker_shape(evaluated):
    task, b = evaluated['task'], evaluated['base']
    ours = json.loads((b/'evaluation'/'evaluation.json').read_text())
    fixture = json.loads((FIXTURES/FIXTURE[task]).read_text())
    assert list(ours) == ['version', 'dataset', BLOCK[task]]                     # one block, the task's
    assert shape(ours[BLOCK[task]]) == shape(fixture[BLOCK[task]])                # keys and value types, recursively
    assert ours['dataset']['item_count'] == evaluated['evaluate']['rows'] == len(pd.read_csv(b/'test'/'test.csv'))
    assert ours['version'] == fixture.get('version', 0.0)                          # the binary fixture carries none: Model Monitor's 0.0
    block = ours[BLOCK[task]]
    # 133 held-out rows: below Model Monitor's 200, so no standard deviations
    assert {v['standard_deviation'] for v in block.values() if isinstance(v, dict) and 'standard_deviation' in v} == {'NaN'}


def test_evaluation_values_are_those_of_scikit_learn(evaluated):
    "The figures, recomputed from the model's own predictions of the held-out rows."
    from sklearn.metrics import mean_absolute_error, mean_squared_error, r2_score, roc_auc_score, accuracy_score
    from mlproj.train import load_model
    task, b, schema = evaluated['task'], evaluated['base'], evaluated['schema']
    block = json.loads((b/'evaluation'/'evaluation.json').read_text())[BLOCK[task]]
    te = pd.read_csv(b/'test'/'test.csv')
    m, _ = load_model(b/'model')
    X = te[list(schema.features)]
    if task == 'regression':
        p = np.asarray(m.predict(X), dtype=float)
        assert block['mae']['value'] == pytest.approx(mean_absolute_error(te['progression'], p))
        assert block['rmse']['value'] == pytest.approx(mean_squared_error(te['progression'], p) ** 0.5)
        assert block['r2']['value'] == pytest.approx(r2_score(te['progression'], p))
        assert block['mse']['value'] == pytest.approx(block['rmse']['value'] ** 2)
    else:
        score = m.predict_proba(X)[:, list(m.classes_).index('malignant')]
        actual = te['diagnosis'] == 'malignant'
        assert block['auc']['value'] == pytest.approx(roc_auc_score(actual, score))
        assert 0.6 < block['auc']['value'] < 1.0                             # weak features: a model that errs
        assert block['accuracy']['value'] == pytest.approx(accuracy_score(actual, score >= 0.5))
        cm = block['confusion_matrix']
        assert cm['1']['1'] + cm['1']['0'] == int(actual.sum()) and cm['0']['0'] + cm['0']['1'] == int((~actual).sum())
        assert block['precision_best_constant_classifier']['value'] == pytest.approx(actual.mean())
        roc = block['receiver_operating_characteristic_curve']
        assert roc['false_positive_rates'][0] == 0.0 and roc['true_positive_rates'][-1] == 1.0


def test_evaluate_writes_the_pictures_of_its_task(evaluated):
    task, b = evaluated['task'], evaluated['base']
    want = {'binary': ['confusion_matrix.png', 'precision_recall_curve.png', 'roc_curve.png'],
            'regression': ['predicted_vs_actual.png', 'residuals.png']}[task]
    assert sorted(p.name for p in (b/'evaluation').iterdir()) == sorted(want + ['evaluation.json'])
    assert sorted(evaluated['evaluate']['plots']) == want
    for name in want: assert (b/'evaluation'/name).read_bytes()[:8] == b'\x89PNG\r\n\x1a\n', name


def test_penguins_evaluation_completes_model_monitors_multiclass_keys(opt_ml_trained, opt_ml_tree):
    "The bundled multiclass model: Model Monitor's whole key set, beside what the kit wrote before, and the gate's accuracy."
    t = opt_ml_tree
    t.run_ok('evaluate', '--model', opt_ml_trained['model'], '--test', opt_ml_trained['test_csv'], '--evaluation', t.cwd/'eval')
    ours = json.loads((t.cwd/'eval'/'evaluation.json').read_text())['multiclass_classification_metrics']
    fixture = json.loads((FIXTURES/FIXTURE['multiclass']).read_text())['multiclass_classification_metrics']
    for k, v in fixture.items():
        if k == 'confusion_matrix': assert {shape(r) == {q: 'number' for q in r} for r in ours[k].values()} == {True}
        else: assert shape(ours[k]) == shape(v), k
    assert {'macro_f1', 'per_class', 'n_rows'} <= set(ours)
    assert ours['accuracy']['value'] >= 0.95


# --- batch inference and monitor ------------------------------------------------------------------------------------

def monitor(evaluated, data, out, *args):
    b = evaluated['base']
    return evaluated['tree'].run('monitor', '--model', b/'model', '--data', data, '--predictions', b/'predictions',
                                 '--evaluation', b/'evaluation', '--monitoring', out, *args)


def test_labelled_rows_like_the_training_ones_pass_in_model_monitors_shape(evaluated):
    task, b, t = evaluated['task'], evaluated['base'], evaluated['tree']
    p = monitor(evaluated, b/'rows', b/'mon-ok')
    assert p.returncode == 0, p.stderr[-3000:]
    s = t.check_ok_stdout(p, 'monitor')
    q = s['quality']
    assert q['rows'] == len(evaluated['df']) and q['compared'] and q['violations'] == 0, (q, p.stderr[-2000:])
    stats = json.loads((b/'mon-ok'/'model_quality'/'statistics.json').read_text())
    fixture = json.loads((FIXTURES/FIXTURE[task]).read_text())
    assert shape(stats[BLOCK[task]]) == shape(fixture[BLOCK[task]])
    assert stats['dataset']['item_count'] == len(evaluated['df'])
    block = stats[BLOCK[task]]                                                 # 569 / 442 rows: resampled spreads
    assert all(isinstance(v['standard_deviation'], float) for k, v in block.items() if isinstance(v, dict) and 'value' in v and v['value'] != 'NaN'
               and not k.endswith('_best_constant_classifier')), block
    cons = json.loads((b/'mon-ok'/'model_quality'/'constraints.json').read_text())
    key = {'binary': 'binary_classification_constraints', 'regression': 'regression_constraints'}[task]
    assert list(cons) == ['version', key]
    if task == 'regression':
        assert shape(cons) == shape(json.loads((FIXTURES/'regression_constraints.json').read_text()))
    else:
        assert cons[key]['auc']['comparison_operator'] == 'LessThanThreshold' and cons[key]['false_positive_rate']['comparison_operator'] == 'GreaterThanThreshold'
    assert json.loads((b/'mon-ok'/'model_quality'/'constraint_violations.json').read_text()) == {'violations': []}
    assert (t.root/'output'/'message').read_text() == 'Completed: Job completed successfully with no violations.'


def test_the_predictions_are_compared_with_the_training_target_by_task(evaluated):
    task, b, t = evaluated['task'], evaluated['base'], evaluated['tree']
    s = t.check_ok_stdout(monitor(evaluated, b/'rows', b/'mon-drift'), 'monitor')
    col = f"predicted_{evaluated['schema'].target}"
    row = next(r for r in s['drift'] if r['feature'] == col)
    assert row['method'] == ('KS over the baseline buckets' if task == 'regression' else 'LInfinity')
    assert not row['drift']
    stats = json.loads((b/'mon-drift'/'statistics.json').read_text())
    pred = next(f for f in stats['features'] if f['name'] == col)
    assert ('numerical_statistics' if task == 'regression' else 'string_statistics') in pred
    if task == 'regression': assert pred['numerical_statistics']['common']['num_present'] == len(evaluated['df'])


def test_labels_that_went_wrong_are_model_quality_violations(evaluated, tmp_path):
    "Labels far from what the model predicts: the task's headline metric is violated, with Model Monitor's operator for it."
    task, b, t, schema = evaluated['task'], evaluated['base'], evaluated['tree'], evaluated['schema']
    bad = evaluated['df'].copy()
    if task == 'binary': bad['diagnosis'] = np.where(bad['diagnosis'] == 'malignant', 'benign', 'malignant')     # every label flipped
    else: bad['progression'] = bad['progression'] * 3 + 200                                                     # a scale the model never saw
    (tmp_path/'bad').mkdir(); bad.to_csv(tmp_path/'bad'/'rows.csv', index=False)
    p = monitor(evaluated, tmp_path/'bad', tmp_path/'mon')
    assert p.returncode == 0, p.stderr[-3000:]
    v = {x['metric_name']: x for x in json.loads((tmp_path/'mon'/'model_quality'/'constraint_violations.json').read_text())['violations']}
    headline, op = {'binary': ('accuracy', 'LessThanThreshold'), 'regression': ('rmse', 'GreaterThanThreshold')}[task]
    assert v[headline]['constraint_check_type'] == op and v[headline]['description'].startswith(f'Metric {headline} with '), v
    assert set(v[headline]) == {'metric_name', 'constraint_check_type', 'description'}
    if task == 'binary': assert v['false_positive_rate']['constraint_check_type'] == 'GreaterThanThreshold'
    assert t.check_ok_stdout(p, 'monitor')['quality']['violations'] == len(v)
    assert (t.root/'output'/'message').read_text().startswith('CompletedWithViolations')
    p = monitor(evaluated, tmp_path/'bad', tmp_path/'mon-fail', '--fail_on_violation', 'true')
    assert p.returncode != 0
    assert (t.root/'output'/'message').read_text().split(': ')[1] in v, p.stderr[-2000:]        # 'metric: check: description'


def test_rows_without_labels_or_without_an_evaluation_are_not_compared(evaluated, tmp_path):
    task, b, t, schema = evaluated['task'], evaluated['base'], evaluated['tree'], evaluated['schema']
    (tmp_path/'nolabels').mkdir()
    evaluated['df'].drop(columns=[schema.target]).to_csv(tmp_path/'nolabels'/'rows.csv', index=False)
    s = t.check_ok_stdout(monitor(evaluated, tmp_path/'nolabels', tmp_path/'m1'), 'monitor')
    assert s['quality'] is None and not (tmp_path/'m1'/'model_quality').exists()
    p = t.run('monitor', '--model', b/'model', '--data', b/'rows', '--predictions', b/'predictions', '--monitoring', tmp_path/'m2')
    s = t.check_ok_stdout(p, 'monitor')                                       # no evaluation given: the metrics, not compared
    assert s['quality']['rows'] == len(evaluated['df']) and not s['quality']['compared']
    assert sorted(f.name for f in (tmp_path/'m2'/'model_quality').iterdir()) == ['constraint_violations.json', 'statistics.json']


def test_the_threshold_a_batch_was_served_at_does_not_move_its_model_quality(evaluated, tmp_path):
    "Binary: predictions labelled at 0.3 are measured at the evaluation's 0.5, as the evaluation was (else precision and recall"
    "would be compared across thresholds), with a note counting the rows served otherwise. Regression: the threshold is unused."
    task, b, t = evaluated['task'], evaluated['base'], evaluated['tree']
    t.run_ok('batch_inference', '--model', b/'model', '--data', b/'rows', '--predictions', tmp_path/'p03', '--threshold', '0.3')
    served = lambda d: pd.read_csv(d/'predictions-algo-1.csv')
    moved = int((served(tmp_path/'p03') != served(b/'predictions')).any(axis=1).sum())
    assert (moved > 0) == (task == 'binary')                                  # some rows lie between 0.3 and 0.5
    stats, notes = {}, {}
    for name, pred in (('at05', b/'predictions'), ('at03', tmp_path/'p03')):
        p = t.run('monitor', '--model', b/'model', '--data', b/'rows', '--predictions', pred, '--evaluation', b/'evaluation', '--monitoring', tmp_path/name)
        notes[name] = t.check_ok_stdout(p, 'monitor')['notes']
        stats[name] = json.loads((tmp_path/name/'model_quality'/'statistics.json').read_text())
    assert stats['at03'] == stats['at05']
    said = [n for n in notes['at03'] if "evaluation's threshold" in n]
    assert said == ([f"model quality at the evaluation's threshold 0.5: {moved:,} of {len(evaluated['df']):,} rows were served another label "
                     "(batch inference's threshold differs)"] if task == 'binary' else []), notes['at03']
    assert not [n for n in notes['at05'] if "evaluation's threshold" in n]


def test_sharded_monitor_merges_to_the_one_instance_model_quality(evaluated, cli, tmp_path):
    "Three instances, the rows split by file: their summaries merge to exactly the model quality of one instance."
    from functools import reduce
    from mlproj import monitor as mon
    from mlproj.steps import read_evaluation
    task, b, schema = evaluated['task'], evaluated['base'], evaluated['schema']
    data = tmp_path/'data'; data.mkdir()
    df = evaluated['df']
    for i in range(3): df.iloc[i::3].to_csv(data/f'part-{i}.csv', index=False)
    code, _, err = cli('job', 'run', 'batch_inference', '--engine', 'script', '--name', 'bi', '--input', f'data={data}', '--input', f"model={b/'model'}")
    assert code == 0, err[-2000:]
    preds = tmp_path/'outputs/bi/predictions'
    outs = {}
    for n in (1, 3):
        code, _, err = cli('job', 'run', 'monitor', '--engine', 'script', '--instance-count', n, '--name', f'mon-{n}', '--input', f'data={data}',
                           '--input', f"model={b/'model'}", '--input', f'predictions={preds}', '--input', f"evaluation={b/'evaluation'}")
        assert code == 0, err[-3000:]
        outs[n] = tmp_path/f'outputs/mon-{n}/monitoring'
    parts = [json.loads(f.read_text()) for f in sorted(outs[3].glob('summary-*.json'))]
    assert len(parts) == 3 and all(p.get('quality') for p in parts)
    from mlproj.train import load_baseline
    res = mon.finish(reduce(mon.merge_summaries, parts), load_baseline(b/'model'), schema, read_evaluation(b/'evaluation'))
    one = json.loads((outs[1]/'model_quality'/'statistics.json').read_text())
    assert res['quality']['statistics'] == one and one['dataset']['item_count'] == len(df)


# --- job notebooks --------------------------------------------------------------------------------------------------

def test_job_notebooks_show_the_pictures_of_the_task(evaluated, cli, tmp_path):
    task, b = evaluated['task'], evaluated['base']
    code, _, err = cli('job', 'run', 'evaluate', '--name', 'ev', '--input', f"model={b/'model'}", '--input', f"test={b/'test'}")
    assert code == 0, err[-3000:]
    html = (tmp_path/'outputs/ev/report/evaluate.html').read_text()
    for name in {'binary': ['roc_curve.png', 'precision_recall_curve.png', 'confusion_matrix.png'], 'regression': ['predicted_vs_actual.png', 'residuals.png']}[task]:
        assert name in html, name
    assert html.count('image/png') >= (3 if task == 'binary' else 2)
    assert ('auc' in html) == (task == 'binary') and ('rmse' in html) == (task == 'regression')
    assert ('<th>best constant classifier</th>' in html) == (task == 'binary')     # regression has no constant-classifier figures: no empty column
    code, _, err = cli('job', 'run', 'monitor', '--name', 'mon', '--input', f"model={b/'model'}", '--input', f"data={b/'rows'}",
                       '--input', f"predictions={b/'predictions'}", '--input', f"evaluation={tmp_path/'outputs/ev/evaluation'}")
    assert code == 0, err[-3000:]
    html = (tmp_path/'outputs/mon/report/monitor.html').read_text()
    assert 'Model quality' in html and 'labelled row(s)' in html and ('LessThanThreshold' in html or 'GreaterThanThreshold' in html)
    assert f"predicted_{evaluated['schema'].target}" in html
