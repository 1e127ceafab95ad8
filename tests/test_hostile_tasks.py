"""Bring your own table, bring your own model — as a careless or hostile user would.

Each case ends in a correct result or in ONE line naming what and where: before any job starts when the mistake needs
no data (the declaration), in the step that reads the data otherwise — non-zero exit, the exit message file written,
nothing half-written. Most cases call the domain functions directly on small tables (`schema=` passed explicitly, the
estimator cell replaced with `monkeypatch`); a few run the runtime scripts over an /opt/ml tree, and two copies of the
project (conftest's ProjectCopy) run the CLI end to end: a regression table whose estimator predicts a constant, and a
declaration that cannot be."""
import json, math
from pathlib import Path
import numpy as np
import pandas as pd
import pytest

import mlproj.train as T
from mlproj.data import Column, Schema, check_target, load_table, split_table, validate
from mlproj.errors import InputError, MlprojError, SpecError


def one_line(e: BaseException, most: int = 400) -> str:
    "The message of a refusal: one line, bounded, mlproj's own kind."
    msg = str(e)
    assert isinstance(e, MlprojError), f'{type(e).__name__}: {msg}'
    assert '\n' not in msg and 0 < len(msg) <= most, msg
    return msg


def refused(fn, *contains) -> str:
    with pytest.raises(MlprojError) as info: fn()
    msg = one_line(info.value)
    for c in contains: assert c in msg, msg
    return msg


def strict_json(text: str):
    "JSON as SageMaker's parsers read it: NaN, Infinity and -Infinity are not JSON."
    def no(c): raise AssertionError(f'bare {c} in JSON')
    return json.loads(text, parse_constant=no)


X = Column('x', 'number')
SITE = Column('site', 'category', ('a', 'b'))
REG = Schema('reg', (Column('y', 'number'), X, SITE), 'y', ('x', 'site'))
BIN = Schema('bin', (Column('y', 'category', ('no', 'yes')), X, SITE), 'y', ('x', 'site'))
MULTI = Schema('multi', (Column('y', 'category', ('a', 'b', 'c')), X, SITE), 'y', ('x', 'site'))


def table(n: int, y, seed: int = 0) -> pd.DataFrame:
    "n rows: target `y` (a list, or a function of x), x ~ N(0, 1), site a/b."
    rng = np.random.default_rng(seed)
    x = rng.normal(size=n).round(4)
    return pd.DataFrame({'y': y(x) if callable(y) else y, 'x': x, 'site': np.array(['a', 'b'])[np.arange(n) % 2]})


def csv(tmp_path, df_or_text, name='t.csv') -> Path:
    p = tmp_path / name
    if isinstance(df_or_text, str): p.write_text(df_or_text)
    else: df_or_text.to_csv(p, index=False)
    return p


# --- the declaration: refused where it is written, before any job ---------------------------------------------------

y2 = Column('y', 'category', ('no', 'yes'))
DECLARATIONS = {
    'positive names a class not listed': (lambda: Schema('t', (y2, X), 'y', ('x',), positive='maybe'), "positive='maybe' must be one of the two classes of a binary target (no, yes)"),
    'positive on a regression target': (lambda: Schema('t', (Column('y', 'number'), X), 'y', ('x',), positive='yes'), "'y' is not binary"),
    'a category target with one class': (lambda: Schema('t', (Column('y', 'category', ('yes',)), X), 'y', ('x',)), 'a category column with at least two classes listed'),
    'one class written without its comma': (lambda: Column('y', 'category', ('yes')), "categories 'yes' is not a tuple of names (one category is written ('yes',), with its comma)"),
    'a class listed twice': (lambda: Column('y', 'category', ('no', 'no', 'yes')), "category 'no' is listed twice"),
    'integer-coded categories': (lambda: Column('y', 'category', (0, 1)), "category 0 is not text (int); files hold text, so list categories as text (e.g. ('0', '1'))"),
    'a category that reads as missing': (lambda: Column('y', 'category', ('yes', 'NA')), "category 'NA' reads as a missing value"),
    'a kind misspelt': (lambda: Column('y', 'categorical', ('no', 'yes')), "kind 'categorical' is not one of number, category, id"),
    'the target also a feature': (lambda: Schema('t', (y2, X), 'y', ('x', 'y')), "feature 'y' must be a number or category column, not the target or id"),
    'the target missing from the columns': (lambda: Schema('t', (X,), 'y', ('x',)), "target 'y' is not one of its columns"),
    'the target also the id': (lambda: Schema('t', (y2, X), 'y', ('x',), id='y'), "'y' is both the id and the target"),
    'a column declared twice': (lambda: Schema('t', (y2, X, X), 'y', ('x',)), "column 'x' declared twice"),
    'a feature listed twice': (lambda: Schema('t', (y2, X), 'y', ('x', 'x')), "feature 'x' is listed twice"),
    'features as one string': (lambda: Schema('t', (y2, X), 'y', ('x')), "features='x' is not a tuple"),
    'no features': (lambda: Schema('t', (y2, X), 'y', ()), 'no features'),
}


@pytest.mark.parametrize('case', DECLARATIONS)
def test_a_declaration_that_cannot_be_is_refused_in_one_line(case):
    build, expected = DECLARATIONS[case]
    with pytest.raises(SpecError) as info: build()
    assert expected in one_line(info.value)


def test_what_a_careless_declaration_typed_is_quoted_bounded():
    msg = refused(lambda: Schema('t', (y2, X), 'y', ('x',), positive='yes' * 1000))
    assert '(3,000 characters)' in msg


# --- the data: what the table holds --------------------------------------------------------------------------------

@pytest.mark.parametrize('value, expected', [
    ('', "row 5, column 'y': value is missing (the target"), ('NaN', "row 5, column 'y': value is missing (the target"),
    ('inf', "row 5, column 'y': inf is not a finite number"), ('-Infinity', "row 5, column 'y': -Infinity is not a finite number"),
    ('12 kg', "row 5, column 'y': '12 kg' is not a number"), ('1e300', "row 5, column 'y': 1e300 is beyond ±3.4e+38, the largest number a model holds")])
def test_a_regression_target_that_is_not_a_finite_number_is_refused_with_its_row(tmp_path, value, expected):
    # y is declared nullable (the default): a row to learn from still needs its target
    f = csv(tmp_path, 'y,x,site\n1.5,0.1,a\n2.5,0.2,b\n3.5,0.3,a\n' + f'{value},0.4,b\n')
    refused(lambda: load_table(f, schema=REG), f'{f} {expected}')
    if value in ('', 'NaN'): assert len(load_table(f, require_target=False, schema=REG)) == 4    # rows to predict need no target


def test_a_huge_feature_value_is_refused_before_a_model_casts_it_to_float32(tmp_path):
    f = csv(tmp_path, 'y,x,site\n1,1e39,a\n2,3e38,b\n')
    refused(lambda: load_table(f, schema=REG), f"{f} row 2, column 'x': 1e39 is beyond ±3.4e+38")


def test_a_constant_regression_target_is_refused_before_the_split(tmp_path):
    refused(lambda: check_target(table(40, [7.0] * 40)['y'], REG, 'raw/'), "raw/: target 'y' is 7 in every row; a regression target must vary")
    refused(lambda: T.train_model(table(40, [7.0] * 40), schema=REG), "training data: target 'y' is 7 in every row")


def test_a_binary_target_whose_data_holds_one_class_is_refused_naming_it():
    one = table(30, ['no'] * 30)
    refused(lambda: check_target(one['y'], BIN, 'raw/'), "raw/: target 'y' holds only 'no'; a binary model needs rows of at least two of its classes (no, yes)")
    refused(lambda: T.train_model(one, schema=BIN), "training data: target 'y' holds only 'no'")


def test_a_declared_class_absent_from_a_multiclass_table_is_a_note_and_the_model_still_trains():
    df = table(60, lambda x: np.where(x > 0, 'a', 'b'))
    assert check_target(df['y'], MULTI, 'raw/') == ["class c of 'y' has no row in raw/: the model cannot predict it"]
    assert list(T.train_model(df, n_estimators=5, schema=MULTI).classes_) == ['a', 'b']


def test_a_class_with_a_single_row_cannot_be_stratified_and_says_so():
    df = table(21, ['no'] * 20 + ['yes'])
    refused(lambda: split_table(df, 0.2, schema=BIN), "test_size=0.2 leaves class 'yes' of 'y' (1 rows) with no held-out row; it needs at least 2 rows")


def test_two_hundred_classes_train_and_the_messages_stay_short(tmp_path):
    classes = tuple(f'class_{i:03d}' for i in range(200))
    many = Schema('many', (Column('y', 'category', classes), X, SITE), 'y', ('x', 'site'))
    df = table(1000, [classes[i % 200] for i in range(1000)])
    tr, te = split_table(df, 0.2, schema=many)
    assert (len(tr), len(te)) == (800, 200) and set(te['y']) == set(classes)       # one row of each class held out
    m = T.train_model(tr, n_estimators=3, schema=many)
    assert len(m.classes_) == 200
    from mlproj.evaluate import score_table, metrics_of, write_plots
    scored = score_table(m, te, many)
    report = strict_json(json.dumps(metrics_of(scored, many), allow_nan=False))
    block = report['multiclass_classification_metrics']
    assert len(block['confusion_matrix']) == 200 and all(len(r) == 200 for r in block['confusion_matrix'].values())
    assert write_plots(report, scored, 'multiclass', lambda n: tmp_path / n) == ['confusion_matrix.png', 'per_class.png']
    assert all((tmp_path / n).stat().st_size > 1000 for n in ('confusion_matrix.png', 'per_class.png'))
    f = csv(tmp_path, 'y,x,site\nclass_200,0.1,a\n')
    msg = refused(lambda: load_table(f, schema=many), "unknown category 'class_200' (expected one of class_000,", 'class_009 and 190 more)')
    assert len(msg) < 300


def test_integer_coded_classes_declared_as_text_read_and_train(tmp_path):
    zero_one = Schema('zo', (Column('y', 'category', ('0', '1')), X, SITE), 'y', ('x', 'site'))
    df = load_table(csv(tmp_path, table(40, lambda x: (x > 0).astype(int))), schema=zero_one)
    assert zero_one.task == 'binary' and zero_one.positive_class == '1' and set(df['y']) == {'0', '1'}
    assert list(T.train_model(df, n_estimators=5, schema=zero_one).classes_) == ['0', '1']
    # 1.0 written by a tool that made the column float: not the category '1', and the message says why
    f = csv(tmp_path, 'y,x,site\n0,0.1,a\n1.0,0.2,b\n', 'float.csv')
    refused(lambda: load_table(f, schema=zero_one), "row 3, column 'y': unknown category '1.0' (expected one of 0, 1); categories are matched as text: '1.0' is not '1'")
    # the same 0/1 declared a number is regression: allowed, with a note that says so
    assert check_target(df['y'].astype(float), REG) == ["target 'y' holds only 0 and 1: declared a number, it is learned as regression (declare Column('y', 'category', ('0', '1')) for a binary model)"]


@pytest.mark.parametrize('schema, y', [(REG, [1.0, 2.0, 3.0, 4.0, 5.0]), (BIN, ['no', 'yes', 'no', 'yes', 'no']), (MULTI, ['a', 'b', 'c', 'a', 'b'])])
def test_a_five_row_table_is_refused_at_the_split_for_each_task(schema, y):
    df = table(5, y)
    msg = refused(lambda: split_table(df, 0.2, schema=schema), 'test_size=0.2')
    assert ('holds out 1 row; evaluating a regression needs at least 2 held-out rows (use a table of at least 10 rows' in msg if schema is REG
            else 'with no held-out row' in msg), msg


def test_a_split_that_would_hold_out_nothing_or_everything_is_refused():
    df = table(50, lambda x: np.where(x > 0, 'yes', 'no'))
    refused(lambda: split_table(df, 0.001, schema=BIN), 'test_size=0.001 leaves class', 'with no held-out row')
    refused(lambda: split_table(df, 0.999, schema=BIN), 'test_size=0.999 leaves class', 'with no training row')


def test_duplicate_column_names_in_a_file_are_refused(tmp_path):
    f = csv(tmp_path, 'y,x,x,site\n1,2,3,a\n')
    refused(lambda: load_table(f, schema=REG), "column 'x' appears twice (columns 2 and 3)")


def test_a_table_without_its_target_column_is_refused_for_training_and_scored_for_prediction(tmp_path):
    f = csv(tmp_path, 'x,site\n0.1,a\n')
    refused(lambda: load_table(f, schema=REG), f"{f}: missing column 'y'")
    assert len(load_table(f, require_target=False, schema=REG)) == 1


# --- the estimator cell ----------------------------------------------------------------------------------------------

from sklearn.ensemble import GradientBoostingClassifier, RandomForestClassifier, RandomForestRegressor
from sklearn.linear_model import LogisticRegression, Ridge, RidgeClassifier
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import FunctionTransformer, StandardScaler
from sklearn.svm import LinearSVC


class HouseBoost(GradientBoostingClassifier):
    "A team's own estimator: a type nobody reviewed."


def cell(monkeypatch, make):
    "Replace the estimator cell (`make_estimator`) by `make(task, seed)`."
    monkeypatch.setattr(T, 'make_estimator', lambda task, seed=42, n_estimators=200, max_depth=None: make(task, seed))


def train_and_write(tmp_path, schema=BIN, df=None, seed=42):
    "What the train step does: fit, write model.tar.gz, load it back as every step will; (model, manifest, artifact)."
    df = table(120, lambda x: np.where(x + np.random.default_rng(1).normal(size=len(x)) > 0, 'yes', 'no')) if df is None else df
    m = T.train_model(df, seed=seed, schema=schema)
    dest = tmp_path / 'model.tar.gz'
    T.write_model_artifact(m, dest, {})
    return (*T.check_artifact(dest), dest)


@pytest.mark.parametrize('est, expected', [
    (LinearSVC(), 'returned LinearSVC, which has no predict_proba: a binary model gives class probabilities'),
    (RidgeClassifier(), 'returned RidgeClassifier, which has no predict_proba'),
    (Ridge(), 'returned Ridge, a regressor, for a binary target (a category); return a classifier'),
    (RandomForestClassifier, 'returned the class RandomForestClassifier, not an estimator: call it, RandomForestClassifier(...)')])
def test_an_estimator_that_cannot_serve_a_classification_task_is_refused_before_fitting(monkeypatch, tmp_path, est, expected):
    cell(monkeypatch, lambda task, seed: est)
    refused(lambda: train_and_write(tmp_path), f'make_estimator in nbs/30_train.ipynb {expected}')
    assert not list(tmp_path.iterdir())


def test_the_advice_for_a_classifier_without_probabilities_works(monkeypatch, tmp_path):
    "What the LinearSVC message says to do: wrap it in CalibratedClassifierCV; it trains, loads with the reviewed types and predicts."
    from sklearn.calibration import CalibratedClassifierCV
    from mlproj.inference import predict_task
    cell(monkeypatch, lambda task, seed: CalibratedClassifierCV(LinearSVC(random_state=seed)))
    m, manifest, _ = train_and_write(tmp_path)
    pred = predict_task(m, table(20, ['no'] * 20), BIN)
    assert type(m[-1]).__name__ == 'CalibratedClassifierCV' and pred['proba_yes'].between(0, 1).all() and pred['proba_yes'].nunique() > 1


def test_a_classifier_declared_for_a_number_is_refused(monkeypatch, tmp_path):
    cell(monkeypatch, lambda task, seed: LogisticRegression())
    refused(lambda: train_and_write(tmp_path, REG, table(60, lambda x: 2 * x)), 'returned LogisticRegression, a classifier, for a regression target (a number); return a regressor')


def test_an_estimator_that_is_a_pipeline_of_its_own_trains_loads_and_predicts(monkeypatch, tmp_path):
    cell(monkeypatch, lambda task, seed: make_pipeline(StandardScaler(), LogisticRegression(random_state=seed)))
    m, manifest, _ = train_and_write(tmp_path)
    from mlproj.inference import predict_task
    pred = predict_task(m, table(10, ['no'] * 10), BIN)
    assert list(pred.columns) == ['predicted_y', 'proba_no', 'proba_yes'] and manifest['task'] == 'binary'


def test_a_lambda_in_the_estimator_is_refused_saying_why_allowing_it_cannot_help(monkeypatch, tmp_path):
    cell(monkeypatch, lambda task, seed: make_pipeline(FunctionTransformer(lambda x: x * 2), LogisticRegression()))
    refused(lambda: train_and_write(tmp_path), 'test_hostile_tasks.<lambda>, a function without a name of its own (a lambda, or one defined inside another): '
            'skops stores functions by name and could not find it again; define it with def')


def test_an_estimator_without_random_state_still_trains_to_the_same_bytes(monkeypatch, tmp_path):
    "The train step's seed fills every random_state the cell leaves unset: same data and seed, same model; another seed, another."
    cell(monkeypatch, lambda task, seed: RandomForestClassifier(n_estimators=10))     # no random_state: sklearn would draw one
    df = table(120, lambda x: np.where(x > 0, 'yes', 'no'))
    a, b, c = (T.model_bytes(T.train_model(df, seed=s, schema=BIN)) for s in (7, 7, 8))
    assert a == b, 'the same seed and data gave different model bytes: an unseeded random_state was left in the estimator'
    assert a != c, 'the seed did not reach the estimator'
    cell(monkeypatch, lambda task, seed: RandomForestRegressor(n_estimators=5, random_state=3))     # one the cell set is kept
    assert T.train_model(table(60, lambda x: 2 * x), seed=9, schema=REG)[-1].random_state == 3


def test_k_nearest_neighbours_load_by_brute_force_their_trees_are_named_and_a_huge_artifact_is_refused(monkeypatch, tmp_path):
    cell(monkeypatch, lambda task, seed: KNeighborsClassifier(algorithm='brute'))
    m, _, art = train_and_write(tmp_path)
    assert type(m[-1]).__name__ == 'KNeighborsClassifier'
    cell(monkeypatch, lambda task, seed: KNeighborsClassifier(algorithm='kd_tree'))
    refused(lambda: train_and_write(tmp_path), 'no step could load it: sklearn.metrics._dist_metrics.EuclideanDistance64, sklearn.neighbors._kd_tree.KDTree')
    cell(monkeypatch, lambda task, seed: KNeighborsClassifier(algorithm='brute'))   # it keeps every training row: the artifact grows with the table
    monkeypatch.setattr(T, 'MAX_MODEL_BYTES', art.stat().st_size)
    refused(lambda: train_and_write(tmp_path, df=table(600, lambda x: np.where(x > 0, 'yes', 'no'))),
            'the trained model is', 'over the', 'every step loads (MAX_MODEL_BYTES); an estimator that keeps its training rows (k-nearest neighbours) grows with the table')


def test_a_type_nobody_reviewed_is_refused_naming_it_and_the_cell(monkeypatch, tmp_path):
    cell(monkeypatch, lambda task, seed: HouseBoost(n_estimators=5, random_state=seed))
    refused(lambda: train_and_write(tmp_path), 'no step could load it: test_hostile_tasks.HouseBoost; after reviewing that they hold data and run no code, '
            'add their exact names to ESTIMATOR_TRUSTED_TYPES, beside make_estimator in nbs/30_train.ipynb')
    monkeypatch.setattr(T, 'TRUSTED_TYPES', T.TRUSTED_TYPES + ['test_hostile_tasks.HouseBoost'])   # allowed, as the cell would
    m, _, _ = train_and_write(tmp_path)
    assert type(m[-1]).__name__ == 'HouseBoost'


# --- metrics that are undefined: Model Monitor's "NaN", never a bare NaN ------------------------------------------------

def test_regression_metrics_of_constant_predictions_and_of_a_constant_target_are_json():
    from mlproj.evaluate import compute_metrics, metric_value
    doc = compute_metrics(np.arange(250.0), np.full(250, 3.0), 'regression')        # constant predictions: R² defined (and bad)
    r = strict_json(json.dumps(doc, allow_nan=False))['regression_metrics']
    assert r['r2']['value'] < 0 and isinstance(r['r2']['standard_deviation'], float)
    doc = compute_metrics(np.full(250, 5.0), np.full(250, 5.0), 'regression')          # a constant target: R² undefined
    r = strict_json(json.dumps(doc, allow_nan=False))['regression_metrics']
    assert r['r2'] == {'value': 'NaN', 'standard_deviation': 'NaN'} and r['rmse'] == {'value': 0.0, 'standard_deviation': 0.0}
    refused(lambda: metric_value(doc, 'regression_metrics.r2.value', 'evaluation.json'), 'evaluation.json: regression_metrics.r2.value is NaN, undefined on these rows')


def test_binary_metrics_of_rows_of_one_class_are_json_with_auc_nan_and_empty_curves():
    from mlproj.evaluate import compute_metrics
    doc = compute_metrics(['no'] * 250, ['no'] * 240 + ['yes'] * 10, 'binary', ['no', 'yes'], np.linspace(0, 0.6, 250), 'yes')
    b = strict_json(json.dumps(doc, allow_nan=False))['binary_classification_metrics']
    assert b['auc']['value'] == 'NaN' and b['confusion_matrix'] == {'0': {'0': 240, '1': 10}, '1': {'0': 0, '1': 0}}
    assert b['receiver_operating_characteristic_curve'] == {'false_positive_rates': [], 'true_positive_rates': []}
    assert all(v['value'] == 'NaN' or math.isfinite(v['value']) for k, v in b.items() if isinstance(v, dict) and 'value' in v)


def test_evaluate_and_monitor_of_a_constant_regressor_and_of_one_class_rows_write_strict_json(tmp_path, monkeypatch):
    "The steps themselves (entry functions, explicit folders): every file they write parses without NaN or Infinity."
    monkeypatch.setenv('MLPROJ_OPT_ML', str(tmp_path / 'opt_ml'))            # the exit message the monitor writes goes there
    from sklearn.dummy import DummyRegressor
    from mlproj import steps
    from mlproj.monitor import suggest_baseline
    cases = [('reg', REG, table(240, lambda x: 3 * x + 1), None, lambda: DummyRegressor()),
             ('bin', BIN, table(240, lambda x: np.where(x > 0, 'yes', 'no')), lambda d: d[d['y'] == 'no'], lambda: RandomForestClassifier(n_estimators=5, random_state=0))]
    for name, schema, df, rows, est in cases:
        base = tmp_path / name
        cell(monkeypatch, lambda task, seed: est())
        m = T.train_model(df, schema=schema)
        (base / 'model').mkdir(parents=True); T.write_model_artifact(m, base / 'model/model.tar.gz', {}, suggest_baseline(df, schema))
        (base / 'rows').mkdir(); (rows(df) if rows else df).to_csv(base / 'rows/rows.csv', index=False)
        steps.evaluate(model=base / 'model', test=base / 'rows', evaluation=base / 'evaluation')
        steps.batch_inference(model=base / 'model', data=base / 'rows', predictions=base / 'predictions')
        steps.monitor(model=base / 'model', data=base / 'rows', predictions=base / 'predictions', evaluation=base / 'evaluation', monitoring=base / 'monitoring')
        written = sorted((base / 'evaluation').glob('*.json')) + sorted((base / 'monitoring').rglob('*.json'))
        assert len(written) >= 5, written
        for f in written: strict_json(f.read_text())
        quality = strict_json((base / 'monitoring/model_quality/statistics.json').read_text())
        if name == 'reg': assert quality['regression_metrics']['r2']['value'] <= 0       # a constant predicts no variation
        else: assert quality['binary_classification_metrics']['auc']['value'] == 'NaN'  # labels of one class: AUC undefined


# --- the runtime scripts: the contract on failure --------------------------------------------------------------------

def penguin_rows(src, keep) -> str:
    df = pd.read_csv(src, dtype=str, keep_default_na=False)
    return df[keep(df)].to_csv(index=False)


@pytest.mark.parametrize('keep, expected', [
    (lambda d: d['species'] == 'Adelie', ": target 'species' holds only 'Adelie'; a multiclass model needs rows of at least two of its classes (Adelie, Chinstrap, Gentoo)"),
    (lambda d: d.index.isin(d.groupby('species').head(2).index), "test_size=0.2 leaves class 'Adelie' of 'species' (2 rows) with no held-out row")])
def test_preprocess_refuses_a_table_it_cannot_split_by_the_contract(opt_ml_tree, opt_ml_penguins, opt_ml_assert_failed, keep, expected):
    opt_ml_tree.stage_text('raw', 'raw.csv', penguin_rows(opt_ml_penguins, keep))
    line = opt_ml_assert_failed(opt_ml_tree.run('preprocess'), opt_ml_tree, 'preprocess', [opt_ml_tree.output('train'), opt_ml_tree.output('test')])
    assert expected in line, line


def test_train_refuses_a_training_split_of_one_class_by_the_contract(opt_ml_tree, opt_ml_penguins, opt_ml_assert_failed):
    opt_ml_tree.stage_text('train', 'train.csv', penguin_rows(opt_ml_penguins, lambda d: d['species'] == 'Gentoo'))
    line = opt_ml_assert_failed(opt_ml_tree.run('train', '--n_estimators', 5), opt_ml_tree, 'train', [opt_ml_tree.output('model')])
    assert "train: training data: target 'species' holds only 'Gentoo'" in line, line


# --- end to end, in copies of the project ----------------------------------------------------------------------------

DIABETES_DECLARATION = '''#| export
SCHEMA = Schema(
    name='diabetes',
    columns=(
        Column('patient', 'id', nullable=False),
        Column('progression', 'number'),
        Column('clinic', 'category', ('east', 'west', 'north')),
        Column('age', 'number', lo=0, hi=120), Column('sex', 'category', ('f', 'm')), Column('bmi', 'number', lo=10, hi=70),
        Column('bp', 'number'), Column('s1', 'number'), Column('s5', 'number'),
    ),
    target='progression',
    features=('clinic', 'age', 'sex', 'bmi', 'bp', 's1', 's5'),
    id='patient',
    data_file='diabetes.csv',
)'''

CONSTANT_ESTIMATOR = '''#| export
from sklearn.dummy import DummyClassifier, DummyRegressor

def make_estimator(task:str, seed:int=42, n_estimators:int=200, max_depth:int|None=None):
    "A model that predicts one value whatever the row."
    return DummyRegressor() if task == 'regression' else DummyClassifier(strategy='prior')

ESTIMATOR_TRUSTED_TYPES = []'''


def diabetes_csv(dest: Path) -> pd.DataFrame:
    "scikit-learn's bundled diabetes table (442 rows, unscaled), with a patient id and a clinic added."
    from sklearn.datasets import load_diabetes
    d = load_diabetes(as_frame=True, scaled=False).frame
    df = pd.DataFrame({'patient': [f'd{i:03d}' for i in range(len(d))], 'progression': d['target'],
                       'clinic': np.array(['east', 'west', 'north'])[np.arange(len(d)) % 3], 'age': d['age'],
                       'sex': np.where(d['sex'] == 1, 'f', 'm'), 'bmi': d['bmi'], 'bp': d['bp'], 's1': d['s1'], 's5': d['s5']})
    df.to_csv(dest, index=False)
    return df


@pytest.fixture(scope='module')
def constant_project(tmp_path_factory, project_copy):
    "A copy of the project with the diabetes table declared and an estimator cell returning a constant predictor."
    kept = {}
    return project_copy(tmp_path_factory.mktemp('constant'),
                        edits=[('10_data.ipynb', '#| export\nSCHEMA = Schema(', DIABETES_DECLARATION), ('30_train.ipynb', 'def make_estimator(', CONSTANT_ESTIMATOR)],
                        assets={'mlproj/assets/diabetes.csv': lambda p: kept.setdefault('table', diabetes_csv(p))})


def test_a_constant_regressor_runs_end_to_end_and_every_json_it_writes_is_strict(constant_project):
    p = constant_project
    r = p.run('run', '--engine', 'script', '--run-id', 'const', '-p', 'gate.threshold=-1')
    assert r.returncode == 0, r.stderr[-3000:]
    rec = json.loads(r.stdout)
    assert rec['status'] == 'Completed' and rec['gate']['metric'] == 'regression_metrics.r2.value' and rec['gate']['value'] <= 0, rec.get('gate')
    run = p.work / 'outputs/const'
    pred = pd.read_csv(run / 'batch_inference/predictions/predictions-algo-1.csv')
    assert len(pred) == 442 and pred['predicted_progression'].nunique() == 1
    written = sorted(run.rglob('*.json'))
    assert any(f.name == 'evaluation.json' for f in written) and any('model_quality' in f.parts for f in written)
    for f in written: strict_json(f.read_text())


@pytest.mark.parametrize('rows, expected', [
    ('progression,age,bmi\n', "missing column"),
    ('inf', "column 'progression': inf is not a finite number"),
    ('constant', "target 'progression' is 100 in every row; a regression target must vary")])
def test_preprocess_jobs_of_a_bad_regression_table_fail_in_one_line_and_write_nothing(constant_project, tmp_path, rows, expected):
    p, df = constant_project, pd.read_csv(constant_project.src / 'mlproj/assets/diabetes.csv')
    f = tmp_path / 'raw.csv'
    if rows == 'inf': df.assign(progression=df['progression'].astype(str).where(df.index != 7, 'inf')).to_csv(f, index=False)
    elif rows == 'constant': df.assign(progression=100).to_csv(f, index=False)
    else: f.write_text(rows + 'x\n')
    r = p.run('job', 'run', 'preprocess', '--engine', 'script', '--input', f'raw={f}')
    assert r.returncode == 1, r.stderr[-2000:]
    d = json.loads(r.stdout)
    assert d['ProcessingJobStatus'] == 'Failed' and expected in d['ExitMessage'] and '\n' not in d['ExitMessage'], d['ExitMessage']
    assert 'Traceback' not in r.stderr
    for o in d['ProcessingOutputConfig']['Outputs']:
        out = Path(o['S3Output']['S3Uri'].removeprefix('file://'))
        assert not out.exists() or not any(out.rglob('*')), f'{out} written by a failed job'


def test_a_declaration_that_cannot_be_stops_the_cli_in_one_line_before_any_job(tmp_path_factory, project_copy):
    bad = DIABETES_DECLARATION.replace("Column('progression', 'number')", "Column('progression', 'category', ('low', 'high'))").replace(
        "data_file='diabetes.csv',", "data_file='diabetes.csv',\n    positive='medium',")
    p = project_copy(tmp_path_factory.mktemp('baddecl'), edits=[('10_data.ipynb', '#| export\nSCHEMA = Schema(', bad)])
    for argv in (('run',), ('job', 'run', 'preprocess')):
        r = p.run(*argv)
        assert r.returncode == 2 and 'Traceback' not in r.stderr, r.stderr[-2000:]
        assert r.stderr.strip().splitlines() == ["mlproj: error: schema diabetes: positive='medium' must be one of the two classes of a binary target (low, high)"], r.stderr
        assert not (p.work / 'outputs').exists() or not any((p.work / 'outputs').iterdir())
