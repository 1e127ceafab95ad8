"""Batch inference takes the rows people have: the model's own schema, only its features required, ids optional,
columns passed through, and data problems named precisely. Each test here failed on the code before this contract."""
import csv, io
import pandas as pd
import pytest

PUBLIC = ['species', 'island', 'bill_length_mm', 'bill_depth_mm', 'flipper_length_mm', 'body_mass_g', 'sex', 'year']


def public_table(src, with_species=True, with_year=True) -> pd.DataFrame:
    "The palmerpenguins layout, made from the bundled table: no id column; optionally no species, no year."
    df = pd.read_csv(src, dtype=str, keep_default_na=False)[PUBLIC]
    return df.drop(columns=[c for c, keep in (('species', with_species), ('year', with_year)) if not keep])


@pytest.mark.parametrize('with_species', [True, False])
def test_the_public_penguins_table_is_scored_and_joins_back(cli, tmp_path, opt_ml_trained, opt_ml_penguins, with_species):
    table = public_table(opt_ml_penguins, with_species, with_year=False)
    table.to_csv(tmp_path/'palmerpenguins.csv', index=False)
    code, out, err = cli('job', 'run', 'batch_inference', '--engine', 'script', '--input', f'data={tmp_path}/palmerpenguins.csv',
                         '--input', f"model={opt_ml_trained['model']}", '-p', 'keep_columns=island,sex', '--name', 'bi-public')
    assert code == 0, err[-3000:]
    pred = pd.read_csv(tmp_path/'outputs/bi-public/predictions/predictions-algo-1.csv', dtype=str, keep_default_na=False)
    assert len(pred) == len(table)
    assert list(pred.columns[:4]) == ['source_file', 'source_row', 'island', 'sex']
    assert set(pred['source_file']) == {'palmerpenguins.csv'}
    # joinable: source_row is the CSV line of the input row (header = line 1)
    joined = table.assign(source_row=[str(i) for i in range(2, len(table) + 2)]).merge(pred, on='source_row', suffixes=('', '_pred'))
    assert len(joined) == len(table) and (joined['island'] == joined['island_pred']).all() and (joined['sex'] == joined['sex_pred']).all()
    if with_species:   # a sanity check that rows did not move: the model is right on almost all of its training table
        assert (joined['species'] == joined['predicted_species']).mean() > 0.95


def _script(t, *args):
    return t.run('batch_inference', *args)


def test_a_repeated_column_is_refused_naming_both_places(opt_ml_tree, opt_ml_trained, opt_ml_penguins, opt_ml_assert_failed):
    t = opt_ml_tree
    t.stage('model', opt_ml_trained['model'])
    df = pd.read_csv(opt_ml_penguins, dtype=str, keep_default_na=False)
    buf = io.StringIO(); w = csv.writer(buf, lineterminator='\n')
    w.writerow(list(df.columns) + ['body_mass_g'])
    for r in df.itertuples(index=False): w.writerow(list(r) + ['9999'])
    t.stage_text('data', 'dup.csv', buf.getvalue())
    line = opt_ml_assert_failed(_script(t), t, 'batch_inference', [t.outputs])
    assert 'processing/input/data/dup.csv' in line and "column 'body_mass_g' appears twice (columns 7 and 10)" in line, line


@pytest.mark.parametrize('sep,label', [(';', '`;`'), ('\t', 'tab'), ('|', '`|`')])
def test_a_file_separated_by_something_else_says_so(sep, label, opt_ml_tree, opt_ml_trained, opt_ml_penguins, opt_ml_assert_failed):
    t = opt_ml_tree
    t.stage('model', opt_ml_trained['model'])
    t.stage_text('data', 'rows.csv', pd.read_csv(opt_ml_penguins).to_csv(index=False, sep=sep))
    line = opt_ml_assert_failed(_script(t), t, 'batch_inference', [t.outputs])
    assert 'processing/input/data/rows.csv' in line and f'the header looks {label}-separated' in line
    assert 'the step reads comma-separated CSV' in line, line


def test_columns_outside_the_schema_are_reported_once_per_file(opt_ml_tree, opt_ml_trained, opt_ml_penguins):
    t = opt_ml_tree
    t.stage('model', opt_ml_trained['model'])
    df = pd.read_csv(opt_ml_penguins)
    wide = pd.concat([df, pd.DataFrame({f'x{i}': 0 for i in range(5_000)}, index=df.index)], axis=1)
    t.input('data').mkdir(parents=True)
    wide.iloc[:200].to_csv(t.input('data')/'a.csv', index=False)
    df.iloc[200:].assign(colour='grey').to_csv(t.input('data')/'b.csv', index=False)
    p = _script(t, '--chunksize', 50)
    assert p.returncode == 0, p.stderr[-2000:]
    summary = t.check_ok_stdout(p, 'batch_inference')
    notes = [l for l in p.stderr.splitlines() if 'not in the schema' in l]
    assert len(notes) == 2, notes                            # once per file, not once per chunk
    assert 'a.csv: columns not in the schema, ignored: x0, x1' in notes[0] and 'and 4,990 more' in notes[0] and len(notes[0]) < 300
    assert 'b.csv: column not in the schema, ignored: colour' in notes[1]
    assert len(summary['notes']) == 2 and summary['rows'] == len(df)


def test_many_small_files_make_a_short_summary(opt_ml_tree, opt_ml_trained, opt_ml_penguins):
    t = opt_ml_tree
    t.stage('model', opt_ml_trained['model'])
    df = pd.read_csv(opt_ml_penguins); d = t.input('data'); d.mkdir(parents=True)
    for i in range(120): df.iloc[[i]].to_csv(d/f'part-{i:03d}.csv', index=False)
    p = _script(t)
    assert p.returncode == 0, p.stderr[-2000:]
    assert len(p.stdout) < 1500, len(p.stdout)                # counts and the first few files, not every file
    summary = t.check_ok_stdout(p, 'batch_inference')
    assert summary['files'] == 120 and len(summary['first_files']) == 5 and summary['rows'] == 120
    pred = pd.read_csv(t.output('predictions')/'predictions-algo-1.csv')
    assert pred['penguin_id'].tolist() == df['penguin_id'].iloc[:120].tolist()


def test_inference_obeys_the_schema_the_model_carries(tmp_path, opt_ml_tree, opt_ml_penguins, opt_ml_assert_failed):
    "A model trained with another declaration scores by its own rules, not the code's current ones."
    from dataclasses import replace
    from mlproj.data import SCHEMA, Column, load_table
    from mlproj.train import train_model, write_model_artifact
    cols = tuple(Column('island', 'category', ('Biscoe', 'Dream', 'Torgersen', 'Atlantis')) if c.name == 'island' else
                 (replace(c, hi=5000) if c.name == 'body_mass_g' else c) for c in SCHEMA.columns)
    other = replace(SCHEMA, columns=cols)
    df = load_table(opt_ml_penguins)
    df = df[df['body_mass_g'].isna() | (df['body_mass_g'] <= 5000)]
    t = opt_ml_tree
    (t.input('model')).mkdir(parents=True)
    write_model_artifact(train_model(df, n_estimators=10, schema=other), t.input('model')/'model.tar.gz')
    rows = pd.read_csv(opt_ml_penguins, dtype=str, keep_default_na=False)
    ok = rows[rows['body_mass_g'].isin(['']) | (pd.to_numeric(rows['body_mass_g'], errors='coerce') <= 5000)].copy()
    ok.iloc[0, ok.columns.get_loc('island')] = 'Atlantis'       # unknown to the code's schema, known to the model's
    t.stage_text('data', 'rows.csv', ok.to_csv(index=False))
    p = _script(t)
    assert p.returncode == 0, p.stderr[-2000:]
    heavy = rows.copy(); heavy.loc[heavy.index[0], 'body_mass_g'] = '6000'   # plausible for the code, not for the model
    t.stage_text('data', 'rows.csv', heavy.to_csv(index=False))
    line = opt_ml_assert_failed(t.run('batch_inference', '--predictions', str(t.output('p2'))), t, 'batch_inference', [t.output('p2')])
    assert "row 2, column 'body_mass_g': 6000 is outside the plausible range [1500, 5000]" in line, line
