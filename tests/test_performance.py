"""Using every core changes how fast a step runs, never what it writes: the runtime scripts on one core
(`MLPROJ_CPUS=1`) and on every core the container may use give the same bytes. Speed itself is measured in
bench/, not here."""
import re
import pandas as pd


def _cores(stderr: str) -> int:
    "The core count the step says it used ('... on N core(s)')."
    m = re.search(r'on (\d+) core\(s\)', stderr)
    assert m, stderr[-2000:]
    return int(m.group(1))


def test_predictions_are_the_same_bytes_on_one_core_and_on_all(opt_ml_tree_factory, tmp_path, opt_ml_trained):
    from mlproj.contract import usable_cpus
    from mlproj.data import synthetic_penguins, TARGET
    rows = synthetic_penguins(30_000, seed=11).drop(columns=[TARGET])
    out = {}
    for label, cap in (('one', '1'), ('all', '0')):
        t = opt_ml_tree_factory(tmp_path/label)
        t.stage('model', opt_ml_trained['model'])
        d = t.input('data'); d.mkdir(parents=True)
        rows.iloc[:12_000].to_csv(d/'a.csv', index=False)
        rows.iloc[12_000:20_000].to_parquet(d/'b.parquet', index=False)
        rows.iloc[20_000:].to_csv(d/'c.csv', index=False)
        p = t.run('batch_inference', '--chunksize', 7_000, env={'MLPROJ_CPUS': cap})
        assert p.returncode == 0, p.stderr[-3000:]
        out[label] = (t.output('predictions')/'predictions-algo-1.csv').read_bytes(), _cores(p.stderr)
    assert out['one'][1] == 1 and out['all'][1] == usable_cpus()
    assert out['one'][0] == out['all'][0]
    pred = pd.read_csv(pd.io.common.BytesIO(out['all'][0]))
    assert pred['penguin_id'].tolist() == rows['penguin_id'].tolist()


def test_a_model_trained_on_all_cores_is_the_same_bytes_as_on_one(opt_ml_tree_factory, tmp_path, opt_ml_trained):
    from mlproj.contract import usable_cpus
    got = {}
    for label, cap in (('one', '1'), ('all', '0')):
        t = opt_ml_tree_factory(tmp_path/label)
        t.stage('train', opt_ml_trained['train_csv'])
        p = t.run('train', '--n_estimators', 40, '--seed', 3, env={'MLPROJ_CPUS': cap})
        assert p.returncode == 0, p.stderr[-3000:]
        got[label] = (t.output('model')/'model.tar.gz').read_bytes(), _cores(p.stderr)
    assert got['one'][1] == 1 and got['all'][1] == usable_cpus()
    assert got['one'][0] == got['all'][0]


def test_a_core_cap_that_is_not_a_number_is_one_line(opt_ml_tree, opt_ml_trained, opt_ml_penguins, opt_ml_assert_failed):
    t = opt_ml_tree
    t.stage('model', opt_ml_trained['model']); t.stage('data', opt_ml_penguins)
    p = t.run('batch_inference', env={'MLPROJ_CPUS': 'all'})
    line = opt_ml_assert_failed(p, t, 'batch_inference', [t.outputs])
    assert line == "batch_inference: MLPROJ_CPUS='all': expected a whole number of cores (0: all)", line
