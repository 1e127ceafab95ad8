"""Job notebooks and the notebook runner: three ways to run a job notebook, parameter validation,
failures that end the run loudly (error, cell timeout, total timeout, dead kernel), reports kept."""
import json, os, shutil, subprocess, sys, time
from pathlib import Path
import nbformat
import pytest
from mlproj.data import bundled_path
from mlproj.steps import STEPS

ROOT = Path(__file__).resolve().parent.parent
JOBS = ROOT/'nbs'/'jobs'
BIN = Path(sys.executable).parent
RUNNER = [sys.executable, '-m', 'mlproj.runner']


@pytest.fixture(scope='module')
def warm_server():
    "One fork server for this module's warm runs (the local executor starts one per `mlproj run`)."
    from mlproj.runner import WarmServer
    s = WarmServer(); assert s.ready(), 'the fork server did not start'
    yield s
    s.close()


@pytest.fixture(autouse=True, params=['warm', 'cold'])
def start(request, monkeypatch):
    """Every test that runs the runner or the executor runs twice: papermill, its kernel and the report renderer forked from the warm
    server, and fresh interpreters. A test marked `one_mode` starts none of them (it checks a notebook or drives papermill or nbclient
    itself): the mode cannot change what it sees, so it runs once, cold."""
    monkeypatch.setenv('MPLBACKEND', os.environ.get('MPLBACKEND', 'Agg'))
    if request.param == 'warm':
        monkeypatch.setenv('MLPROJ_WARM', request.getfixturevalue('warm_server').path); monkeypatch.setenv('MLPROJ_COLD', '0')
    else:
        monkeypatch.delenv('MLPROJ_WARM', raising=False); monkeypatch.setenv('MLPROJ_COLD', '1')
    return request.param


one_mode = pytest.mark.parametrize('start', ['cold'], indirect=True)   # see `start`: nothing this test runs reads the mode


def make_nb(path, cells, params="n: int = 3  # how many"):
    nb = nbformat.v4.new_notebook()
    nb.metadata = {'kernelspec': {'name': 'python3', 'display_name': 'python3', 'language': 'python'}}
    pc = nbformat.v4.new_code_cell(params); pc.metadata['tags'] = ['parameters']
    nb.cells = [nbformat.v4.new_markdown_cell('# test notebook'), pc] + [nbformat.v4.new_code_cell(c) for c in cells]
    nbformat.write(nb, path)
    return path


def run_runner(tmp_path, *args, timeout=180):
    env = {**os.environ, 'MLPROJ_OPT_ML': str(tmp_path/'opt_ml')}
    return subprocess.run(RUNNER + [str(a) for a in args], env=env, capture_output=True, text=True, timeout=timeout)


def message(tmp_path):
    p = tmp_path/'opt_ml/output/message'
    assert p.exists(), 'exit message file missing'
    b = p.read_bytes(); assert len(b) <= 1024
    return b.decode('utf-8')


# --- the job notebooks ----------------------------------------------------------------

@one_mode
@pytest.mark.parametrize('step', list(STEPS))
def test_notebook_parameters_mirror_the_entry_function(step):
    "The check every notebook job passes before it is built: the parameters cell is the entry function's signature."
    from mlproj.jobs import check_job_notebook
    nb = check_job_notebook(step)                 # raises if the parameters cell and the step's declaration differ
    assert nb.resolve() == (JOBS/f'{step}.ipynb').resolve()     # and the notebook checked is the one this repository ships


@one_mode
@pytest.mark.parametrize('step', list(STEPS))
def test_help_notebook_lists_typed_documented_parameters(step):
    r = subprocess.run([str(BIN/'papermill'), '--help-notebook', str(JOBS/f'{step}.ipynb')], capture_output=True, text=True, check=True)
    for name, p in STEPS[step].params.items():
        assert f'{name}: {p.type.__name__}' in r.stdout, r.stdout
    assert '(default' in r.stdout and 'processing/' in r.stdout


@one_mode
def test_cleaned_notebook_keeps_its_parameters_tag(tmp_path):
    shutil.copytree(ROOT/'nbs', tmp_path/'nbs', ignore=shutil.ignore_patterns('.ipynb_checkpoints'))
    shutil.copy(ROOT/'settings.ini', tmp_path/'settings.ini')
    nb = tmp_path/'nbs/jobs/train.ipynb'
    raw = json.loads(nb.read_text())
    raw['cells'][1]['metadata']['collapsed'] = True          # something nbdev_clean removes
    raw['cells'][1]['execution_count'] = 7
    nb.write_text(json.dumps(raw))
    subprocess.run([str(BIN/'nbdev_clean'), '--fname', str(nb)], cwd=tmp_path, check=True, capture_output=True)
    cleaned = json.loads(nb.read_text())
    params = [c for c in cleaned['cells'] if 'parameters' in c.get('metadata', {}).get('tags', [])]
    assert len(params) == 1 and 'collapsed' not in params[0]['metadata'] and params[0]['execution_count'] is None


@one_mode
def test_job_notebooks_run_top_to_bottom_in_a_kernel_with_defaults(tmp_path):
    "As a person would in JupyterLab: defaults are container paths, MLPROJ_OPT_ML moves /opt/ml to a fixture tree."
    from nbclient import NotebookClient
    root = tmp_path/'opt_ml'; proc = root/'processing'
    (proc/'input/raw').mkdir(parents=True); shutil.copy(bundled_path(), proc/'input/raw')
    os.environ['MLPROJ_OPT_ML'] = str(root)
    try:
        for step, moves in [('preprocess', {'train': 'train', 'test': 'test'}), ('train', {'model': 'model'}), ('evaluate', {}), ('batch_inference', {})]:
            if step == 'batch_inference':
                (proc/'input/data').mkdir(); shutil.copy(bundled_path(), proc/'input/data')
            nb = nbformat.read(JOBS/f'{step}.ipynb', as_version=4)
            NotebookClient(nb, timeout=300, kernel_name='python3', resources={'metadata': {'path': str(tmp_path)}}).execute()
            errors = [o for c in nb.cells for o in c.get('outputs', []) if o.get('output_type') == 'error']
            assert not errors, (step, errors)
            for src, dst in moves.items():       # what SageMaker's channels do between steps
                shutil.copytree(proc/'output'/src, proc/'input'/dst)
    finally:
        del os.environ['MLPROJ_OPT_ML']
    assert (proc/'output/evaluation/evaluation.json').exists()
    assert (proc/'output/predictions/predictions-algo-1.csv').exists()


@one_mode
def test_job_notebook_under_the_papermill_cli(tmp_path):
    "A user's habit: papermill straight from the shell, -p values as papermill parses them."
    out = tmp_path/'train-out.ipynb'
    r = subprocess.run([str(BIN/'papermill'), str(JOBS/'preprocess.ipynb'), str(tmp_path/'pp.ipynb'),
                        '-p', 'raw', str(bundled_path()), '-p', 'train', str(tmp_path/'train'), '-p', 'test', str(tmp_path/'test'),
                        '-p', 'seed', '3'], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    r = subprocess.run([str(BIN/'papermill'), str(JOBS/'train.ipynb'), str(out), '-p', 'train', str(tmp_path/'train'),
                        '-p', 'model', str(tmp_path/'model'), '-p', 'n_estimators', '20'], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path/'model/model.tar.gz').exists()
    nb = nbformat.read(out, as_version=4)
    injected = [c for c in nb.cells if 'injected-parameters' in c.metadata.get('tags', [])]
    assert injected and 'n_estimators = 20' in injected[0].source


# --- the runner --------------------------------------------------------------------------

def test_runner_executes_a_job_notebook_and_saves_the_report(tmp_path):
    r = run_runner(tmp_path, JOBS/'preprocess.ipynb', '-p', f'raw={bundled_path()}', '-p', 'test_size=0.25',
                   '--report', tmp_path/'report')
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out['status'] == 'Completed' and out['parameters']['test_size'] == 0.25
    assert (tmp_path/'report/preprocess.ipynb').exists() and (tmp_path/'report/preprocess.html').exists()
    test_csv = tmp_path/'opt_ml/processing/output/test/test-algo-1.csv'
    assert sum(1 for _ in open(test_csv)) - 1 == 86      # 25% of 344, stratified


def test_each_instance_of_a_multi_instance_job_names_its_own_report(tmp_path):
    "One of several instances (resourceconfig.json as SageMaker writes it) saves `<notebook>-<host>.*`, never `<notebook>.*`."
    cfg = tmp_path/'opt_ml/config'; cfg.mkdir(parents=True)
    (cfg/'resourceconfig.json').write_text(json.dumps({'current_host': 'algo-2', 'hosts': ['algo-1', 'algo-2', 'algo-3']}))
    nb = make_nb(tmp_path/'multi.ipynb', ['print("n is", n)'])
    r = run_runner(tmp_path, nb, '--report', tmp_path/'report')
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert sorted(p.name for p in (tmp_path/'report').iterdir()) == ['multi-algo-2.html', 'multi-algo-2.ipynb']
    assert Path(out['executed_notebook']) == tmp_path/'report/multi-algo-2.ipynb' and Path(out['html']) == tmp_path/'report/multi-algo-2.html'


def test_unknown_parameter_is_refused_with_a_suggestion_before_any_kernel(tmp_path):
    r = run_runner(tmp_path, JOBS/'train.ipynb', '-p', 'sed=3', '--report', tmp_path/'report')
    assert r.returncode == 1
    assert "train.ipynb: unknown parameter 'sed' (did you mean 'seed'?)" in r.stderr
    assert "unknown parameter 'sed'" in message(tmp_path)
    assert not (tmp_path/'report').exists()           # refused before anything ran


CONVERSIONS = [
    ('n=12', 'n', 12), ('rate=0.25', 'rate', 0.25), ('rate=2', 'rate', 2.0), ('flag=true', 'flag', True), ('flag=0', 'flag', False),
    ('flag=No', 'flag', False), ('name=hello', 'name', 'hello'), ('items=[1, "a"]', 'items', [1, 'a']), ('opts={"k": 2}', 'opts', {'k': 2}),
    ('where=/tmp/some/where', 'where', '/tmp/some/where'),
]
# every conversion above goes through a kernel; one run takes one value per parameter, so three runs cover them all
CONVERSION_RUNS = [[c for c in CONVERSIONS if c[0] in ('n=12', 'rate=0.25', 'flag=true', 'name=hello', 'items=[1, "a"]', 'opts={"k": 2}', 'where=/tmp/some/where')],
                   [c for c in CONVERSIONS if c[0] in ('rate=2', 'flag=0')],
                   [c for c in CONVERSIONS if c[0] in ('flag=No',)]]
assert sorted(c[0] for run in CONVERSION_RUNS for c in run) == sorted(c[0] for c in CONVERSIONS)   # each conversion in exactly one run
assert all(len({c[1] for c in run}) == len(run) for run in CONVERSION_RUNS)                     # and a run sets a parameter once


@pytest.mark.parametrize('conversions', CONVERSION_RUNS, ids=lambda cs: ','.join(c[0] for c in cs))
def test_string_values_are_converted_to_the_declared_type(tmp_path, conversions):
    import ast
    params = ("from pathlib import Path\nn: int = 3  # count\nrate: float = 0.5  # rate\nflag: bool = True  # switch\n"
              "name: str = 'x'  # name\nitems: list = []  # items\nopts: dict = {}  # options\nwhere: Path = Path('.')  # place")
    nb = make_nb(tmp_path/'types.ipynb', ["print(repr(dict(n=n, rate=rate, flag=flag, name=name, items=items, opts=opts, where=str(where))))"], params)
    args = [x for pair, _, _ in conversions for x in ('-p', pair)]
    r = run_runner(tmp_path, nb, *args, '--report', tmp_path/'report')
    assert r.returncode == 0, r.stderr[-2000:]
    executed = nbformat.read(tmp_path/'report/types.ipynb', as_version=4)
    printed = [o['text'] for c in executed.cells for o in c.get('outputs', []) if o.get('output_type') == 'stream'][-1]
    seen = ast.literal_eval(printed.strip())
    for pair, name, expected in conversions:
        assert seen[name] == expected and type(seen[name]) is type(expected), (pair, seen[name], expected)


@pytest.mark.parametrize('pair,expected', [('n=three', "parameter n='three': expected int"),
                                           ('flag=perhaps', "parameter flag='perhaps': expected bool"),
                                           ('items={"a": 1}', "parameter items='{\"a\": 1}': expected list")])
def test_bad_value_is_refused(tmp_path, pair, expected):
    nb = make_nb(tmp_path/'t.ipynb', ['pass'], "n: int = 3  # count\nflag: bool = True  # switch\nitems: list = []  # items")
    r = run_runner(tmp_path, nb, '-p', pair, '--report', tmp_path/'report')
    assert r.returncode == 1 and expected in r.stderr and expected in message(tmp_path)


def test_parameters_file_and_p_override(tmp_path):
    nb = make_nb(tmp_path/'f.ipynb', ['print("n is", n, "and m is", m)'], "n: int = 3  # count\nm: int = 0  # other")
    (tmp_path/'p.yaml').write_text('n: 5\nm: 6\n')
    r = run_runner(tmp_path, nb, '-f', tmp_path/'p.yaml', '-p', 'm=9', '--report', tmp_path/'report')
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1])['parameters'] == {'n': 5, 'm': 9}


def test_failing_cell_fails_the_run_and_keeps_the_report(tmp_path):
    nb = make_nb(tmp_path/'boom.ipynb', ['x = n * 2', 'raise RuntimeError(f"model exploded at {x}")', 'print("never")'])
    r = run_runner(tmp_path, nb, '-p', 'n=4', '--report', tmp_path/'report')
    assert r.returncode == 1
    line = 'boom.ipynb cell 4: RuntimeError: model exploded at 8'
    assert r.stderr.strip().splitlines()[-1] == line
    assert message(tmp_path) == line
    executed = nbformat.read(tmp_path/'report/boom.ipynb', as_version=4)
    errs = [c for c in executed.cells if any(o.get('output_type') == 'error' for o in c.get('outputs', []))]
    assert len(errs) == 1 and 'raise RuntimeError' in errs[0].source
    assert 'model exploded at 8' in (tmp_path/'report/boom.html').read_text()


def test_cell_timeout_ends_the_run(tmp_path):
    nb = make_nb(tmp_path/'slow.ipynb', ['print("before")', 'import time; time.sleep(120)'])
    t0 = time.monotonic()
    r = run_runner(tmp_path, nb, '--cell-timeout', '3', '--report', tmp_path/'report')
    assert time.monotonic() - t0 < 90
    assert r.returncode == 1
    assert message(tmp_path) == 'slow.ipynb cell 4: CellTimeoutError: the cell ran longer than 3 s (--cell-timeout)'
    assert (tmp_path/'report/slow.ipynb').exists()


def test_total_timeout_ends_the_run(tmp_path):
    nb = make_nb(tmp_path/'long.ipynb', ['import time', 'time.sleep(1)', 'time.sleep(1)', 'time.sleep(1)', 'time.sleep(120)'])
    t0 = time.monotonic()
    r = run_runner(tmp_path, nb, '--timeout', '8', '--report', tmp_path/'report')
    assert time.monotonic() - t0 < 90
    assert r.returncode == 1
    msg = message(tmp_path)
    assert msg.startswith('long.ipynb cell ') and msg.endswith('TimeoutError: the notebook ran longer than 8 s (--timeout) and was stopped'), msg
    assert (tmp_path/'report/long.ipynb').exists() and (tmp_path/'report/long.html').exists()
    # no papermill or kernel left behind
    ps = subprocess.run(['ps', '-eo', 'args'], capture_output=True, text=True).stdout
    assert str(tmp_path/'long.ipynb') not in ps


def test_killed_kernel_ends_the_run(tmp_path):
    nb = make_nb(tmp_path/'die.ipynb', ['print("alive")', 'import os, signal; os.kill(os.getpid(), signal.SIGKILL)', 'print("never")'])
    t0 = time.monotonic()
    r = run_runner(tmp_path, nb, '--report', tmp_path/'report')
    assert time.monotonic() - t0 < 120
    assert r.returncode == 1
    assert message(tmp_path) == 'die.ipynb cell 4: DeadKernelError: the kernel died'
    assert (tmp_path/'report/die.ipynb').exists()


def test_oversized_output_is_truncated_in_the_saved_notebook(tmp_path):
    nb = make_nb(tmp_path/'loud.ipynb', ['print("start-marker"); print("x" * 500_000); print("end-marker")'])
    r = run_runner(tmp_path, nb, '--output-cap', '10000', '--report', tmp_path/'report')
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout.strip().splitlines()[-1])['truncated_outputs'] == 1
    executed = nbformat.read(tmp_path/'report/loud.ipynb', as_version=4)
    text = ''.join(o['text'] for c in executed.cells for o in c.get('outputs', []) if o.get('output_type') == 'stream')
    assert len(text) < 12_000 and 'truncated by mlproj.runner' in text
    assert text.startswith('start-marker') and text.rstrip().endswith('end-marker')
    assert (tmp_path/'report/loud.ipynb').stat().st_size < 50_000


def test_notebook_job_fails_with_the_cell_in_its_exit_message(tmp_path):
    "A failing notebook is a Failed job, not Completed: the runner's exit code and message reach the describe result."
    from mlproj.jobs import render_request, step_job
    from mlproj.local import run_local
    bad = tmp_path/'bad.csv'
    bad.write_text(bundled_path().read_text().replace('Torgersen', 'Atlantis', 1))
    req = render_request(step_job('preprocess', {'raw': str(bad)}, {'train': str(tmp_path/'tr'), 'test': str(tmp_path/'te'),
                                                                    'report': str(tmp_path/'rep')}, engine='notebook'))
    d = run_local(req, jobs_dir=tmp_path/'jobs', stream=None)
    assert d['ProcessingJobStatus'] == 'Failed'
    assert "preprocess.ipynb cell 3: InputError:" in d['ExitMessage'] and "unknown category 'Atlantis'" in d['ExitMessage']
    # the report is in the sandbox even though the job failed (uploads happen only for completed jobs)
    assert (tmp_path/'jobs'/req['ProcessingJobName']/'algo-1/processing/output/report/preprocess.html').exists()
