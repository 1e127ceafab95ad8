"""Shared fixtures for the integration tests of the runtime scripts (`python -m mlproj.scripts.<step>`).

Every script runs as a real subprocess over a temporary tree shaped like `/opt/ml`; the environment variable
`MLPROJ_OPT_ML` points the container paths (`/opt/ml/processing/input/<name>`, `/opt/ml/processing/output/<name>`,
`/opt/ml/output/message`) at that tree. Fixture names start with `opt_ml_` so they do not clash with fixtures
other test files may add.
"""
from __future__ import annotations
import contextlib, csv, fcntl, hashlib, io, json, os, queue, shutil, signal, socket, subprocess, sys, threading
from pathlib import Path
import pytest

REPO = Path(__file__).resolve().parents[1]
MAX_MESSAGE_BYTES = 1024          # SageMaker keeps the first 1 KB of /opt/ml/output/message


@pytest.fixture(autouse=True, scope='session')
def _outputs_in_a_temp_folder(tmp_path_factory):
    "Runs, job sandboxes and code bundles made by tests go to a temporary folder, not the checkout's outputs/."
    old = os.environ.get('MLPROJ_OUTPUTS')
    os.environ['MLPROJ_OUTPUTS'] = str(tmp_path_factory.mktemp('outputs'))
    yield
    if old is None: os.environ.pop('MLPROJ_OUTPUTS', None)
    else: os.environ['MLPROJ_OUTPUTS'] = old


# `make test` runs `pytest -n 2 --dist loadgroup` with the scheduler below. The tests of a module of ONE_WORKER go to one worker
# together, so its module fixtures are made once instead of once per worker (a rebuilt copy of the checkout and its pipeline
# runs, a JupyterLab server and a browser, trained models per task, an endpoint); these units start first, largest first.
# Every other test is scheduled alone, in collection order, where the modules of LONG_FIRST come first (the others keep their
# order), so the longest work starts early instead of ending the session on one worker while the other waits.
# (xdist's own `xdist_group` marks do nothing with pytest 9: xdist 3.8 renames items through `item._nodeid`, which pytest 9
# no longer reads.)
ONE_WORKER = ('test_tasks.py', 'test_model_quality.py', 'test_lab.py', 'test_serve.py', 'test_serve_registry.py', 'test_registry.py',
              'test_hostile_serve.py', 'test_hostile_tasks.py', 'test_serve_threshold.py')
LONG_FIRST = ('test_register_step.py', 'test_warm.py', 'test_pipeline.py', 'test_hostile.py', 'test_reproducibility.py',
              'test_runner.py', 'test_trust.py', 'test_monitor.py', 'test_serve_package.py', 'test_serve_capture.py',
              'test_performance.py', 'test_cli.py', 'test_another_table.py', 'test_bad_inputs.py', 'test_serve_transform.py')


def pytest_collection_modifyitems(config, items):
    "Modules of LONG_FIRST first, in that order; within a module, and among the other modules, the order pytest collected."
    rank = {name: i for i, name in enumerate(LONG_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))     # stable: a module's tests stay together and in order


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    "With `--dist loadgroup`: xdist's group scheduling, where the tests of a module of ONE_WORKER form one group."
    if config.getvalue('dist') != 'loadgroup': return None
    from xdist.scheduler import LoadGroupScheduling
    class ModulesOnOneWorker(LoadGroupScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split('::', 1)[0]
            return module if module.rsplit('/', 1)[-1] in ONE_WORKER else super()._split_scope(nodeid)
    return ModulesOnOneWorker(config, log)


def _subprocess_env(root: Path, extra: dict | None = None) -> dict:
    "The environment of a script run: the caller's, with the container root moved to `root`."
    env = {k: v for k, v in os.environ.items() if k not in ('MLPROJ_OPT_ML', 'MLPROJ_TRACEBACK')}
    env['MLPROJ_OPT_ML'] = str(root)
    # the subprocesses run in a temporary folder (so stray files would be noticed) and import the installed package
    env['PYTHONDONTWRITEBYTECODE'] = '1'
    env.update(extra or {})
    return env


def files_under(p) -> list[Path]:
    "Every file (hidden ones included) at or under `p`; [] if `p` does not exist."
    p = Path(p)
    if p.is_file() or p.is_symlink(): return [p]
    if not p.is_dir(): return []
    return sorted(f for f in p.rglob('*') if not f.is_dir())


def last_line(text: str) -> str:
    "The last non-blank line of `text` ('' if none)."
    lines = [l for l in text.splitlines() if l.strip()]
    return lines[-1] if lines else ''


def sha256(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def read_csv_rows(path) -> tuple[list[str], list[dict]]:
    "(header, rows as dicts) of a CSV file."
    with open(path, newline='', encoding='utf-8') as f:
        r = csv.DictReader(f)
        return list(r.fieldnames or []), list(r)


class OptMLTree:
    "A temporary `/opt/ml` tree and a way to run the step scripts over it."

    def __init__(self, root: Path, cwd: Path):
        self.root, self.cwd = Path(root), Path(cwd)
        self.cwd.mkdir(parents=True, exist_ok=True)

    # places
    def input(self, name: str) -> Path: return self.root / 'processing' / 'input' / name
    def output(self, name: str) -> Path: return self.root / 'processing' / 'output' / name
    @property
    def outputs(self) -> Path: return self.root / 'processing' / 'output'
    @property
    def message(self) -> Path: return self.root / 'output' / 'message'

    # staging, as SageMaker does before a step starts
    def stage(self, name: str, src, filename: str | None = None) -> Path:
        "Copy the file `src` into processing input `name`; returns the staged path."
        d = self.input(name); d.mkdir(parents=True, exist_ok=True)
        dest = d / (filename or Path(src).name)
        shutil.copyfile(src, dest)
        return dest

    def stage_text(self, name: str, filename: str, data: bytes | str) -> Path:
        "Write `data` as file `filename` of processing input `name`."
        d = self.input(name); d.mkdir(parents=True, exist_ok=True)
        dest = d / filename
        if isinstance(data, str): data = data.encode('utf-8')
        dest.write_bytes(data)
        return dest

    def promote(self, out_name: str, in_name: str | None = None) -> Path:
        "Copy processing output `out_name` into processing input `in_name`, as the next job's input."
        dest = self.input(in_name or out_name)
        shutil.copytree(self.output(out_name), dest, dirs_exist_ok=True)
        return dest

    # running
    def python(self, *argv, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
        "Run `python *argv` in a subprocess (cwd: this tree's work folder)."
        return subprocess.run([sys.executable, *map(str, argv)], cwd=self.cwd, env=_subprocess_env(self.root, env),
                              capture_output=True, text=True, encoding='utf-8', timeout=timeout)

    def run(self, step: str, *args, env: dict | None = None) -> subprocess.CompletedProcess:
        "Run `python -m mlproj.scripts.<step> *args`."
        return self.python('-m', f'mlproj.scripts.{step}', *args, env=env)

    def run_ok(self, step: str, *args, env: dict | None = None) -> dict:
        "Run a step that must succeed; returns the JSON summary it prints last."
        p = self.run(step, *args, env=env)
        assert p.returncode == 0, f'{step} failed ({p.returncode}):\n{p.stderr}'
        return check_ok_stdout(p, step)


def check_ok_stdout(p: subprocess.CompletedProcess, step: str) -> dict:
    "The last stdout line of a successful run is JSON {'step': step, 'status': 'ok', 'summary': ...}."
    line = last_line(p.stdout)
    try: doc = json.loads(line)
    except json.JSONDecodeError: pytest.fail(f'{step}: last stdout line is not JSON: {line!r}')
    assert doc.get('status') == 'ok', doc
    assert doc.get('step') == step, doc
    return doc.get('summary')


# helpers reachable from the tests through the tree fixtures (test files do not import conftest)
OptMLTree.files_under = staticmethod(files_under)
OptMLTree.last_line = staticmethod(last_line)
OptMLTree.sha256 = staticmethod(sha256)
OptMLTree.read_csv = staticmethod(read_csv_rows)
OptMLTree.check_ok_stdout = staticmethod(check_ok_stdout)


@pytest.fixture(scope='session')
def opt_ml_penguins() -> Path:
    "The bundled penguins CSV (`mlproj.data.bundled_path()`), 344 rows."
    try: from mlproj.data import bundled_path
    except ImportError:
        sys.path.insert(0, str(REPO)); from mlproj.data import bundled_path
    p = Path(bundled_path())
    assert p.is_file(), p
    return p


@pytest.fixture(scope='session')
def opt_ml_tree_factory():
    "`make(base)`: a fresh OptMLTree with root `base/opt_ml` (not yet created) and work folder `base/work`."
    def make(base) -> OptMLTree:
        base = Path(base)
        return OptMLTree(base / 'opt_ml', base / 'work')
    return make


@pytest.fixture
def opt_ml_tree(tmp_path, opt_ml_tree_factory) -> OptMLTree:
    "A fresh, empty `/opt/ml` tree for one test."
    return opt_ml_tree_factory(tmp_path)


@pytest.fixture(scope='session')
def opt_ml_build_once(tmp_path_factory):
    """`build(name, make) -> folder`: `make(folder)` runs once per test session, however many xdist workers ask
    (a module- or session-scoped fixture otherwise runs once in every worker that gets one of its tests); every
    caller gets the same folder, filled. Use it only for read-only material."""
    worker = os.environ.get('PYTEST_XDIST_WORKER')
    root = tmp_path_factory.getbasetemp().parent if worker else tmp_path_factory.getbasetemp()   # shared by this run's workers
    def build(name: str, make) -> Path:
        folder, done = root / f'built-once-{name}', root / f'built-once-{name}.done'
        with open(root / f'built-once-{name}.lock', 'w') as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)       # another worker building it: wait, then reuse
            try:
                if not done.exists():
                    if folder.exists(): shutil.rmtree(folder)     # what a failed attempt left
                    folder.mkdir()
                    make(folder)
                    done.touch()
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
        return folder
    return build


@pytest.fixture(scope='session')
def opt_ml_trained(opt_ml_build_once, opt_ml_tree_factory, opt_ml_penguins) -> dict:
    "One preprocess + train run on the bundled data, shared by tests that need a model: paths of its files."
    def make(base):
        tree = opt_ml_tree_factory(base)
        tree.stage('raw', opt_ml_penguins)
        tree.run_ok('preprocess')
        tree.promote('train')
        tree.run_ok('train', '--n_estimators', 20)
    tree = opt_ml_tree_factory(opt_ml_build_once('opt_ml_trained', make))
    out = {'model': tree.output('model') / 'model.tar.gz', 'train_csv': tree.output('train') / 'train-algo-1.csv',
           'test_csv': tree.output('test') / 'test-algo-1.csv'}
    for p in out.values(): assert p.is_file(), p
    return out


@pytest.fixture(scope='session')
def pipeline_first_run(opt_ml_build_once, opt_ml_penguins) -> Path:
    """One completed `mlproj run` (script engine, 20 trees, run id `r1`) over copies of the bundled table given as `--raw raw.csv`
    and `--data data.csv`, made once per session however many workers ask: the folder holding raw.csv, data.csv and outputs/r1
    (its record names places relative to the run folder). Read only: tests copy what they change (test_pipeline.py,
    test_hostile.py)."""
    def make(base):
        for f in ('raw.csv', 'data.csv'): shutil.copy(opt_ml_penguins, base/f)
        script_run(base/'outputs', '-p', 'train.n_estimators=20', '--raw', base/'raw.csv', '--data', base/'data.csv', '--run-id', 'r1')
    return opt_ml_build_once('pipeline_first_run', make)


def script_run(outputs, *args, timeout=900) -> subprocess.CompletedProcess:
    "`mlproj run --engine script ARGS` into the outputs folder `outputs`, as a user runs it (the console script); it must complete."
    env = {**os.environ, 'MLPROJ_OUTPUTS': str(outputs)}
    env.pop('MLPROJ_TRACEBACK', None)
    r = subprocess.run([str(Path(sys.executable).parent/'mlproj'), 'run', '--engine', 'script', *map(str, args)],
                       env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


@pytest.fixture(scope='session')
def opt_ml_assert_failed():
    """`check(proc, tree, step, outputs)`: the run failed the contract's way; returns the one error line.

    Non-zero exit, no traceback, stderr's last line is `<step>: ...`, the message file holds exactly that line
    (UTF-8, at most 1 KB), nothing claims success on stdout, and no file (hidden temp files included) exists at
    or under any of `outputs`."""
    def check(p: subprocess.CompletedProcess, tree: OptMLTree, step: str, outputs) -> str:
        assert p.returncode != 0, f'{step} exited 0 on bad input:\nstdout: {p.stdout}\nstderr: {p.stderr}'
        assert 'Traceback' not in p.stderr, p.stderr
        line = last_line(p.stderr)
        assert line.startswith(f'{step}: '), f'last stderr line does not name the step: {line!r}'
        assert len(line) > len(step) + 2
        assert tree.message.is_file(), f'no message file at {tree.message}'
        raw = tree.message.read_bytes()
        assert len(raw) <= MAX_MESSAGE_BYTES, len(raw)
        assert raw.decode('utf-8') == line          # strict decode: the file must be UTF-8
        assert '"status": "ok"' not in p.stdout, p.stdout
        for o in outputs:
            left = files_under(o)
            assert left == [], f'{step} left output files behind after failing: {left}'
        return line
    return check


@pytest.fixture(scope='session')
def fresh_venv():
    """`make(wheel, base) -> (venv, jupyter path)`: a new venv under `base` with `wheel` installed (no dependencies),
    outside the checkout. The dependencies come from this test environment through a .pth file (no network), which
    makes them importable but leaves this environment's own .pth files (the editable mlproj) unprocessed; the
    returned folder, for JUPYTER_PATH, holds the dependencies' data files (nbconvert's templates) but no kernel spec,
    so the kernel papermill starts is the venv's own Python."""
    import sysconfig
    def make(wheel, base):
        base = Path(base); venv = base/'venv'
        subprocess.run([sys.executable, '-m', 'venv', str(venv)], check=True)
        py = venv/'bin/python'
        site = subprocess.run([str(py), '-c', 'import sysconfig; print(sysconfig.get_paths()["purelib"])'], capture_output=True, text=True, check=True).stdout.strip()
        Path(site, 'mlproj_test_dependencies.pth').write_text(sysconfig.get_paths()['purelib'] + '\n')
        subprocess.run([str(py), '-m', 'pip', 'install', '--quiet', '--no-deps', '--no-index', str(wheel)], check=True)
        jupyter = base/'jupyter'; jupyter.mkdir()
        (jupyter/'nbconvert').symlink_to(Path(sys.prefix)/'share/jupyter/nbconvert')
        return venv, jupyter
    return make


class ProjectCopy:
    """A copy of the checkout under `base` whose notebooks a test edits as a user would (`edits`: [(notebook, text of
    the code cell's source, its new source)], `assets`: {path in the copy: writer(path)}), rebuilt with `nbdev_export`
    and installed from its wheel in a fresh venv (`fresh_venv`). `run(*argv)` runs the copy's `mlproj` in `work`."""
    def __init__(self, base, fresh_venv, edits=(), assets=None):
        self.base = Path(base); self.src = self.base/'src'
        shutil.copytree(REPO, self.src, symlinks=True, ignore=shutil.ignore_patterns('.git', '.venv', 'outputs', 'build', 'dist', '*.egg-info', '__pycache__', 'node_modules'))
        for nb, starts, source in edits: self.edit(nb, starts, source)
        for rel, write in (assets or {}).items(): write(self.src/rel)
        self.venv, jupyter = fresh_venv(self._wheel(), self.base)
        self.work = self.base/'work'; self.work.mkdir()
        self.env = {k: v for k, v in os.environ.items() if k not in ('MLPROJ_JOB_NOTEBOOKS', 'PYTHONPATH', 'MLPROJ_OPT_ML')}
        self.env.update(MLPROJ_OUTPUTS=str(self.work/'outputs'), MPLBACKEND='Agg', JUPYTER_PATH=str(jupyter))

    def edit(self, notebook: str, starts: str, source: str):
        "Replace the one code cell of nbs/`notebook` whose source holds `starts` (refused unless exactly one does)."
        import nbformat
        path = self.src/'nbs'/notebook
        nb = nbformat.read(path, as_version=4)
        cells = [c for c in nb.cells if c.cell_type == "code" and starts in c.source]
        assert len(cells) == 1, f'{notebook}: {len(cells)} code cells start with {starts!r}'
        cells[0].source = source
        nbformat.write(nb, path)

    def _wheel(self) -> Path:
        "Export the package from the copy's notebooks and build its wheel."
        r = subprocess.run([str(Path(sys.executable).parent/'nbdev_export')], cwd=self.src, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-2000:]
        wheels = self.base/'wheels'; shutil.rmtree(wheels, ignore_errors=True)
        r = subprocess.run([sys.executable, '-m', 'pip', 'wheel', '--quiet', '--no-deps', '--no-build-isolation', '-w', str(wheels), str(self.src)],
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-2000:]
        return next(wheels.glob('mlproj-*.whl'))

    def rebuild(self):
        "After more edits: export, build and reinstall the package in the copy's venv."
        subprocess.run([str(self.venv/'bin/python'), '-m', 'pip', 'install', '--quiet', '--no-deps', '--no-index', '--force-reinstall', str(self._wheel())], check=True)

    def run(self, *argv, timeout=900) -> subprocess.CompletedProcess:
        return subprocess.run([str(self.venv/'bin/mlproj'), *argv], cwd=self.work, env=self.env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope='session')
def project_copy(fresh_venv):
    "`make(base, edits, assets) -> ProjectCopy`: a rebuilt, installed copy of the checkout with some cells edited (see `ProjectCopy`)."
    return lambda base, edits=(), assets=None: ProjectCopy(base, fresh_venv, edits, assets)

# AWS: only moto's server on loopback, never AWS. Test files use `pytestmark = pytest.mark.usefixtures('loopback_only')`.
MOTO_BUCKET = 'mlproj-test-bucket'
LOOPBACK = {'127.0.0.1', 'localhost', '::1'}
# fake credentials for moto, distinctive enough that finding one anywhere means it leaked
FAKE_KEY_ID, FAKE_SECRET = 'AKIAMLPROJTESTKEY0001', 'mlproj-test-secret-do-not-leak-0001'


@pytest.fixture
def loopback_only(monkeypatch):
    "Fail any test that tries to reach a host other than loopback."
    real, attempts = socket.socket.connect, []
    def guarded(self, address):
        host = address[0] if isinstance(address, tuple) else address
        if isinstance(host, str) and host not in LOOPBACK and not host.startswith('/'):
            attempts.append(address)      # recorded too, in case the caller swallows the error (telemetry would)
            raise ConnectionRefusedError(f'test tried to reach {address}: only loopback is allowed')
        return real(self, address)
    monkeypatch.setattr(socket.socket, 'connect', guarded)
    yield
    assert not attempts, f'tried to reach non-loopback endpoints: {attempts}'


@pytest.fixture(scope='module')
def moto_server():
    from moto.server import ThreadedMotoServer
    server = ThreadedMotoServer(ip_address='127.0.0.1', port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {'AWS_ENDPOINT_URL': f'http://127.0.0.1:{port}', 'AWS_ACCESS_KEY_ID': FAKE_KEY_ID, 'AWS_SECRET_ACCESS_KEY': FAKE_SECRET,
           'AWS_DEFAULT_REGION': 'us-east-1', 'AWS_REGION': 'us-east-1', 'AWS_CONFIG_FILE': '/dev/null', 'AWS_SHARED_CREDENTIALS_FILE': '/dev/null'}
    old = {k: os.environ.get(k) for k in list(env) + ['AWS_PROFILE', 'AWS_SESSION_TOKEN']}
    os.environ.update(env); os.environ.pop('AWS_PROFILE', None); os.environ.pop('AWS_SESSION_TOKEN', None)
    import boto3
    boto3.client('s3').create_bucket(Bucket=MOTO_BUCKET)
    yield env
    server.stop()
    for k, v in old.items():
        if v is None: os.environ.pop(k, None)
        else: os.environ[k] = v


@pytest.fixture
def cli(monkeypatch, tmp_path):
    "`run(*args) -> (exit code, stdout, stderr)`: the mlproj command in-process, outputs under tmp_path."
    from mlproj.cli import main
    monkeypatch.setenv('MLPROJ_OUTPUTS', str(tmp_path/'outputs'))
    old, cold = signal.getsignal(signal.SIGTERM), os.environ.get('MLPROJ_COLD')
    def run(*args):
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err): code = main([str(a) for a in args])
        return code, out.getvalue(), err.getvalue()
    yield run
    signal.signal(signal.SIGTERM, old)
    if cold is None: os.environ.pop('MLPROJ_COLD', None)          # main() sets it for its jobs (--cold/--warm): not for the next test
    else: os.environ['MLPROJ_COLD'] = cold


# --- a local endpoint (`mlproj serve`) for the serving tests ---------------------------------------------------------

def start_endpoint(argv, outputs, cwd=None):
    "`argv` (an `mlproj serve ... --port 0` command line) in a subprocess: (process, base url, stderr file) once /ping answers 200."
    import re, time, urllib.error, urllib.request
    Path(outputs).mkdir(parents=True, exist_ok=True)
    err = open(Path(outputs)/f'serve-{time.monotonic_ns()}.log', 'w+')
    p = subprocess.Popen([str(a) for a in argv], stdout=subprocess.PIPE, stderr=err, text=True, cwd=cwd,
                         env={**os.environ, 'MLPROJ_OUTPUTS': str(outputs)})
    said = queue.Queue()                      # its first line, read aside: a server that hangs before it fails the test, not CI
    threading.Thread(target=lambda: said.put(p.stdout.readline()), daemon=True).start()
    try: line = said.get(timeout=300)
    except queue.Empty: line = '(nothing in 300 s)'
    m = re.search(r'listening on (http://127\.0\.0\.1:\d+)', line)
    if not m:
        p.kill(); err.seek(0); raise AssertionError(f'server did not start: {line!r}\n{err.read()[-3000:]}')
    for _ in range(1200):
        try:
            if urllib.request.urlopen(m.group(1) + '/ping', timeout=10).status == 200: return p, m.group(1), err
        except OSError: time.sleep(0.05)         # refused, reset, or slow under load (URLError and TimeoutError are OSErrors)
    p.kill(); raise AssertionError('no 200 from /ping')


def stop_endpoint(p, err=None):
    "SIGTERM: the arbiter stops its workers and exits 0 (graceful)."
    p.send_signal(signal.SIGTERM)
    assert p.wait(60) == 0
    if err is not None: err.close()


@contextlib.contextmanager
def endpoint(argv, outputs, cwd=None):
    "`with endpoint(argv, outputs) as (url, stderr file)`: `start_endpoint`, then `stop_endpoint` at the end."
    p, url, err = start_endpoint(argv, outputs, cwd)
    try: yield url, err
    finally: stop_endpoint(p, err)
