"""Another table through every step: the schema declaration (one cell of nbs/10_data.ipynb) and the bundled data
file are all that change.

A copy of the checkout gets a declaration for scikit-learn's wine table (13 measurements, a categorical column
added, no id column) in place of the penguins one, and the wine table as its bundled data; `nbdev_export` builds
the package from the edited notebook; the wheel of that copy, installed in a fresh venv, runs `mlproj run` with
the notebook engine: preprocess, train, evaluate and batch inference as processing jobs, each executing its job
notebook."""
import json, subprocess
from pathlib import Path
import pytest


WINE_DECLARATION = '''#| export
SCHEMA = Schema(
    name='wine',
    columns=(
        Column('cultivar', 'category', ('class_0', 'class_1', 'class_2'), nullable=False),
        Column('vineyard', 'category', ('north', 'south')),
        Column('alcohol', 'number', lo=8, hi=18),
        Column('malic_acid', 'number', lo=0),
        Column('ash', 'number'),
        Column('alcalinity_of_ash', 'number'),
        Column('magnesium', 'number', lo=50, hi=200),
        Column('total_phenols', 'number'),
        Column('flavanoids', 'number'),
        Column('nonflavanoid_phenols', 'number'),
        Column('proanthocyanins', 'number'),
        Column('color_intensity', 'number'),
        Column('hue', 'number'),
        Column('od280/od315_of_diluted_wines', 'number'),
        Column('proline', 'number', lo=100, hi=2000),
    ),
    target='cultivar',
    features=('vineyard', 'alcohol', 'malic_acid', 'ash', 'alcalinity_of_ash', 'magnesium', 'total_phenols', 'flavanoids',
              'nonflavanoid_phenols', 'proanthocyanins', 'color_intensity', 'hue', 'od280/od315_of_diluted_wines', 'proline'),
    data_file='wine.csv',
)'''


def wine_csv(dest: Path):
    from sklearn.datasets import load_wine
    w = load_wine(as_frame=True)
    df = w.data.copy()
    df.insert(0, 'vineyard', ['north' if i % 3 else 'south' for i in range(len(df))])
    df.loc[df.index[::17], 'vineyard'] = None                            # some missing categories
    df.insert(0, 'cultivar', [w.target_names[t] for t in w.target])
    df.to_csv(dest, index=False)
    return df


@pytest.fixture(scope='module')
def wine_project(tmp_path_factory, project_copy):
    # the one cell a user edits, and the data file they add; the package is rebuilt from the notebooks (conftest.ProjectCopy)
    tables = []
    p = project_copy(tmp_path_factory.mktemp('wine'), edits=[('10_data.ipynb', '#| export\nSCHEMA = Schema(', WINE_DECLARATION)],
                     assets={'mlproj/assets/wine.csv': lambda dest: tables.append(wine_csv(dest))})
    assert "name='wine'" in (p.src/'mlproj/data.py').read_text()
    return p.venv, p.work, p.env, tables[0]


def test_a_wine_table_runs_through_every_step_with_the_notebook_engine(wine_project):
    venv, work, env, table = wine_project
    r = subprocess.run([str(venv/'bin/mlproj'), 'run', '--engine', 'notebook', '--run-id', 'wine', '-p', 'train.n_estimators=50'],
                       cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    rec = json.loads(r.stdout)
    assert rec['status'] == 'Completed' and [s['step'] for s in rec['steps']] == ['preprocess', 'train', 'evaluate', 'batch_inference', 'monitor']
    assert rec['gate']['value'] >= 0.85, rec['gate']
    run = work/'outputs/wine'
    manifest = json.loads(subprocess.run(['tar', 'xzOf', str(run/'train/model/model.tar.gz'), 'manifest.json'], capture_output=True, check=True).stdout)
    assert manifest['schema']['name'] == 'wine' and manifest['classes'] == ['class_0', 'class_1', 'class_2'] and manifest['id_column'] is None
    import pandas as pd
    pred = pd.read_csv(run/'batch_inference/predictions/predictions-algo-1.csv')
    assert list(pred.columns) == ['source_file', 'source_row', 'predicted_cultivar', 'proba_class_0', 'proba_class_1', 'proba_class_2']
    assert len(pred) == len(table) and pred['source_row'].tolist() == list(range(2, len(table) + 2))
    assert (pred['predicted_cultivar'] == table['cultivar']).mean() > 0.9
    for step in rec['steps']:                                                  # each step ran its job notebook
        report = run/step['step']/'report'
        assert sorted(p.name for p in report.iterdir()) == [f"{step['step']}.html", f"{step['step']}.ipynb"], step['step']
    assert 'class_2' in (run/'preprocess/report/preprocess.html').read_text()          # the report's class counts are the wine's
