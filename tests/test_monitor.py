"""Data-quality monitoring: the baseline travels in the model, the monitor step flags each kind of drift and broken data
on its feature and nothing else, N instances merge to exactly one, and the files have Model Monitor's field structure
(pinned by real Model Monitor outputs in tests/fixtures/monitor/)."""
import json
from pathlib import Path
import numpy as np
import pandas as pd
import pytest

FIXTURES = Path(__file__).parent/'fixtures'/'monitor'


def run_monitor(tree, model, frame_or_path, *args, name='rows.csv'):
    "Stage the model and the rows in a fresh /opt/ml tree and run the monitor's runtime script."
    tree.stage('model', model)
    if isinstance(frame_or_path, pd.DataFrame): tree.stage_text('data', name, frame_or_path.to_csv(index=False))
    else: tree.stage('data', frame_or_path)
    return tree.run('monitor', *args)


def violations_of(tree) -> list:
    return json.loads((tree.output('monitoring')/'constraint_violations.json').read_text())['violations']


def kinds(violations) -> set:
    return {(v['feature_name'], v['constraint_check_type']) for v in violations}


# --- the baseline in the model ---------------------------------------------------------------------------------

def test_the_model_carries_its_baseline_named_by_the_manifest(opt_ml_trained):
    from mlproj.train import load_model, load_baseline
    import tarfile, hashlib
    _, manifest = load_model(opt_ml_trained['model'])
    base = load_baseline(opt_ml_trained['model'])
    assert sorted(manifest['baseline']) == ['constraints.json', 'statistics.json']
    with tarfile.open(opt_ml_trained['model']) as tar:
        for n, digest in manifest['baseline'].items():
            assert hashlib.sha256(tar.extractfile(n).read()).hexdigest() == digest
    train = pd.read_csv(opt_ml_trained['train_csv'])
    assert base['statistics.json']['dataset']['item_count'] == len(train)        # from the training split, not the whole table
    assert [f['name'] for f in base['constraints.json']['features']] == manifest['features']


# --- formats, against real Model Monitor outputs ----------------------------------------------------------------

def shape(x):
    "The field structure of a JSON value: keys and value types, lists by their first item."
    if isinstance(x, dict): return {k: shape(v) for k, v in x.items()}
    if isinstance(x, list): return [shape(x[0])] if x else []
    return type(x).__name__


def test_statistics_constraints_and_violations_have_model_monitor_fields(opt_ml_trained, opt_ml_tree):
    from mlproj.train import load_baseline
    base = load_baseline(opt_ml_trained['model'])
    stats, cons = base['statistics.json'], base['constraints.json']
    real_num = json.loads((FIXTURES/'statistics_numeric.json').read_text())
    real_str = json.loads((FIXTURES/'statistics_string.json').read_text())
    real_cons = json.loads((FIXTURES/'constraints_numeric.json').read_text())
    real_viol = json.loads((FIXTURES/'constraint_violations.json').read_text())
    # top level
    assert shape({k: v for k, v in stats.items() if k != 'features'}) == shape({k: v for k, v in real_num.items() if k != 'features'})
    # a numeric feature: the same fields and types, except the KLL sketch (mlproj's buckets are exact counts, not a sketch)
    ours_num = next(f for f in stats['features'] if f['name'] == 'bill_length_mm')
    theirs_num = json.loads(json.dumps(real_num['features'][0]))
    del theirs_num['numerical_statistics']['distribution']['kll']['sketch']
    assert shape(ours_num) == shape(theirs_num)
    # a string feature
    ours_str = next(f for f in stats['features'] if f['name'] == 'island')
    assert shape(ours_str) == shape(real_str['features'][0])
    # constraints: every field of the real file, the same types; mlproj adds only the SDK's categorical drift settings
    theirs_c, ours_c = shape(real_cons), shape(cons)
    assert cons['version'] == real_cons['version']
    real_str_c = json.loads((FIXTURES/'constraints_string.json').read_text())
    island_c = next(f for f in cons['features'] if f['name'] == 'island')
    assert shape(island_c) == shape(real_str_c['features'][1])                   # a string feature's constraint, as Model Monitor writes it
    num_c = next(f for f in cons['features'] if f['name'] == 'bill_length_mm')
    assert shape(num_c) == shape(real_cons['features'][0])
    mc_theirs, mc_ours = theirs_c['monitoring_config'], ours_c['monitoring_config']
    dc_theirs, dc_ours = mc_theirs.pop('distribution_constraints'), mc_ours.pop('distribution_constraints')
    assert mc_ours == mc_theirs
    assert {k: v for k, v in dc_ours.items() if k in dc_theirs} == dc_theirs
    assert set(dc_ours) - set(dc_theirs) == {'categorical_comparison_threshold', 'categorical_drift_method'}
    # violations, from a run with some
    fresh = __import__('mlproj.data', fromlist=['x']).synthetic_penguins(200, seed=1).drop(columns=['sex'])
    p = run_monitor(opt_ml_tree, opt_ml_trained['model'], fresh)
    assert p.returncode == 0, p.stderr
    doc = json.loads((opt_ml_tree.output('monitoring')/'constraint_violations.json').read_text())
    assert doc['violations'] and shape(doc) == shape(real_viol)
    real_kinds = {v['constraint_check_type'] for v in real_viol['violations']}
    from mlproj.monitor import CHECK_TYPES
    assert real_kinds <= set(CHECK_TYPES)


# --- no violations on data like the training data ---------------------------------------------------------------

@pytest.mark.parametrize('which', ['bundled', 'synthetic'])
def test_data_like_the_training_data_has_no_violations(opt_ml_trained, opt_ml_tree, opt_ml_penguins, which):
    from mlproj.data import synthetic_penguins
    rows = opt_ml_penguins if which == 'bundled' else synthetic_penguins(3000, seed=2024)
    p = run_monitor(opt_ml_tree, opt_ml_trained['model'], rows)
    assert p.returncode == 0, p.stderr
    s = opt_ml_tree.check_ok_stdout(p, 'monitor')
    assert (s['outcome'], s['violations'], s['by_kind']) == ('Completed', 0, {}), violations_of(opt_ml_tree)
    assert violations_of(opt_ml_tree) == []
    assert opt_ml_tree.message.read_text() == 'Completed: Job completed successfully with no violations.'
    stats = json.loads((opt_ml_tree.output('monitoring')/'statistics.json').read_text())
    assert stats['dataset']['item_count'] == s['rows'] == (344 if which == 'bundled' else 3000)


# --- each drift flagged on its feature, nothing else ------------------------------------------------------------

def _drifts():
    n = 1000
    ix = np.arange(n)
    return {
        'shifted mean':      (lambda d: d.assign(bill_length_mm=d.bill_length_mm + 6), {('bill_length_mm', 'baseline_drift_check')}),
        'category mix':      (lambda d: d.assign(island=np.where(ix % 3 == 0, 'Biscoe', 'Torgersen')), {('island', 'baseline_drift_check')}),
        'all missing':       (lambda d: d.assign(bill_depth_mm=np.nan), {('bill_depth_mm', 'completeness_check')}),
        'unit x1000':        (lambda d: d.assign(flipper_length_mm=d.flipper_length_mm * 1000),
                              {('flipper_length_mm', 'baseline_drift_check'), ('flipper_length_mm', 'range_check')}),
        'new category':      (lambda d: d.assign(sex=np.where(ix % 25 == 0, 'unknown', d.sex)), {('sex', 'categorical_values_check')}),
        'missing column':    (lambda d: d.drop(columns=['body_mass_g']), {('body_mass_g', 'missing_column_check')}),
        'extra column':      (lambda d: d.assign(tag='x'), {('tag', 'extra_column_check')}),
    }


@pytest.mark.parametrize('case', list(_drifts()))
def test_each_drift_is_flagged_on_its_feature_and_nothing_else(opt_ml_trained, opt_ml_tree, case):
    from mlproj.data import synthetic_penguins
    make, expected = _drifts()[case]
    p = run_monitor(opt_ml_tree, opt_ml_trained['model'], make(synthetic_penguins(1000, seed=77)))
    assert p.returncode == 0, p.stderr                          # violations do not fail the job by default
    v = violations_of(opt_ml_tree)
    assert kinds(v) == expected, v
    s = opt_ml_tree.check_ok_stdout(p, 'monitor')
    assert s['outcome'] == 'CompletedWithViolations' and s['violations'] == len(v) == len(expected)
    line = [l for l in p.stderr.splitlines() if 'violation(s)' in l][-1]          # one log line, counts by kind
    for kind in {k for _, k in expected}: assert f'{kind} 1' in line, line
    assert opt_ml_tree.message.read_text() == f'CompletedWithViolations: Job completed successfully with {len(v)} violations.'


# --- broken rows: what batch inference refuses, the monitor counts ----------------------------------------------

def test_rows_batch_inference_refuses_are_violations_with_counts(opt_ml_trained, opt_ml_tree, opt_ml_tree_factory, opt_ml_assert_failed, tmp_path):
    from mlproj.data import synthetic_penguins
    d = synthetic_penguins(400, seed=9).astype(object)
    d.loc[[5, 6, 7], 'bill_depth_mm'] = 'n/a?'                   # text in a numeric column
    d.loc[[10, 11], 'island'] = 'Atlantis'                      # unknown category
    d.loc[[20], 'flipper_length_mm'] = 999.0                    # outside the plausible range
    tree = opt_ml_tree
    tree.stage('model', opt_ml_trained['model'])
    tree.stage_text('data', 'a.csv', d.iloc[:300].to_csv(index=False))
    tree.stage_text('data', 'b.csv', d.iloc[300:].drop(columns=['sex']).to_csv(index=False))   # a file without a column
    p = tree.run('monitor')
    assert p.returncode == 0, p.stderr
    v = {(x['feature_name'], x['constraint_check_type']): x['description'] for x in violations_of(tree)}
    assert set(v) == {('bill_depth_mm', 'data_type_check'), ('island', 'categorical_values_check'),
                      ('flipper_length_mm', 'range_check'), ('sex', 'missing_column_check')}, v
    assert "3 of " in v[('bill_depth_mm', 'data_type_check')] and "(first: a.csv row 7: 'n/a?')" in v[('bill_depth_mm', 'data_type_check')]
    assert "2 of " in v[('island', 'categorical_values_check')] and "'Atlantis' (2)" in v[('island', 'categorical_values_check')]
    from mlproj.data import SCHEMA
    col = SCHEMA.column('flipper_length_mm')
    assert f'1 value(s) outside the plausible range [{col.lo:g}, {col.hi:g}]' in v[('flipper_length_mm', 'range_check')]
    assert 'column missing from 1 of 2 file(s) (first: b.csv)' in v[('sex', 'missing_column_check')]
    # the same rows make batch inference fail: that is what the monitor is for
    bi = opt_ml_tree_factory(tmp_path/'bi')
    bi.stage('model', opt_ml_trained['model']); bi.stage_text('data', 'a.csv', d.iloc[:300].to_csv(index=False))
    line = opt_ml_assert_failed(bi.run('batch_inference'), bi, 'batch_inference', [bi.output('predictions')])
    assert "a.csv row 12, column 'island': unknown category 'Atlantis'" in line, line   # the first bad column's first bad cell (row 1 is the header)


def test_fail_on_violation_fails_with_the_first_violation(opt_ml_trained, opt_ml_tree):
    from mlproj.data import synthetic_penguins
    d = synthetic_penguins(500, seed=3)
    d['body_mass_g'] = d['body_mass_g'] / 1000
    p = run_monitor(opt_ml_tree, opt_ml_trained['model'], d, '--fail_on_violation', 'true')
    assert p.returncode == 1 and 'Traceback' not in p.stderr
    line = opt_ml_tree.last_line(p.stderr)
    first = violations_of(opt_ml_tree)[0]
    assert line.startswith(f"monitor: {first['feature_name']}: {first['constraint_check_type']}: {first['description']}")
    assert opt_ml_tree.message.read_text() == line
    assert '"status": "ok"' not in p.stdout


@pytest.mark.parametrize('bad', ['empty', 'not utf-8', 'not csv'])
def test_unreadable_input_gets_batch_inference_s_one_line_error(opt_ml_trained, opt_ml_tree_factory, tmp_path, bad):
    name, data = {'empty': ('rows.csv', b''), 'not utf-8': ('rows.csv', 'island,bill_length_mm\nDr\u00e9am,40\n'.encode('latin-1')),
                  'not csv': ('rows.txt', b'island\nDream\n')}[bad]
    lines = {}
    for step in ('batch_inference', 'monitor'):
        t = opt_ml_tree_factory(tmp_path/step)
        t.stage('model', opt_ml_trained['model']); t.stage_text('data', name, data)
        p = t.run(step)
        assert p.returncode == 1 and 'Traceback' not in p.stderr, p.stderr
        lines[step] = t.last_line(p.stderr)
        assert t.message.read_text() == lines[step]
        assert t.files_under(t.output('monitoring' if step == 'monitor' else 'predictions')) == []
    assert lines['monitor'].removeprefix('monitor: ') == lines['batch_inference'].removeprefix('batch_inference: ').replace(
        str(tmp_path/'batch_inference'), str(tmp_path/'monitor')), lines


# --- jobs: three instances equal one; defaults like batch inference ---------------------------------------------

def test_three_instances_merge_to_exactly_one(cli, opt_ml_trained, tmp_path):
    from mlproj import monitor as mon
    from mlproj.data import synthetic_penguins
    from mlproj.train import load_baseline
    data, empty = tmp_path/'data', tmp_path/'no-predictions'
    data.mkdir(); empty.mkdir()
    d = synthetic_penguins(1800, seed=5).astype(object)
    d.loc[[100, 1500], 'bill_length_mm'] = 'oops'; d.loc[[900], 'island'] = 'Atlantis'
    for i in range(6): d.iloc[i * 300:(i + 1) * 300].to_csv(data/f'part-{i}.csv', index=False)
    runs = {}
    for n in (1, 3):
        code, out, err = cli('job', 'run', 'monitor', '--engine', 'script', '--instance-count', n, '--name', f'mon-{n}', '--input', f'data={data}',
                             '--input', f"model={opt_ml_trained['model']}", '--input', f'predictions={empty}', '-p', 'chunksize=128')
        assert code == 0, err[-3000:]
        assert 'ShardedByS3Key: 2, 2, 2' in err or n == 1, err[-2000:]
        runs[n] = tmp_path/f'outputs/mon-{n}/monitoring'
    assert sorted(p.name for p in runs[3].iterdir()) == sorted(f'{k}-algo-{h}.json' for k in ('summary', 'statistics', 'constraint_violations') for h in (1, 2, 3))
    parts = [json.loads((runs[3]/f'summary-algo-{h}.json').read_text()) for h in (3, 1, 2)]
    merged = mon.merge_summaries(mon.merge_summaries(parts[0], parts[1]), parts[2])
    one = json.loads((runs[1]/'summary-algo-1.json').read_text())
    assert merged == one                                         # exact: counts, sums to the last bit, examples
    base, schema = load_baseline(opt_ml_trained['model']), None
    from mlproj.train import load_model, model_schema
    schema = model_schema(load_model(opt_ml_trained['model'])[1])
    res = mon.finish(merged, base, schema)
    assert res['statistics'] == json.loads((runs[1]/'statistics.json').read_text())
    assert res['violations'] == json.loads((runs[1]/'constraint_violations.json').read_text())['violations']
    assert kinds(res['violations']) == {('bill_length_mm', 'data_type_check'), ('island', 'categorical_values_check')}


def test_monitor_job_defaults_the_model_to_the_newest_train_job(cli, opt_ml_trained, tmp_path):
    from mlproj.data import synthetic_penguins
    code, _, err = cli('job', 'run', 'train', '--engine', 'script', '--input', f"train={opt_ml_trained['train_csv']}", '-p', 'n_estimators=10', '--name', 'tr')
    assert code == 0, err[-2000:]
    code, _, err = cli('job', 'run', 'batch_inference', '--engine', 'script', '--name', 'bi')
    assert code == 0, err[-2000:]
    drifted = synthetic_penguins(600, seed=8)
    drifted['island'] = 'Torgersen'
    drifted.to_csv(tmp_path/'drifted.csv', index=False)
    code, out, err = cli('job', 'run', 'monitor', '--input', f'data={tmp_path}/drifted.csv', '--name', 'mon')      # notebook engine: the report
    assert code == 0, err[-3000:]
    d = json.loads(out)
    assert d['ProcessingJobStatus'] == 'Completed'
    assert d['ExitMessage'] == 'algo-1: CompletedWithViolations: Job completed successfully with 1 violations.'
    ins = {i['InputName']: i['S3Input']['S3Uri'] for i in d['ProcessingInputs']}
    assert ins['model'].endswith('/outputs/tr/model') and ins['predictions'].endswith('/outputs/bi/predictions')
    assert 'predictions (344 rows) are not of these rows (600)' in err          # the newest predictions are of other rows: not used
    out_dir = tmp_path/'outputs/mon'
    assert sorted(p.name for p in (out_dir/'monitoring').iterdir()) == ['constraint_violations.json', 'statistics.json', 'summary-algo-1.json']
    assert kinds(json.loads((out_dir/'monitoring/constraint_violations.json').read_text())['violations']) == {('island', 'baseline_drift_check')}
    assert sorted(p.name for p in (out_dir/'report').iterdir()) == ['monitor.html', 'monitor.ipynb']
    html = (out_dir/'report/monitor.html').read_text()
    assert 'baseline_drift_check' in html and 'image/png' in html


def test_predictions_of_a_sharded_run_are_checked_on_the_merge(cli, opt_ml_trained, tmp_path):
    from mlproj import monitor as mon
    from mlproj.data import synthetic_penguins
    from mlproj.train import load_baseline, load_model, model_schema
    data = tmp_path/'data'; data.mkdir()
    d = synthetic_penguins(900, seed=6)
    for i in range(3): d.iloc[i * 300:(i + 1) * 300].to_csv(data/f'part-{i}.csv', index=False)
    model = f"model={opt_ml_trained['model']}"
    code, _, err = cli('job', 'run', 'batch_inference', '--engine', 'script', '--instance-count', 3, '--name', 'bi3', '--input', f'data={data}', '--input', model)
    assert code == 0, err[-2000:]
    preds = tmp_path/'outputs/bi3/predictions'
    for n in (1, 3):
        code, _, err = cli('job', 'run', 'monitor', '--engine', 'script', '--instance-count', n, '--name', f'mon-{n}', '--input', f'data={data}',
                           '--input', model, '--input', f'predictions={preds}')
        assert code == 0, err[-2000:]
    parts = [json.loads((tmp_path/f'outputs/mon-3/monitoring/summary-algo-{h}.json').read_text()) for h in (1, 2, 3)]
    merged = mon.merge_summaries(mon.merge_summaries(parts[0], parts[1]), parts[2])
    res = mon.finish(merged, load_baseline(opt_ml_trained['model']), model_schema(load_model(opt_ml_trained['model'])[1]))
    assert res['notes'] == [] and res['drift'][-1]['feature'] == 'predicted_species'       # the predictions are of the merged rows
    one = json.loads((tmp_path/'outputs/mon-1/monitoring/statistics.json').read_text())
    assert res['statistics'] == one and one['features'][-1]['name'] == 'predicted_species'
    assert one['features'][-1]['string_statistics']['common']['num_present'] == 900


# --- values at the float limits ----------------------------------------------------------------------------------

def _reference_std(values) -> float:
    "Population standard deviation of floats, computed exactly in fractions and rooted in 80-digit decimals."
    from decimal import Decimal, getcontext
    from fractions import Fraction
    getcontext().prec = 80
    exact = [Fraction(v) for v in values]
    mean = sum(exact) / len(exact)
    var = sum((v - mean) ** 2 for v in exact) / len(exact)
    return float((Decimal(var.numerator) / Decimal(var.denominator)).sqrt())


@pytest.mark.parametrize('case', ['one 1e200', 'a third at -1e308', 'mixed 1e155..1e308'])
def test_values_at_the_float_limits_are_counted_and_reported(opt_ml_trained, opt_ml_tree, case):
    "One 1e200 failed the job with OverflowError; squares past 1.3e154 overflowed to a std_dev of 0.0. Now: counted, checked, exact."
    from mlproj.data import synthetic_penguins
    d = synthetic_penguins(600, seed=31)
    d = d[d.body_mass_g.notna()].reset_index(drop=True)
    mass = d.body_mass_g.to_numpy().copy()
    if case == 'one 1e200': mass[5] = 1e200
    elif case == 'a third at -1e308': mass[::3] = -1e308
    else: mass[::3] = np.resize([1e155, -1e155, 3.3e200, 1.7976931348623157e308, -2e307], len(mass[::3]))
    d['body_mass_g'] = mass
    p = run_monitor(opt_ml_tree, opt_ml_trained['model'], d)
    assert p.returncode == 0, p.stderr[-2000:]
    v = violations_of(opt_ml_tree)
    huge = int((np.abs(mass) > 8000).sum())
    expected = {('body_mass_g', 'range_check')} | ({('body_mass_g', 'baseline_drift_check')} if huge > 1 else set())
    assert kinds(v) == expected, v
    rng = next(x for x in v if x['constraint_check_type'] == 'range_check')['description']
    assert f'{huge} value(s) outside the plausible range [1500, 8000]' in rng, rng
    text = (opt_ml_tree.output('monitoring')/'statistics.json').read_text()
    assert 'Infinity' not in text and 'NaN' not in text
    f = next(x for x in json.loads(text)['features'] if x['name'] == 'body_mass_g')['numerical_statistics']
    assert f['common']['num_present'] == len(mass) and (f['min'], f['max']) == (mass.min(), mass.max())
    assert sum(b['count'] for b in f['distribution']['kll']['buckets']) == len(mass)
    ref = _reference_std(mass)
    assert abs(f['std_dev'] - ref) <= ref * 1e-15, (f['std_dev'], ref)
    from fractions import Fraction
    assert f['mean'] == float(sum(Fraction(x) for x in mass) / len(mass))
