"""`make lab`: JupyterLab over the project with a sandbox `/opt/ml`, checked through its REST API and in a real browser.

One server per test module (`make test` keeps the module on one worker: conftest's ONE_WORKER), started the way
`make lab` starts it (`python -m mlproj.lab`), on an
ephemeral loopback port, with temporary Jupyter config/data/runtime folders (the user's ~/.jupyter is not read or
written) and a temporary sandbox. The run that fills the sandbox is made once per test session and shared.
The browser tests drive Debian's headless Chromium through Playwright; without one they fail saying how to install it."""
from __future__ import annotations
import hashlib, json, os, queue, re, shutil, signal, subprocess, sys, threading, time, urllib.request
from pathlib import Path
import nbformat
import pytest

REPO = Path(__file__).resolve().parents[1]
JOBS = ['preprocess', 'train', 'evaluate', 'batch_inference', 'monitor']
SHOTS = REPO/'outputs'/'lab'                    # screenshots for a person to look at (names unique per test)
CHROMIUM = shutil.which('chromium') or ('/usr/bin/chromium' if Path('/usr/bin/chromium').exists() else None)


class Lab:
    "A running `python -m mlproj.lab`: its URL, token, sandbox and Jupyter runtime folder."
    def __init__(self, proc, url, sandbox, runtime, outputs):
        self.proc, self.url, self.sandbox, self.runtime, self.outputs = proc, url, sandbox, runtime, outputs
        self.base, self.token = re.match(r'(http://127\.0\.0\.1:\d+/)lab\?token=(\w+)$', url).groups()

    def api(self, path, method='GET', body=None):
        req = urllib.request.Request(self.base + path, method=method, data=None if body is None else json.dumps(body).encode(),
                                     headers={'Authorization': f'token {self.token}', 'Content-Type': 'application/json'})
        with urllib.request.urlopen(req, timeout=60) as r: return json.loads(r.read() or b'null')


def _read_lines(stream, q):
    for line in stream: q.put(line)
    q.put(None)


def _settings(config_dir: Path):
    "JupyterLab settings of the test server: no autosave (a run notebook must never be written back), no news prompt."
    for plugin, value in [('docmanager-extension/plugin', {'autosave': False}),
                          ('notebook-extension/tracker', {'windowingMode': 'none'}),     # every cell in the page, for the checks
                          ('apputils-extension/notification', {'fetchNews': 'false', 'checkForUpdates': False})]:
        f = config_dir/'lab'/'user-settings'/'@jupyterlab'/f'{plugin}.jupyterlab-settings'
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(json.dumps(value))


@pytest.fixture(scope='module')
def lab(tmp_path_factory, opt_ml_build_once):
    "JupyterLab started by `python -m mlproj.lab --port 0` (what `make lab` runs), stopped (process group) at the end."
    from mlproj.pipeline import run_pipeline
    runs = opt_ml_build_once('lab_runs', lambda d: run_pipeline(outputs_dir=d, engine='script', stream=None))
    base = tmp_path_factory.mktemp('lab')
    jdirs = {k: base/'jupyter'/k for k in ('config', 'data', 'runtime')}
    for d in jdirs.values(): d.mkdir(parents=True)
    _settings(jdirs['config'])
    env = {k: v for k, v in os.environ.items() if not k.startswith(('MLPROJ_OPT_ML', 'JUPYTER'))}
    env.update(MLPROJ_OUTPUTS=str(runs), JUPYTER_CONFIG_DIR=str(jdirs['config']), JUPYTER_DATA_DIR=str(jdirs['data']),
               JUPYTER_RUNTIME_DIR=str(jdirs['runtime']))
    log = open(base/'lab.log', 'w')
    proc = subprocess.Popen([sys.executable, '-m', 'mlproj.lab', '--port', '0', '--sandbox', str(base/'opt_ml')], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL, text=True, start_new_session=True)
    q = queue.Queue(); threading.Thread(target=_read_lines, args=(proc.stdout, q), daemon=True).start()
    url, said = None, []
    try:
        while url is None:
            line = q.get(timeout=300)
            if line is None: break
            said.append(line)
            if m := re.match(r'lab: JupyterLab at (\S+)$', line.strip()): url = m.group(1)
        assert url, f'python -m mlproj.lab printed no URL; stdout: {said}\nlog: {(base/"lab.log").read_text()[-3000:]}'
        yield Lab(proc, url, base/'opt_ml', jdirs['runtime'], runs)
    finally:
        server = [int(m.group(1)) for f in jdirs['runtime'].glob('jpserver-*.json') if (m := re.fullmatch(r'jpserver-(\d+)\.json', f.name))]
        started = server + [k for pid in server for k in _children(pid)]          # the server and its kernels
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)              # the lab stops its server, which shuts its kernels down
            try: proc.wait(60)
            except subprocess.TimeoutExpired: os.killpg(proc.pid, signal.SIGKILL); proc.wait()
        log.close()
        left = [pid for pid in started if _wait_gone(pid)]
        for pid in left: os.kill(pid, signal.SIGKILL)
        assert not left, f'processes left running after the lab was stopped: {left}'


def _children(pid: int) -> list[int]:
    "Pids of the live children of `pid` (from /proc)."
    out = []
    for st in Path('/proc').glob('[0-9]*/stat'):
        try: fields = st.read_text().rsplit(')', 1)[1].split()
        except OSError: continue
        if int(fields[1]) == pid: out.append(int(st.parent.name))
    return out


def _wait_gone(pid: int, timeout: float = 20) -> bool:
    "True if process `pid` still runs (not a zombie) after `timeout` seconds."
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        try: state = Path(f'/proc/{pid}/stat').read_text().rsplit(')', 1)[1].split()[0]
        except OSError: return False
        if state == 'Z': return False
        time.sleep(0.2)
    return True


def test_lab_prints_a_loopback_url_with_a_token_and_fills_the_sandbox(lab):
    assert lab.base.startswith('http://127.0.0.1:') and len(lab.token) >= 32
    with pytest.raises(urllib.error.HTTPError) as e: urllib.request.urlopen(lab.base + 'api/kernelspecs', timeout=30)   # no token
    assert e.value.code == 403
    inp, out = lab.sandbox/'processing'/'input', lab.sandbox/'processing'/'output'
    assert sorted(p.name for p in inp.iterdir()) == ['data', 'evaluation', 'model', 'predictions', 'raw', 'test', 'train']
    assert (inp/'model'/'model.tar.gz').is_file() and (inp/'test'/'test-algo-1.csv').is_file()
    assert sorted(p.name for p in out.iterdir()) == ['evaluation', 'model', 'monitoring', 'predictions', 'test', 'train']
    assert lab.api('api/status')['started']


def test_kernel_spec_is_the_project_venv(lab):
    specs = lab.api('api/kernelspecs')
    assert specs['default'] == 'python3'
    argv = specs['kernelspecs']['python3']['spec']['argv']
    assert os.path.abspath(argv[0]) == os.path.abspath(sys.executable), argv      # the venv's Python, not the system's


def run_in_server_kernel(lab, notebook: Path) -> list[dict]:
    "Run every code cell of `notebook` in a kernel the server starts in the notebook's folder; [{cell, type, ...}] of its outputs."
    return run_cells(lab, [c.source if c.cell_type == 'code' else None for c in nbformat.read(notebook, as_version=4).cells],
                     str(notebook.parent.relative_to(REPO)), notebook.name)


def run_cells(lab, cells: list, folder: str, name: str = 'cells') -> list[dict]:
    "Run `cells` (sources; None: a markdown cell) in a new kernel of the server, working folder `folder` (relative to the project)."
    from jupyter_client import BlockingKernelClient
    k = lab.api('api/kernels', 'POST', {'name': 'python3', 'path': folder})
    kc = BlockingKernelClient(connection_file=str(lab.runtime/f"kernel-{k['id']}.json"))
    kc.load_connection_file()
    # No heartbeat channel: without it jupyter_client judges liveness by a 1 s heartbeat, and calls a kernel that is
    # still importing on a loaded 2-core machine "died before replying to kernel_info". Readiness is its first
    # kernel_info reply; a kernel that really died is the server's word (its execution_state) when that never comes.
    kc.start_channels(hb=False)
    outs = []
    try:
        try: kc.wait_for_ready(timeout=120)
        except RuntimeError as e:
            state = lab.api(f"api/kernels/{k['id']}")['execution_state']
            raise AssertionError(f"{name}: the server's kernel is {state}: {e}") from e
        for i, src in enumerate(cells):
            if src is None: continue
            hook = lambda msg, i=i: outs.append({'cell': i, 'type': msg['msg_type'], **msg['content']}) if msg['msg_type'] in ('error', 'display_data', 'execute_result', 'stream') else None
            reply = kc.execute_interactive(src, timeout=300, output_hook=hook)
            assert reply['content']['status'] == 'ok', f"{name} cell {i}: {reply['content'].get('ename')}: {reply['content'].get('evalue')}"
    finally:
        kc.stop_channels()
        lab.api(f"api/kernels/{k['id']}", 'DELETE')
    return outs


@pytest.mark.parametrize('job', JOBS)
def test_job_notebook_runs_in_a_kernel_of_the_server(lab, job):
    "Each job notebook runs top to bottom as it is, its /opt/ml defaults landing in the sandbox."
    outs = run_in_server_kernel(lab, REPO/'nbs'/'jobs'/f'{job}.ipynb')
    assert not [o for o in outs if o['type'] == 'error'], outs
    assert any('text/html' in o.get('data', {}) for o in outs), 'no table shown'
    out = lab.sandbox/'processing'/'output'
    written = {'preprocess': out/'train'/'train-algo-1.csv', 'train': out/'model'/'model.tar.gz',
               'evaluate': out/'evaluation'/'evaluation.json', 'batch_inference': out/'predictions'/'predictions-algo-1.csv',
               'monitor': out/'monitoring'/'constraint_violations.json'}[job]
    assert written.is_file(), f'{job} wrote nothing to the sandbox ({written})'
    if job == 'evaluate': assert any('image/png' in o.get('data', {}) for o in outs), 'no figure shown'


def test_kernel_sees_the_sandbox_and_project_outputs(lab):
    "A kernel of the lab: /opt/ml is the sandbox, MLPROJ_OUTPUTS absolute (kernels run in nbs/), figures inline (no MPLBACKEND=Agg)."
    outs = run_cells(lab, ["import os, matplotlib; from mlproj.contract import container_path\n"
                           "print(container_path('/opt/ml/processing/input/model'), os.environ['MLPROJ_OUTPUTS'], matplotlib.get_backend())"], 'nbs')
    opt_ml, outputs, backend = ''.join(o.get('text', '') for o in outs if o['type'] == 'stream').split()
    assert opt_ml == str(lab.sandbox.resolve()/'processing'/'input'/'model')
    assert outputs == str(lab.outputs.resolve())
    assert 'inline' in backend, backend


def _digest(p: Path) -> str: return hashlib.sha256(p.read_bytes()).hexdigest()

def _git_status(*paths) -> str:
    return subprocess.run(['git', 'status', '--porcelain', '--untracked-files=all', '--', *map(str, paths)], cwd=REPO,
                          capture_output=True, text=True, check=True).stdout


def test_saving_an_unchanged_notebook_through_the_server_leaves_git_clean(lab):
    "A save carries what JupyterLab adds once a kernel runs (language_info, execution counts, timing metadata); nbdev's hook cleans it."
    rel = 'nbs/jobs/train.ipynb'; path = REPO/rel
    raw, status = path.read_bytes(), _git_status(path.parent)
    before = _digest(path)
    model = lab.api(f'api/contents/{rel}?content=1')
    nb = model['content']
    nb['metadata']['language_info'] = {'name': 'python', 'version': sys.version.split()[0]}
    for c in nb['cells']:
        if c['cell_type'] == 'code': c['execution_count'] = 1; c['metadata']['execution'] = {'iopub.status.idle': '2026-01-01T00:00:00Z'}
    try:
        lab.api(f'api/contents/{rel}', 'PUT', {'type': 'notebook', 'format': 'json', 'content': nb})
        assert _digest(path) == before, f'saving {rel} through JupyterLab changed it:\n' + subprocess.run(['git', 'diff', '--', rel], cwd=REPO, capture_output=True, text=True).stdout[:3000]
        assert _git_status(path.parent) == status            # nothing new beside it either (nbdev_trust's .last_checked is ignored)
        tags = [c.metadata.get('tags') for c in nbformat.read(path, as_version=4).cells if c.cell_type == 'code']
        assert ['parameters'] in tags
    finally:
        if _digest(path) != before: path.write_bytes(raw)


# --- in a real browser ------------------------------------------------------------------


PANEL = '.jp-NotebookPanel:not(.lm-mod-hidden)'
RUN_ALL_DONE = """n => { const ps = [...document.querySelectorAll('%s .jp-CodeCell .jp-InputPrompt')].map(e => e.textContent.trim());
                      if (ps.length !== n || ps.some(t => t.includes('*'))) return false;
                      const failed = [...document.querySelectorAll('%s .jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"]')]
                                     .some(e => /Traceback|^\\w*(Error|Exception)\\b/m.test(e.textContent));
                      return failed || ps.every(t => /^\\[\\d+\\]:$/.test(t)); }""" % (PANEL, PANEL)
KERNEL_IDLE = "() => [...document.querySelectorAll('.jp-StatusBar-TextItem')].some(e => /\\| Idle$/.test(e.textContent.trim()))"


@pytest.fixture(scope='module')
def browser():
    assert CHROMIUM is not None, "no Chromium binary: apt-get install -y chromium (Debian; .ci/run installs it)"   # a failure, never a silent skip
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=['--no-sandbox'])      # root needs --no-sandbox
        yield b
        b.close()


def open_notebook(browser, lab, rel: str, height: int = 1000):
    "A page showing notebook `rel` with its kernel started and idle."
    page = browser.new_page(viewport={'width': 1400, 'height': height})
    page.set_default_timeout(120_000)
    page.goto(f'{lab.base}lab/tree/{rel}?reset&token={lab.token}')       # reset: not the tabs of the previous test's workspace
    page.wait_for_selector('.jp-NotebookPanel .jp-Cell')
    page.wait_for_function(KERNEL_IDLE)
    return page


def run_all(page, rel: str):
    "Run ▸ Run All Cells from the menu bar, then wait until every code cell has run (or one failed) and the kernel is idle."
    n = sum(c.cell_type == 'code' for c in nbformat.read(REPO/rel, as_version=4).cells)
    page.locator('.lm-MenuBar-itemLabel', has_text='Run').first.click()
    page.click('li[data-command="runmenu:run-all"]')
    page.wait_for_function(RUN_ALL_DONE, arg=n)
    page.wait_for_function(KERNEL_IDLE)
    errors = [t for t in page.locator(f'{PANEL} .jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"]').all_inner_texts()
              if 'Traceback' in t or re.search(r'^\w*(Error|Exception)\b', t, re.M)]
    assert not errors, f'error output in {rel}: {errors[0][:2000]}'
    prompts = [p.strip() for p in page.locator(f'{PANEL} .jp-CodeCell .jp-InputPrompt').all_inner_texts()]
    assert len(prompts) == n and all(re.fullmatch(r'\[\d+\]:', p) for p in prompts), f'cells of {rel} not run: {prompts}'


def _unchanged(*rels):
    "Assert, after a browser test, that the notebooks it ran were not written back (no autosave, no save)."
    return {r: _digest(REPO/r) for r in rels}


def test_browser_run_all_evaluate_renders_metrics_and_confusion_matrix(lab, browser):
    rel = 'nbs/jobs/evaluate.ipynb'
    before = _unchanged(rel)
    page = open_notebook(browser, lab, rel, height=3200)
    try:
        run_all(page, rel)
        tables = page.locator(f'{PANEL} .jp-OutputArea-output table')
        assert tables.count() >= 3, tables.count()                                  # the metric summary, per-class metrics, confusion table
        text = '\n'.join(tables.all_inner_texts())
        for word in ('accuracy', 'macro_f1', 'precision', 'recall', 'Adelie', 'Gentoo'): assert word in text, word
        imgs = page.locator(f'{PANEL} .jp-OutputArea-output img[src^="data:image/png"]')
        assert imgs.count() == 2, imgs.count()                                      # confusion matrix, per-class
        assert all(imgs.nth(i).evaluate('e => e.naturalWidth > 100 && e.naturalHeight > 100') for i in range(2))
        SHOTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SHOTS/'evaluate.png'))
        assert (lab.sandbox/'processing'/'output'/'evaluation'/'confusion_matrix.png').is_file()
    finally: page.close()
    assert _unchanged(rel) == before


def test_browser_run_all_library_notebook_10_data(lab, browser):
    rel = 'nbs/10_data.ipynb'
    before = _unchanged(rel)
    page = open_notebook(browser, lab, rel, height=2000)
    try:
        run_all(page, rel)
        SHOTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SHOTS/'10_data.png'))
    finally: page.close()
    assert _unchanged(rel) == before


def test_browser_save_of_an_opened_notebook_leaves_git_clean(lab, browser):
    "Open a job notebook (its kernel starts, JupyterLab adds kernel metadata), save with Ctrl+S: the file is byte for byte the same."
    rel = 'nbs/jobs/preprocess.ipynb'; path = REPO/rel
    raw, status = path.read_bytes(), _git_status(path.parent)
    before = _digest(path)
    page = open_notebook(browser, lab, rel)
    try:
        page.locator('.jp-NotebookPanel .jp-Notebook').first.click()
        with page.expect_response(lambda r: r.request.method == 'PUT' and f'api/contents/{rel}' in r.url) as saved:
            page.keyboard.press('Control+s')
        assert saved.value.ok, saved.value.status                    # the server has written the file when it answers
        assert _digest(path) == before, 'the save changed the notebook:\n' + subprocess.run(['git', 'diff', '--', rel], cwd=REPO, capture_output=True, text=True).stdout[:3000]
        assert _git_status(path.parent) == status
        cells = nbformat.read(path, as_version=4).cells
        assert any(c.metadata.get('tags') == ['parameters'] for c in cells)
    finally:
        page.close()
        if _digest(path) != before: path.write_bytes(raw)
