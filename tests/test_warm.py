"""Warm starts (issue 22): local job processes forked from a server that imported the heavy libraries stand for fresh
interpreters — isolated from each other, thread pools sized from their own environment, the same outputs and reports
as `--cold` — and a stopped job ends every process it started, even one stuck in native code with its SIGTERM handler
never running (issue 21). Timing is measured in bench/bench_startup.py, never asserted here."""
import gc, hashlib, json, os, signal, subprocess, sys, tarfile, textwrap, time, warnings
from pathlib import Path
import nbformat
import pytest
from mlproj.jobs import JobSpec, JobOutput, render_request
from mlproj.local import run_local, warm_server, instance_processes
from mlproj.runner import INSTANCE_ENV

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(params=['warm', 'cold'])
def start(request, monkeypatch):
    monkeypatch.setenv('MLPROJ_COLD', '1' if request.param == 'cold' else '0')
    monkeypatch.setenv('MPLBACKEND', os.environ.get('MPLBACKEND', 'Agg'))
    return request.param


def job(tmp_path, name, body, **kw):
    p = tmp_path/f'{name}.py'
    p.write_text(textwrap.dedent(body))
    return render_request(JobSpec(name, ['python3', str(p)], **kw))


def report(tmp_path, name, body, **kw):
    "Run a one-instance job whose entry prints one JSON line last; that line."
    d = run_local(job(tmp_path, name, body, **kw), jobs_dir=tmp_path/'jobs', stream=None)
    assert d['ProcessingJobStatus'] == 'Completed', d
    return json.loads((tmp_path/'jobs'/name/'algo-1.log').read_text().strip().splitlines()[-1])


def alive(pid):
    try: return 'State:\tZ' not in Path(f'/proc/{pid}/status').read_text()
    except FileNotFoundError: return False


def test_a_job_never_sees_what_an_earlier_job_did(tmp_path, monkeypatch):
    monkeypatch.setenv('MLPROJ_COLD', '0'); monkeypatch.setenv('MPLBACKEND', os.environ.get('MPLBACKEND', 'Agg'))
    server = warm_server(); assert server is not None and server.ready()
    first = report(tmp_path, 'leak', """
        import json, os, sys
        preloaded = 'sklearn' in sys.modules
        import numpy, sklearn, mlproj
        numpy.LEAKED = sklearn.LEAKED = 1; os.environ['LEAKED'] = '1'; sys.modules['leaked_module'] = sys; sys.path.append('/leaked')
        print(json.dumps({'ppid': os.getppid(), 'preloaded': preloaded}))""")
    second = report(tmp_path, 'look', """
        import json, os, sys
        preloaded = 'sklearn' in sys.modules
        import numpy, sklearn
        print(json.dumps({'ppid': os.getppid(), 'preloaded': preloaded, 'mlproj': 'mlproj' in sys.modules,
                          'leaks': [hasattr(numpy, 'LEAKED'), hasattr(sklearn, 'LEAKED'), 'LEAKED' in os.environ,
                                    'leaked_module' in sys.modules, '/leaked' in sys.path]}))""")
    assert first == {'ppid': server.proc.pid, 'preloaded': True}          # forked from the server: warm
    assert second == {'ppid': server.proc.pid, 'preloaded': True, 'mlproj': False, 'leaks': [False] * 5}


def test_cold_jobs_are_fresh_interpreters(tmp_path, monkeypatch):
    monkeypatch.setenv('MLPROJ_COLD', '1')
    got = report(tmp_path, 'cold', """
        import json, os, sys
        print(json.dumps({'ppid': os.getppid(), 'preloaded': 'sklearn' in sys.modules, 'warm': 'MLPROJ_WARM' in os.environ}))""")
    assert got == {'ppid': os.getpid(), 'preloaded': False, 'warm': False}


THREADS = """
    import json, os, sys
    import numpy, sklearn.ensemble
    from threadpoolctl import threadpool_info
    info = sorted((i['internal_api'], i['num_threads']) for i in threadpool_info())
    print(json.dumps({'threads': info, 'env': {k: os.environ.get(k) for k in ('OMP_NUM_THREADS', 'OPENBLAS_NUM_THREADS', 'A')},
                      'cwd': os.getcwd() == os.environ['MLPROJ_OPT_ML'], 'umask': oct(os.umask(0o22)),
                      'own_group': os.getpgid(0) == os.getpid(), 'argv': sys.argv[1:]}))
"""


@pytest.mark.parametrize('environment', [{}, {'OMP_NUM_THREADS': '1'}, {'OPENBLAS_NUM_THREADS': '1', 'A': 'b'}])
def test_warm_instance_gets_what_a_fresh_one_gets(tmp_path, monkeypatch, environment):
    "Environment, working folder, umask, process group, argv and the thread pools sized from the instance's own environment."
    got = {}
    for mode in ('warm', 'cold'):
        monkeypatch.setenv('MLPROJ_COLD', '1' if mode == 'cold' else '0')
        req = job(tmp_path, f'threads-{mode}', THREADS, environment=environment)
        req['AppSpecification']['ContainerArguments'] = ['x', 'y z']
        d = run_local(req, jobs_dir=tmp_path/'jobs', stream=None)
        assert d['ProcessingJobStatus'] == 'Completed', d
        got[mode] = json.loads((tmp_path/'jobs'/f'threads-{mode}'/'algo-1.log').read_text().strip().splitlines()[-1])
    assert got['warm'] == got['cold']
    assert got['cold']['argv'] == ['x', 'y z'] and got['cold']['own_group']
    if environment: assert 1 in [n for _, n in got['warm']['threads']]


STUCK = """
    import ctypes, os, pathlib, signal, subprocess, sys
    root = pathlib.Path(os.environ['MLPROJ_OPT_ML'])
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))      # a handler that would stop it ... if it ever ran
    child = subprocess.Popen([sys.executable, '-c', 'import signal, time; signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGTERM]); time.sleep(600)'],
                             start_new_session=True)              # and a process of its own, in a session of its own
    (root/'pids').write_text(f'{os.getpid()} {child.pid}')
    signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGTERM, signal.SIGINT])
    libc = ctypes.CDLL(None)
    while True: libc.sleep(60)                                    # native code: the interpreter never gets control back
"""


def started(pid):
    "Process `pid`'s start time (with the pid, it names one process), or None."
    try: return Path(f'/proc/{pid}/stat').read_text().rsplit(')', 1)[1].split()[19]
    except FileNotFoundError: return None


def still_running(procs: dict) -> list:
    "Those of `procs` ({pid: start time}) still running: not ended, not a zombie, not the pid reused."
    return [p for p, t in procs.items() if alive(p) and started(p) == t]


def carries(pid, token) -> bool:
    "Does /proc/PID/environ show the instance's token? (A warm, forked process shows its fork server's environment.)"
    return f'{INSTANCE_ENV}={token}'.encode() in Path(f'/proc/{pid}/environ').read_bytes().split(b'\0')


def wait_for(read, what, out):
    "The value `read()` returns once it stops raising, while the job still runs (`out` still empty)."
    for _ in range(1200):
        assert not out, f'the job ended before {what}'
        try: return read()
        except (FileNotFoundError, ValueError): time.sleep(0.1)
    raise AssertionError(f'never saw {what}')


def test_a_step_stuck_in_native_code_is_stopped(tmp_path, start):
    """While the job runs, `instance_processes` finds the instance and the process it started in a session of its own (when warm, the
    instance's /proc environment does not carry its token: the fork server's word is what finds it); once stopped, none of them remains."""
    req = job(tmp_path, 'stuck', STUCK, max_runtime=10)
    token = f'stuck:algo-1:{os.getpid()}'
    t = __import__('threading').Thread(target=lambda: out.append(run_local(req, jobs_dir=tmp_path/'jobs', stream=None, grace=1)), daemon=True)
    out = []; t.start()
    def pids():
        got = [int(p) for p in (tmp_path/'jobs/stuck/algo-1/pids').read_text().split()]
        if len(got) != 2: raise ValueError(got)
        return got
    instance, child = wait_for(pids, 'it wrote its pids', out)
    running = {p: started(p) for p in instance_processes(token)}
    assert not out, 'the job ended before its processes were looked for'
    assert {instance, child} <= set(running), (instance, child, running)
    assert carries(instance, token) == (start == 'cold') and carries(child, token)   # warm: only the server knows the instance is this job's
    t.join(120)                                                   # a hang guard, not a timing check
    assert out, 'run_local did not return'
    assert out[0]['ProcessingJobStatus'] == 'Stopped' and 'MaxRuntimeInSeconds' in out[0]['FailureReason']
    assert instance_processes(token) == []
    assert still_running(running) == [] and not alive(instance) and not alive(child)


def make_nb(path, cells):
    nb = nbformat.v4.new_notebook()
    nb.metadata = {'kernelspec': {'name': 'python3', 'display_name': 'python3', 'language': 'python'}}
    pc = nbformat.v4.new_code_cell('n: int = 3  # how many'); pc.metadata['tags'] = ['parameters']
    nb.cells = [nbformat.v4.new_markdown_cell('# test notebook'), pc] + [nbformat.v4.new_code_cell(c) for c in cells]
    nbformat.write(nb, path)
    return path


def notebook_job(tmp_path, name, cells, nb=None, **kw):
    nb = nb or make_nb(tmp_path/f'{name}.ipynb', cells)
    return render_request(JobSpec(name, ['python3', '-m', 'mlproj.runner', str(nb), '--report', '/opt/ml/processing/output/report'],
                                  outputs=[JobOutput('report', str(tmp_path/f'{name}-report'))], **kw))


def test_a_kernel_stuck_in_native_code_is_stopped(tmp_path, start):
    "The kernel runs in a session of its own: when the job stops, it is ended too, though it never notices papermill is gone."
    cell = ("import os, re, signal\n"
            f"open({str(tmp_path/'kernel.pid')!r}, 'w').write(str(os.getpid()))\n"
            "signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])\n"
            "re.match(r'(a+)+$', 'a' * 64 + 'b')   # backtracking in C for ages, holding the GIL: not even the kernel's parent poller runs")
    req = notebook_job(tmp_path, 'stuck-nb', [cell], max_runtime=15)
    token = f'stuck-nb:algo-1:{os.getpid()}'
    t = __import__('threading').Thread(target=lambda: out.append(run_local(req, jobs_dir=tmp_path/'jobs', stream=None, grace=2)), daemon=True)
    out = []; t.start()
    kernel = wait_for(lambda: int((tmp_path/'kernel.pid').read_text()), 'the kernel wrote its pid', out)
    running = {p: started(p) for p in instance_processes(token)}
    assert not out, 'the job ended before its processes were looked for'
    assert kernel in running and len(running) >= 2, (kernel, running)     # the kernel, and papermill's process
    assert carries(kernel, token) == (start == 'cold')           # warm: the kernel is the kernel server's child, not even the instance's descendant
    t.join(120)                                                   # a hang guard, not a timing check
    assert out and out[0]['ProcessingJobStatus'] == 'Stopped', out
    for _ in range(100):                                          # SIGKILL is delivered at once; the parent reaps it soon after
        if not alive(kernel): break
        time.sleep(0.1)
    assert instance_processes(token) == []
    assert still_running(running) == [] and not alive(kernel)


def _strip(nb_path):
    "An executed notebook without what differs between any two runs (times, the job's temporary paths)."
    nb = nbformat.read(nb_path, as_version=4)
    for c in nb.cells:
        c.metadata.pop('papermill', None); c.metadata.pop('execution', None)
    nb.metadata.pop('papermill', None)
    return nbformat.writes(nb)


def test_the_notebook_and_report_are_the_same_warm_or_cold(tmp_path, monkeypatch):
    cells = ['import numpy as np, pandas as pd\nprint(pd.DataFrame({"a": np.arange(n)}).sum().to_dict())', 'import sys\n[m for m in ("IPython",) if m not in sys.modules]',
             'import matplotlib.pyplot as plt\nplt.plot([1, 2, 3]); plt.show()']
    got, nb = {}, make_nb(tmp_path/'same.ipynb', cells)
    for mode in ('warm', 'cold'):
        monkeypatch.setenv('MLPROJ_COLD', '1' if mode == 'cold' else '0')
        name = f'same-{mode}'
        d = run_local(notebook_job(tmp_path, name, cells, nb=nb), jobs_dir=tmp_path/'jobs', stream=None)
        assert d['ProcessingJobStatus'] == 'Completed', d
        html = (tmp_path/f'{name}-report/same.html').read_text()
        got[mode] = (_strip(tmp_path/f'{name}-report/same.ipynb'), len(html) > 1000, html.count('<div class="jp-Cell '))
    assert got['warm'] == got['cold']
    outputs = [o for c in nbformat.reads(got['warm'][0], as_version=4).cells for o in c.get('outputs', [])]
    assert outputs[0]['text'] == "{'a': 3}\n" and outputs[1]['data']['text/plain'] == '[]', outputs   # and IPython only where a kernel brings it


def _files(run_dir):
    "{relative path: sha256} of a run's outputs; tarballs by their members (a tar records times); reports and records left out."
    out = {}
    for p in sorted(Path(run_dir).rglob('*')):
        rel = p.relative_to(run_dir).as_posix()
        if not p.is_file() or p.suffix in ('.ipynb', '.html') or p.name == 'run.json': continue
        if p.name.endswith('.tar.gz'):
            with tarfile.open(p) as t:
                for m in t.getmembers():
                    if m.isfile(): out[f'{rel}:{m.name}'] = hashlib.sha256(t.extractfile(m).read()).hexdigest()
        else: out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def test_the_pipeline_writes_the_same_bytes_warm_or_cold(tmp_path):
    """`mlproj run` (script engine) and `mlproj run --cold`: every output file the same, byte for byte. And `--no-cache` runs every
    step (test_pipeline.py's check): the cold run, after a completed warm run of the same inputs and parameters, reuses none of it."""
    env = {**os.environ, 'MLPROJ_OUTPUTS': str(tmp_path/'outputs'), 'MPLBACKEND': os.environ.get('MPLBACKEND', 'Agg'), 'MLPROJ_COLD': '0'}
    for mode, extra in (('warm', []), ('cold', ['--cold'])):
        p = subprocess.run([str(Path(sys.executable).parent/'mlproj'), 'run', '--engine', 'script', '--no-cache', '--run-id', mode,
                            '-p', 'train.n_estimators=50'] + extra, env=env, capture_output=True, text=True, timeout=900)
        assert p.returncode == 0, p.stderr[-2000:]
        rec = json.loads((tmp_path/'outputs'/mode/'run.json').read_text())
        assert rec['status'] == 'Completed' and len(rec['steps']) == 5, rec
        assert [(s['cache'], s['cache_reason']) for s in rec['steps']] == [('miss', 'cache disabled (--no-cache)')] * 5, rec['steps']
    warm, cold = _files(tmp_path/'outputs/warm'), _files(tmp_path/'outputs/cold')
    assert len(warm) >= 8 and any(k.endswith(':model.skops') for k in warm), sorted(warm)
    assert warm == cold


def test_run_local_leaves_no_file_open(tmp_path, start):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always', ResourceWarning)
        d = run_local(job(tmp_path, 'files', "print('x')", outputs=[JobOutput('out', str(tmp_path/'out'))], instance_count=2),
                      jobs_dir=tmp_path/'jobs', stream=None)
        gc.collect()
    assert d['ProcessingJobStatus'] == 'Completed'
    assert [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)] == []
