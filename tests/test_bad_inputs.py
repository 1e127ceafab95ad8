"""Bad inputs fail the container's way: non-zero exit, one line on stderr naming the step, the problem and the place,
the same line in /opt/ml/output/message (UTF-8, at most 1 KB), and no output files left behind."""
import csv, io, random, re
from pathlib import Path
import pytest


def _rows(src) -> list[list[str]]:
    "The bundled CSV as [header, *rows] lists of text cells."
    with open(src, newline='', encoding='utf-8') as f: return list(csv.reader(f))


def _csv_bytes(rows) -> bytes:
    buf = io.StringIO()
    csv.writer(buf, lineterminator='\n').writerows(rows)
    return buf.getvalue().encode('utf-8')


def _set(rows, data_row: int, column: str, value: str):
    "Set `column` of the `data_row`-th data row (0-based; file line data_row + 2) to `value`."
    rows[1 + data_row][rows[0].index(column)] = value
    return rows


def _has(line: str, *needles):
    for n in needles: assert n in line, f'{n!r} not in the message: {line!r}'


# ---------------------------------------------------------------------------------------------------------------
# missing inputs

def test_missing_input_file(opt_ml_tree, opt_ml_assert_failed):
    t = opt_ml_tree
    t.input('raw').mkdir(parents=True)
    p = t.run('preprocess', '--raw', '/opt/ml/processing/input/raw/penguins.csv')
    line = opt_ml_assert_failed(p, t, 'preprocess', [t.outputs])
    _has(line, 'processing/input/raw/penguins.csv')
    assert re.search(r'not found|no such file|does not exist', line, re.I), line


def test_missing_model_file(opt_ml_tree, opt_ml_trained, opt_ml_assert_failed):
    "The model folder exists but holds no model.tar.gz."
    t = opt_ml_tree
    t.input('model').mkdir(parents=True)
    t.stage('test', opt_ml_trained['test_csv'])
    p = t.run('evaluate')
    line = opt_ml_assert_failed(p, t, 'evaluate', [t.outputs])
    _has(line, 'processing/input/model', 'model.tar.gz')
    assert re.search(r'not found|no such file|does not exist', line, re.I), line


# step -> (inputs to stage, the input left missing)
MISSING_FOLDER = {'preprocess': ((), 'raw'), 'train': ((), 'train'),
                  'evaluate': (('model',), 'test'), 'batch_inference': (('model',), 'data')}

@pytest.mark.parametrize('step', list(MISSING_FOLDER))
def test_missing_input_folder(step, opt_ml_tree, opt_ml_trained, opt_ml_assert_failed):
    t = opt_ml_tree
    staged, missing = MISSING_FOLDER[step]
    if 'model' in staged: t.stage('model', opt_ml_trained['model'])
    p = t.run(step)
    line = opt_ml_assert_failed(p, t, step, [t.outputs])
    _has(line, f'processing/input/{missing}')
    assert re.search(r'not found|no such file|does not exist', line, re.I), line


def test_folder_without_data_files(opt_ml_tree, opt_ml_assert_failed):
    t = opt_ml_tree
    t.stage_text('raw', 'README.txt', 'penguins go here\n')
    t.stage_text('raw', 'penguins.json', '[]\n')
    p = t.run('preprocess')
    line = opt_ml_assert_failed(p, t, 'preprocess', [t.outputs])
    _has(line, 'processing/input/raw')
    assert re.search(r'\bno\b.*(csv|parquet|data)', line, re.I), line


# ---------------------------------------------------------------------------------------------------------------
# unreadable or malformed tables

def test_empty_file(opt_ml_tree, opt_ml_assert_failed):
    t = opt_ml_tree
    t.stage_text('raw', 'penguins.csv', b'')
    p = t.run('preprocess')
    line = opt_ml_assert_failed(p, t, 'preprocess', [t.outputs])
    _has(line, 'processing/input/raw/penguins.csv')
    assert 'empty' in line.lower(), line


def test_header_only_csv(opt_ml_tree, opt_ml_penguins, opt_ml_assert_failed):
    t = opt_ml_tree
    t.stage_text('raw', 'penguins.csv', _csv_bytes(_rows(opt_ml_penguins)[:1]))
    p = t.run('preprocess')
    line = opt_ml_assert_failed(p, t, 'preprocess', [t.outputs])
    _has(line, 'processing/input/raw/penguins.csv')
    assert re.search(r'header|no (data )?rows', line, re.I), line


def test_missing_column(opt_ml_tree, opt_ml_penguins, opt_ml_assert_failed):
    t = opt_ml_tree
    rows = _rows(opt_ml_penguins)
    k = rows[0].index('sex')
    t.stage_text('raw', 'penguins.csv', _csv_bytes([r[:k] + r[k + 1:] for r in rows]))
    p = t.run('preprocess')
    line = opt_ml_assert_failed(p, t, 'preprocess', [t.outputs])
    _has(line, 'processing/input/raw/penguins.csv', 'sex')
    assert 'missing' in line.lower(), line


def test_extra_column_is_allowed_with_a_note(opt_ml_tree, opt_ml_penguins):
    t = opt_ml_tree
    rows = _rows(opt_ml_penguins)
    rows = [rows[0] + ['plumage_colour']] + [r + ['grey'] for r in rows[1:]]
    t.stage_text('raw', 'penguins.csv', _csv_bytes(rows))
    p = t.run('preprocess')
    assert p.returncode == 0, p.stderr
    t.check_ok_stdout(p, 'preprocess')
    notes = [l for l in p.stderr.splitlines() if 'plumage_colour' in l]
    assert notes, f'stderr does not mention the extra column:\n{p.stderr}'
    assert any('note' in l.lower() and 'penguins.csv' in l for l in notes), notes
    n = 0
    for name in ('train', 'test'):
        out = t.output(name) / f'{name}-algo-1.csv'
        assert out.is_file()
        header, split = t.read_csv(out)
        assert 'plumage_colour' not in header and 'species' in header
        n += len(split)
    assert n == len(rows) - 1
    assert not t.message.exists()


def test_wrong_dtype_names_file_row_and_column(opt_ml_tree, opt_ml_penguins, opt_ml_assert_failed):
    t = opt_ml_tree
    # the 5th data row: header is line 1, so it is row 6
    t.stage_text('raw', 'penguins.csv', _csv_bytes(_set(_rows(opt_ml_penguins), 4, 'bill_length_mm', 'abc')))
    p = t.run('preprocess')
    line = opt_ml_assert_failed(p, t, 'preprocess', [t.outputs])
    _has(line, 'processing/input/raw/penguins.csv', 'bill_length_mm', 'abc')
    assert re.search(r'\brow 6\b', line), line


def test_unknown_category(opt_ml_tree, opt_ml_penguins, opt_ml_assert_failed):
    t = opt_ml_tree
    t.stage_text('raw', 'penguins.csv', _csv_bytes(_set(_rows(opt_ml_penguins), 9, 'island', 'Atlantis')))
    p = t.run('preprocess')
    line = opt_ml_assert_failed(p, t, 'preprocess', [t.outputs])
    _has(line, 'processing/input/raw/penguins.csv', 'island', 'Atlantis')
    assert re.search(r'\brow 11\b', line), line


def test_non_utf8_bytes(opt_ml_tree, opt_ml_penguins, opt_ml_assert_failed):
    t = opt_ml_tree
    lines = opt_ml_penguins.read_bytes().split(b'\n')
    assert b'Torgersen' in lines[10]
    lines[10] = lines[10].replace(b'Torgersen', 'Torgérsen'.encode('latin-1'))    # file line 11, byte 0xe9
    t.stage_text('raw', 'penguins.csv', b'\n'.join(lines))
    p = t.run('preprocess')
    line = opt_ml_assert_failed(p, t, 'preprocess', [t.outputs])
    _has(line, 'processing/input/raw/penguins.csv')
    assert re.search(r'\bline 11\b', line), line
    assert re.search(r'utf-?8', line, re.I), line


# ---------------------------------------------------------------------------------------------------------------
# damaged model artifact

def _corrupt(kind: str, good: bytes) -> bytes:
    if kind == 'truncated': return good[:len(good) // 2]
    return random.Random(1234).randbytes(len(good))

@pytest.mark.parametrize('kind', ['truncated', 'random'])
@pytest.mark.parametrize('step', ['evaluate', 'batch_inference'])
def test_corrupted_model(step, kind, opt_ml_tree, opt_ml_trained, opt_ml_penguins, opt_ml_assert_failed):
    t = opt_ml_tree
    t.stage_text('model', 'model.tar.gz', _corrupt(kind, opt_ml_trained['model'].read_bytes()))
    if step == 'evaluate': t.stage('test', opt_ml_trained['test_csv'])
    else: t.stage('data', opt_ml_penguins)
    p = t.run(step)
    line = opt_ml_assert_failed(p, t, step, [t.outputs])
    _has(line, 'processing/input/model/model.tar.gz')
    assert re.search(r'corrupt|damaged|not a (valid )?(gzip|model|tar)', line, re.I), line


# ---------------------------------------------------------------------------------------------------------------
# output location not writable (the tests run as root, so chmod would not stop a write)

STEP_OUTPUT = {'preprocess': 'test', 'train': 'model', 'evaluate': 'evaluation', 'batch_inference': 'predictions'}

def _stage_inputs(t, step, trained, penguins):
    if step == 'preprocess': t.stage('raw', penguins)
    if step == 'train': t.stage('train', trained['train_csv'])
    if step in ('evaluate', 'batch_inference'): t.stage('model', trained['model'])
    if step == 'evaluate': t.stage('test', trained['test_csv'])
    if step == 'batch_inference': t.stage('data', penguins)

# every step with a parent that is a file; the /proc case (same code path) for the first and the last step
NOT_WRITABLE = [(s, 'parent-is-a-file') for s in STEP_OUTPUT] + [('preprocess', 'under-proc'), ('batch_inference', 'under-proc')]

@pytest.mark.parametrize('step,where', NOT_WRITABLE)
def test_output_not_writable(step, where, tmp_path, opt_ml_tree, opt_ml_trained, opt_ml_penguins, opt_ml_assert_failed):
    t = opt_ml_tree
    _stage_inputs(t, step, opt_ml_trained, opt_ml_penguins)
    if where == 'parent-is-a-file':
        afile = tmp_path / 'afile'; afile.write_text('not a folder\n')
        dest = afile / 'out'
    else:
        dest = Path('/proc/mlproj-nope/out')
    # preprocess: the bad location is the second output, so the first one was already staged and must be undone
    p = t.run(step, f'--{STEP_OUTPUT[step]}', dest)
    line = opt_ml_assert_failed(p, t, step, [t.outputs, dest])
    _has(line, str(dest))
    if where == 'parent-is-a-file': assert afile.read_text() == 'not a folder\n'


# ---------------------------------------------------------------------------------------------------------------
# a bad row late in a chunked batch inference

@pytest.mark.parametrize('bad', ['not-a-number', 'latin-1'])
def test_bad_row_in_third_chunk_leaves_no_predictions(bad, opt_ml_tree, opt_ml_trained, opt_ml_penguins, opt_ml_assert_failed):
    t = opt_ml_tree
    t.stage('model', opt_ml_trained['model'])
    rows = _rows(opt_ml_penguins)
    # data row 250 (0-based) is in rows 201-300, the third chunk of 100; it is file line 252
    if bad == 'not-a-number':
        data = _csv_bytes(_set(rows, 250, 'body_mass_g', 'heavy'))
    else:
        _set(rows, 250, 'island', 'Dreamé')
        data = _csv_bytes(rows).decode('utf-8').encode('latin-1')
    t.stage_text('data', 'penguins.csv', data)
    p = t.run('batch_inference', '--chunksize', 100)
    line = opt_ml_assert_failed(p, t, 'batch_inference', [t.outputs])
    _has(line, 'processing/input/data/penguins.csv')
    if bad == 'not-a-number':
        _has(line, 'body_mass_g', 'heavy')
        assert re.search(r'\brow 252\b', line), line
    else:
        assert re.search(r'\bline 252\b', line), line
