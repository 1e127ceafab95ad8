"""Trust and faults: model artifacts that cannot run code, limits that hold, stops that clean up, files that honour
the umask, messages that do not grow with the data. Each test here failed on the code before these changes."""
import gzip, hashlib, io, json, os, pickle, shutil, signal, subprocess, sys, tarfile, time
from pathlib import Path
import pytest


def _artifact(path: Path, members: list) -> Path:
    with gzip.GzipFile(path, 'wb', mtime=0) as gz, tarfile.open(fileobj=gz, mode='w') as tar:
        for name, data in members:
            ti = tarfile.TarInfo(name); ti.size = len(data); tar.addfile(ti, io.BytesIO(data))
    return path


class _Payload:
    "Unpickling this writes a marker file: proof that loading ran code."
    def __init__(self, marker): self.marker = str(marker)
    def __reduce__(self): return (Path.write_text, (Path(self.marker), 'code ran'))


@pytest.mark.parametrize('layout', ['joblib-member', 'pickle-as-skops'])
def test_a_crafted_pickle_neither_runs_nor_loads(layout, tmp_path, opt_ml_tree, opt_ml_trained, opt_ml_penguins, opt_ml_assert_failed):
    t = opt_ml_tree
    marker = tmp_path/'pwned'
    with tarfile.open(opt_ml_trained['model'], 'r:gz') as tar: manifest = json.loads(tar.extractfile('manifest.json').read())
    blob = pickle.dumps(_Payload(marker))
    if layout == 'joblib-member':      # the older layout, with a manifest whose sha256 matches the pickle
        members = [('manifest.json', json.dumps(dict(manifest, format='mlproj-model/2', model_sha256=hashlib.sha256(blob).hexdigest())).encode()), ('model.joblib', blob)]
    else:                              # the current layout, the pickle where the skops file should be
        members = [('manifest.json', json.dumps(dict(manifest, model_sha256=hashlib.sha256(blob).hexdigest())).encode()), ('model.skops', blob)]
    t.input('model').mkdir(parents=True)
    _artifact(t.input('model')/'model.tar.gz', members)
    t.stage('data', opt_ml_penguins)
    line = opt_ml_assert_failed(t.run('batch_inference'), t, 'batch_inference', [t.outputs])
    assert 'processing/input/model/model.tar.gz' in line, line
    assert not marker.exists(), 'the crafted pickle ran'


def test_a_tar_bomb_is_refused_in_little_memory(tmp_path, opt_ml_trained):
    "A model member of 400 MB of zeros (a 400 KB archive) whose hash cannot match: refused, streaming, far under 100 MB."
    with tarfile.open(opt_ml_trained['model'], 'r:gz') as tar: manifest = tar.extractfile('manifest.json').read()
    bomb = tmp_path/'bomb.tar.gz'
    with gzip.GzipFile(bomb, 'wb', mtime=0, compresslevel=1) as gz, tarfile.open(fileobj=gz, mode='w') as tar:
        ti = tarfile.TarInfo('manifest.json'); ti.size = len(manifest); tar.addfile(ti, io.BytesIO(manifest))
        ti = tarfile.TarInfo('model.skops'); ti.size = 400 * 2**20
        class Zeros:                   # 400 MB of zeros, made as they are written (tarfile reads in blocks)
            left = ti.size
            def read(self, n=-1):
                n = self.left if n < 0 else min(n, self.left); self.left -= n; return bytes(n)
        tar.addfile(ti, Zeros())
    assert bomb.stat().st_size < 5 * 2**20
    code = f"""import resource, sys
from mlproj.train import load_model
from mlproj.errors import InputError
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try: load_model({str(bomb)!r}); print('LOADED')
except InputError as e: print('REFUSED', e)
print('GROWTH_MB', (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)"""
    r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=120)
    assert 'REFUSED' in r.stdout and 'does not match the sha256' in r.stdout, r.stdout + r.stderr
    growth = float(r.stdout.split('GROWTH_MB')[1])
    assert growth < 100, f'loading the bomb grew the process by {growth:.0f} MB'


def test_another_model_than_the_expected_one_is_refused(tmp_path, opt_ml_tree, opt_ml_trained, opt_ml_penguins, opt_ml_assert_failed):
    t = opt_ml_tree
    t.stage('model', opt_ml_trained['model']); t.stage('data', opt_ml_penguins)
    wrong = hashlib.sha256(b'another model').hexdigest()
    line = opt_ml_assert_failed(t.run('batch_inference', '--expected_model_sha256', wrong), t, 'batch_inference', [t.outputs])
    assert 'not the expected model' in line, line
    right = hashlib.sha256(opt_ml_trained['model'].read_bytes()).hexdigest()
    assert t.run('batch_inference', '--expected_model_sha256', right).returncode == 0


def test_a_model_is_refused_by_other_feature_code_than_it_was_trained_with(tmp_path, opt_ml_tree, opt_ml_trained, opt_ml_penguins, opt_ml_assert_failed):
    "Training/serving skew: a copy of the package whose features.py differs by one line loads no model this one trained — batch"
    "inference fails the contract's way, the serving handlers' model_fn refuses — while the code it was trained with loads it."
    import mlproj
    pkg = tmp_path/'edited'
    shutil.copytree(Path(mlproj.__file__).parent, pkg/'mlproj', ignore=shutil.ignore_patterns('__pycache__'))
    f = pkg/'mlproj/features.py'
    f.write_text(f.read_text() + '\n# an edit\n')
    t = opt_ml_tree
    t.stage('model', opt_ml_trained['model']); t.stage('data', opt_ml_penguins)
    line = opt_ml_assert_failed(t.run('batch_inference', env={'PYTHONPATH': str(pkg)}), t, 'batch_inference', [t.outputs])
    assert 'trained with other feature code' in line and "retrain it, or load it with the mlproj it was trained with" in line, line
    code = (f"from mlproj.serve import model_fn\ntry: model_fn({str(t.input('model'))!r}); print('LOADED')\n"
            "except Exception as e: print('REFUSED', type(e).__name__, e)")
    runs = {k: subprocess.run([sys.executable, '-c', code], env={**os.environ, **env}, capture_output=True, text=True, timeout=300,
                             cwd=tmp_path)          # not the checkout: `python -c` puts its folder first on sys.path
            for k, env in (('edited', {'PYTHONPATH': str(pkg)}), ('same', {}))}
    assert runs['edited'].stdout.startswith('REFUSED InputError') and 'trained with other feature code' in runs['edited'].stdout, runs['edited']
    assert runs['same'].stdout.strip() == 'LOADED', runs['same']
    assert t.run('batch_inference').returncode == 0


def test_a_model_trained_under_another_scikit_learn_minor_version_is_refused(opt_ml_tree, opt_ml_trained, opt_ml_penguins, opt_ml_assert_failed):
    "A serving container that resolved scikit-learn to a newer minor release than training: one line naming both, not another model's"
    "predictions; another patch release of the same minor version loads."
    import sklearn
    major, minor, *_ = sklearn.__version__.split('.')
    t = opt_ml_tree
    t.stage('data', opt_ml_penguins)
    other = f'{major}.{int(minor) + 1}.0'
    art = _retarred(opt_ml_trained['model'], t.input('model')/'model.tar.gz', lambda m: {**m, 'libraries': {**m['libraries'], 'scikit-learn': other}})
    line = opt_ml_assert_failed(t.run('batch_inference'), t, 'batch_inference', [t.outputs])
    assert line == (f'batch_inference: {art}: trained with scikit-learn {other}, this environment has {sklearn.__version__}: a model does not load '
                    f'or predict the same under another minor version; install scikit-learn=={other} or retrain it'), line
    _retarred(opt_ml_trained['model'], art, lambda m: {**m, 'libraries': {**m['libraries'], 'scikit-learn': f'{major}.{minor}.99'}})
    assert t.run('batch_inference').returncode == 0


def test_sigterm_stops_a_runtime_script_cleanly(tmp_path, opt_ml_tree, opt_ml_trained):
    "SageMaker stops a container with SIGTERM: the message file says so, no temp file is left, exit 143."
    from mlproj.data import synthetic_penguins
    t = opt_ml_tree
    t.stage('model', opt_ml_trained['model'])
    t.input('data').mkdir(parents=True)
    synthetic_penguins(300_000, seed=5).to_csv(t.input('data')/'rows.csv', index=False)
    env = {k: v for k, v in os.environ.items() if k != 'MLPROJ_TRACEBACK'}
    env['MLPROJ_OPT_ML'] = str(t.root)
    p = subprocess.Popen([sys.executable, '-m', 'mlproj.scripts.batch_inference', '--chunksize', '2000'], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out = t.output('predictions')
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not (out.exists() and any(out.iterdir())): time.sleep(0.05)   # writing has begun
    assert out.exists() and any(out.iterdir()), 'the step never started writing'
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 143, (p.returncode, err[-1000:])
    assert t.message.read_text() == 'batch_inference: stopped (SIGTERM)'
    assert [f for f in out.rglob('*')] == [], list(out.rglob('*'))


def test_outputs_honour_the_umask(opt_ml_tree, opt_ml_penguins):
    t = opt_ml_tree
    t.stage('raw', opt_ml_penguins)
    env = {k: v for k, v in os.environ.items() if k != 'MLPROJ_TRACEBACK'}
    env['MLPROJ_OPT_ML'] = str(t.root)
    r = subprocess.run([sys.executable, '-m', 'mlproj.scripts.preprocess'], env=env, capture_output=True, text=True,
                       preexec_fn=lambda: os.umask(0o022))
    assert r.returncode == 0, r.stderr[-1000:]
    modes = {f.name: oct(f.stat().st_mode & 0o777) for f in t.outputs.rglob('*.csv')}
    assert modes == {'train-algo-1.csv': '0o644', 'test-algo-1.csv': '0o644'}, modes


def test_a_huge_bad_cell_gives_a_short_message(opt_ml_tree, opt_ml_penguins, opt_ml_assert_failed):
    t = opt_ml_tree
    lines = opt_ml_penguins.read_text().splitlines()
    header = lines[0].split(',')
    row = lines[5].split(','); row[header.index('body_mass_g')] = 'x' * 50_000_000
    lines[5] = ','.join(row)
    t.stage_text('raw', 'big.csv', '\n'.join(lines) + '\n')
    p = t.run('preprocess')
    line = opt_ml_assert_failed(p, t, 'preprocess', [t.outputs])
    assert len(p.stderr.encode()) < 1024, len(p.stderr)
    assert "row 6, column 'body_mass_g'" in line and '(50,000,000 characters) is not a number' in line, line[:300]


@pytest.mark.parametrize('engine', ['script', 'notebook'])
def test_a_short_runtime_limit_fits_both_engines(engine, tmp_path, monkeypatch, opt_ml_trained):
    "A train step that fits in 25 s completes under --max-runtime 25, with the notebook engine as with the script engine."
    from mlproj.cli import main
    monkeypatch.setenv('MLPROJ_OUTPUTS', str(tmp_path))
    old = signal.getsignal(signal.SIGTERM)
    try: code = main(['job', 'run', 'train', '--engine', engine, '--max-runtime', '25', '--input', f"train={opt_ml_trained['train_csv']}",
                      '-p', 'n_estimators=20', '--name', f'short-{engine}'])
    finally: signal.signal(signal.SIGTERM, old)
    d = json.loads((tmp_path/'jobs'/f'short-{engine}'/'describe.json').read_text())
    assert code == 0 and d['ProcessingJobStatus'] == 'Completed', d.get('FailureReason')


def test_a_notebook_job_past_its_limit_is_stopped_and_keeps_its_report(tmp_path, monkeypatch, opt_ml_trained):
    "As SageMaker does at MaxRuntimeInSeconds: Stopped, not Failed; the runner, stopped by SIGTERM, still saved the executed notebook."
    import nbformat
    from mlproj.cli import main
    from mlproj.jobs import job_notebook
    nb = nbformat.read(job_notebook('train'), as_version=4)
    at = next(i for i, c in enumerate(nb.cells) if 'parameters' in c.metadata.get('tags', []))
    nb.cells.insert(at + 1, nbformat.v4.new_code_cell('import time\nfor _ in range(600): time.sleep(0.1)'))
    (tmp_path/'nbs').mkdir(); nbformat.write(nb, tmp_path/'nbs/train.ipynb')
    monkeypatch.setenv('MLPROJ_OUTPUTS', str(tmp_path/'out')); monkeypatch.setenv('MLPROJ_JOB_NOTEBOOKS', str(tmp_path/'nbs'))
    old = signal.getsignal(signal.SIGTERM)
    try: code = main(['job', 'run', 'train', '--engine', 'notebook', '--max-runtime', '8', '--input', f"train={opt_ml_trained['train_csv']}", '--name', 'too-long'])
    finally: signal.signal(signal.SIGTERM, old)
    d = json.loads((tmp_path/'out/jobs/too-long/describe.json').read_text())
    assert code == 1 and d['ProcessingJobStatus'] == 'Stopped', d
    assert 'MaxRuntimeInSeconds exceeded' in d['FailureReason']
    assert d['ExitMessage'] == 'algo-1: train.ipynb: stopped (SIGTERM)'
    report = tmp_path/'out/jobs/too-long/algo-1/processing/output/report'
    assert sorted(p.name for p in report.iterdir()) == ['train.html', 'train.ipynb']


def test_input_links_leading_outside_the_folder_are_refused(tmp_path, monkeypatch, opt_ml_penguins):
    from mlproj.cli import main
    secret = tmp_path/'not-data.csv'; secret.write_text('penguin_id,species\n1,Adelie\n')
    rows = tmp_path/'rows'; rows.mkdir()
    (rows/'a.csv').write_bytes(opt_ml_penguins.read_bytes())
    (rows/'b.csv').symlink_to(secret)
    monkeypatch.setenv('MLPROJ_OUTPUTS', str(tmp_path/'out'))
    old = signal.getsignal(signal.SIGTERM)
    try: code = main(['job', 'run', 'preprocess', '--engine', 'script', '--input', f'raw={rows}', '--name', 'linked'])
    finally: signal.signal(signal.SIGTERM, old)
    d = json.loads((tmp_path/'out/jobs/linked/describe.json').read_text())
    assert code == 1 and d['ProcessingJobStatus'] == 'Failed' and 'b.csv leads outside the input folder' in d['FailureReason'], d
    assert not any(p.name == 'b.csv' for p in (tmp_path/'out/jobs/linked').rglob('*')), 'the linked file was staged'


def test_secret_looking_environment_values_are_masked_where_mlproj_writes(tmp_path, monkeypatch, capsys):
    "The container gets the value; what mlproj prints and records locally does not hold it."
    from mlproj.cli import main
    from mlproj.jobs import JobSpec, JobOutput, render_request
    from mlproj.local import run_local
    token = 'tok-3f9a1c-do-not-print'
    spec = JobSpec('env-demo', ['python3', '-c', "import os; open(os.environ['MLPROJ_OPT_ML'] + '/processing/output/out/seen.txt', 'w').write(os.environ['API_TOKEN'])"],
                   outputs=[JobOutput('out', str(tmp_path/'seen'))], environment={'API_TOKEN': token, 'MODE': 'fast'})
    d = run_local(render_request(spec), jobs_dir=tmp_path/'jobs', stream=None)
    assert d['ProcessingJobStatus'] == 'Completed' and (tmp_path/'seen/seen.txt').read_text() == token     # the container got it
    assert d['Environment'] == {'API_TOKEN': '****', 'MODE': 'fast'}
    written = [p for p in (tmp_path/'jobs').rglob('*.json')]
    assert written and not [p for p in written if token in p.read_text()], 'a local record holds the secret'
    monkeypatch.setenv('MLPROJ_OUTPUTS', str(tmp_path/'out'))
    assert main(['job', 'request', 'preprocess', '--engine', 'script', '--env', f'API_TOKEN={token}']) == 0
    printed = capsys.readouterr().out
    assert '"API_TOKEN": "****"' in printed and token not in printed


@pytest.mark.parametrize('args,message', [
    (['preprocess', '-p', 'test_size=1.5'], 'parameter test_size=1.5: must be in (0, 1)'),
    (['train', '--input', 'train=TRAIN', '-p', 'n_estimators=10000000000'], 'parameter n_estimators=10000000000: must be in [1, 10000]'),
    (['preprocess', '--output', 'train=FILE/train'], "output 'train' destination"),
])
def test_checks_that_need_no_data_come_before_the_job(args, message, tmp_path, monkeypatch, capsys, opt_ml_trained):
    "Refused with exit 2 and one line, before any sandbox exists (they used to fail after the step ran)."
    from mlproj.cli import main
    (tmp_path/'afile').write_text('')
    args = [a.replace('TRAIN', str(opt_ml_trained['train_csv'])).replace('FILE', str(tmp_path/'afile')) for a in args]
    monkeypatch.setenv('MLPROJ_OUTPUTS', str(tmp_path/'out'))
    old = signal.getsignal(signal.SIGTERM)
    try: code = main(['job', 'run', *args[:1], '--engine', 'script', *args[1:]])
    finally: signal.signal(signal.SIGTERM, old)
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count('\n') == 1, err
    assert not (tmp_path/'out').exists()                       # nothing written: no job, no code bundle


def test_a_runtime_script_checks_ranges_first(opt_ml_tree, opt_ml_penguins, opt_ml_assert_failed):
    t = opt_ml_tree
    t.stage('raw', opt_ml_penguins)
    line = opt_ml_assert_failed(t.run('preprocess', '--test_size', '1.5'), t, 'preprocess', [t.outputs])
    assert line == 'preprocess: parameter test_size=1.5: must be in (0, 1)', line


def test_a_huge_bad_cell_keeps_a_notebook_report_small(tmp_path, monkeypatch, opt_ml_penguins):
    "Through a notebook job: the executed notebook, its HTML and the exit message stay small whatever the bad value's size."
    from mlproj.cli import main
    lines = opt_ml_penguins.read_text().splitlines()
    header = lines[0].split(','); row = lines[5].split(','); row[header.index('body_mass_g')] = '9' * 50_000_000
    lines[5] = ','.join(row); (tmp_path/'big.csv').write_text('\n'.join(lines) + '\n')
    monkeypatch.setenv('MLPROJ_OUTPUTS', str(tmp_path/'out'))
    old = signal.getsignal(signal.SIGTERM)
    try: code = main(['job', 'run', 'preprocess', '--input', f'raw={tmp_path}/big.csv', '--name', 'big-cell'])
    finally: signal.signal(signal.SIGTERM, old)
    job = tmp_path/'out/jobs/big-cell'
    d = json.loads((job/'describe.json').read_text())
    assert code == 1 and d['ProcessingJobStatus'] == 'Failed' and len(d['ExitMessage'].encode()) < 1024
    assert '(50,000,000 characters) is outside the plausible range' in d['ExitMessage'], d['ExitMessage'][:300]
    report = job/'algo-1/processing/output/report'
    for f in ('preprocess.ipynb', 'preprocess.html'): assert (report/f).stat().st_size < 2**20, (f, (report/f).stat().st_size)
    assert (job/'algo-1.log').stat().st_size < 2**20


def test_a_job_that_fails_writing_one_channel_leaves_no_output(tmp_path, monkeypatch, opt_ml_penguins):
    "The second channel's copy fails (a full disk, injected): the first channel's files must not stay at their destination."
    import errno, shutil
    import mlproj.local as local
    from mlproj.jobs import render_request, step_job, write_code_bundle
    real, seen = shutil.copyfile, []
    def failing(src, dst, *a, **k):               # whichever channel is copied second fails: the first one is complete by then
        ch = next((c for c in ('tr', 'te') if Path(dst).is_relative_to(tmp_path/c)), None)
        if ch is None: return real(src, dst, *a, **k)   # staging the inputs
        if ch not in seen: seen.append(ch)
        if len(seen) == 2 and ch == seen[1]: raise OSError(errno.ENOSPC, 'No space left on device')
        return real(src, dst, *a, **k)
    monkeypatch.setattr(local.shutil, 'copyfile', failing)
    req = render_request(step_job('preprocess', {'raw': str(opt_ml_penguins)}, {'train': str(tmp_path/'tr'), 'test': str(tmp_path/'te')},
                                  code=str(write_code_bundle('preprocess', 'script', tmp_path/'code'))))
    d = local.run_local(req, jobs_dir=tmp_path/'jobs', stream=None)
    assert d['ProcessingJobStatus'] == 'Failed' and 'No space left on device writing to' in d['FailureReason'], d.get('FailureReason')
    assert len(seen) == 2, seen                                                            # the first channel was copied, then undone
    assert [p for p in tmp_path.glob('t*/**/*')] == [], list(tmp_path.glob('t*/**/*'))     # neither train nor test, not even hidden temp files


def _descendants(root: int) -> dict:
    "{pid: start time} of the live processes below `root` (children, their children, ...), from /proc."
    parent = {}
    for p in Path('/proc').iterdir():
        if not p.name.isdigit(): continue
        try: fields = (p/'stat').read_text().rsplit(')', 1)[1].split()
        except OSError: continue
        if fields[0] != 'Z': parent[int(p.name)] = (int(fields[1]), fields[19])
    found, todo = {}, [root]
    while todo:
        pid = todo.pop()
        for child, (ppid, started) in parent.items():
            if ppid == pid and child not in found: found[child] = started; todo.append(child)
    return found


def _still_running(procs: dict) -> list:
    "Those of `procs` ({pid: start time}) that still run (not the same pid reused, not a zombie)."
    left = []
    for pid, started in procs.items():
        try: fields = Path(f'/proc/{pid}/stat').read_text().rsplit(')', 1)[1].split()
        except OSError: continue
        if fields[0] != 'Z' and fields[19] == started: left.append(pid)
    return left


@pytest.mark.parametrize('start', ['warm', 'cold'])
def test_a_killed_driver_leaves_no_instance_and_no_job_in_progress(tmp_path, opt_ml_trained, start):
    """kill -9 of `mlproj job run` mid-step: within seconds no instance process remains (nor its kernel, nor the fork
    servers when warm), and the job shows as Failed. The job's processes are found by ancestry from the driver before
    it is killed: a warm (forked) child's /proc/PID/environ and cmdline show its fork server's, not the job's."""
    import nbformat
    from mlproj.jobs import job_notebook
    sandbox = tmp_path/'out/jobs/orphan'
    nb = nbformat.read(job_notebook('train'), as_version=4)
    at = next(i for i, c in enumerate(nb.cells) if 'parameters' in c.metadata.get('tags', []))
    nb.cells.insert(at + 1, nbformat.v4.new_code_cell(
        f"import json, os, time\nopen({str(tmp_path/'kernel.tmp')!r}, 'w').write(json.dumps({{'pid': os.getpid(), 'warm': 'MLPROJ_WARM' in os.environ}}))\n"
        f"os.replace({str(tmp_path/'kernel.tmp')!r}, {str(tmp_path/'kernel.json')!r})\n"
        "for _ in range(600): time.sleep(0.1)"))
    (tmp_path/'nbs').mkdir(); nbformat.write(nb, tmp_path/'nbs/train.ipynb')
    env = {**os.environ, 'MLPROJ_OUTPUTS': str(tmp_path/'out'), 'MLPROJ_JOB_NOTEBOOKS': str(tmp_path/'nbs'), 'MLPROJ_COLD': '1' if start == 'cold' else '0'}
    mlproj = str(Path(sys.executable).parent/'mlproj')
    driver = subprocess.Popen([mlproj, 'job', 'run', 'train', '--engine', 'notebook', '--name', 'orphan', '--input', f"train={opt_ml_trained['train_csv']}"],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not (tmp_path/'kernel.json').exists() and driver.poll() is None: time.sleep(0.2)
        assert (tmp_path/'kernel.json').exists(), 'the job never reached its sleeping cell: ' + (driver.stderr.read()[-2000:] if driver.poll() is not None else '')
        kernel = json.loads((tmp_path/'kernel.json').read_text())
        assert kernel['warm'] == (start == 'warm'), kernel    # the mode under test is the mode the job ran in
        job = _descendants(driver.pid)
        instance = [p for p in job if os.path.realpath(f'/proc/{p}/cwd') == str((sandbox/'algo-1').resolve())]
        assert kernel['pid'] in job and instance, (kernel, job, instance)   # the instance and its kernel, found by ancestry
    finally:
        driver.kill(); driver.wait(); driver.stderr.close()
    for _ in range(50):
        if not _still_running(job): break
        time.sleep(0.1)
    assert _still_running(job) == [], 'processes outlived their driver'
    r = subprocess.run([mlproj, 'job', 'show', 'orphan'], env=env, capture_output=True, text=True)
    d = json.loads(r.stdout)
    assert d['ProcessingJobStatus'] == 'Failed' and d['FailureReason'].startswith('driver exited'), d.get('FailureReason')
    r = subprocess.run([mlproj, 'job', 'list'], env=env, capture_output=True, text=True)
    assert 'orphan' in r.stdout and 'Failed' in r.stdout and 'InProgress' not in r.stdout


def test_a_full_disk_under_the_outputs_root_is_one_line(tmp_path, monkeypatch, capsys):
    "Recording the job's end fails with ENOSPC (injected): one line naming the place, exit 2, no half-written record."
    import errno
    from mlproj.cli import main
    real = Path.write_text
    calls = {'n': 0}
    def full_on_second_record(self, *a, **k):
        if self.name.startswith('.describe.json.'):
            calls['n'] += 1
            if calls['n'] > 1: raise OSError(errno.ENOSPC, 'No space left on device')
        return real(self, *a, **k)
    monkeypatch.setattr(Path, 'write_text', full_on_second_record)
    monkeypatch.setenv('MLPROJ_OUTPUTS', str(tmp_path))
    old = signal.getsignal(signal.SIGTERM)
    try: code = main(['job', 'run', 'preprocess', '--engine', 'script', '--name', 'full-disk'])
    finally: signal.signal(signal.SIGTERM, old)
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]                     # the job's log lines come first, then one error line
    assert code == 2 and 'Traceback' not in err and err.count('mlproj: error') == 1, err[-2000:]
    assert last == f'mlproj: error: No space left on device writing to {tmp_path.resolve()}/jobs/full-disk', last
    assert not list((tmp_path/'jobs/full-disk').glob('.describe.json*')), 'a half-written record was left'


def _crafted_model(dest: Path, train_csv: Path, field: str, value, tree: int = 17, boosted: bool = False) -> str:
    """A model.tar.gz written by the real `write_model_artifact`, from a model fitted on `train_csv` whose tree `tree` has
    `field` of its second inner node set to `value` (0 or the root's child for 'loop'); returns the message expected."""
    import numpy as np
    from mlproj.data import load_table
    from mlproj.train import train_model, write_model_artifact
    train = load_table(train_csv)
    if boosted:                         # histogram gradient boosting: TreePredictor node arrays
        from sklearn.ensemble import HistGradientBoostingClassifier
        from sklearn.pipeline import Pipeline
        from mlproj.data import SCHEMA
        from mlproj.features import TableFeatures
        model = Pipeline([('features', TableFeatures(SCHEMA)), ('estimator', HistGradientBoostingClassifier(max_iter=10, random_state=0))])
        model.fit(train[list(SCHEMA.features)], train[SCHEMA.target].astype(str))
        clf = model.named_steps['estimator']
        pred = clf._predictors[tree // clf.n_trees_per_iteration_][tree % clf.n_trees_per_iteration_]
        nodes = pred.nodes.copy()
        inner = int(np.flatnonzero(nodes['is_leaf'] == 0)[1])
        names = {'child': 'left', 'loop': 'left', 'feature': 'feature_idx'}
        n = len(nodes)
    else:
        model = train_model(train, n_estimators=20)
        t = model.named_steps['estimator'].estimators_[tree].tree_
        st = t.__getstate__(); nodes = st['nodes'].copy()
        inner = int(np.flatnonzero(nodes['left_child'] != -1)[1])
        names = {'child': 'left_child', 'loop': 'left_child', 'feature': 'feature'}
        n = len(nodes)
    which = 'loop' if value == 'loop' else field
    nodes[names[which]][inner] = 0 if value == 'loop' else value
    if boosted: pred.nodes = nodes
    else: st['nodes'] = nodes; t.__setstate__(st)
    write_model_artifact(model, dest)
    width = model.named_steps['estimator'].n_features_in_
    return {'child': f'estimator tree {tree}: child {value} of node {inner} is out of range ({n:,} nodes)',
            'loop': f'estimator tree {tree}: child 0 of node {inner} does not come after it (a loop)',
            'feature': f'estimator tree {tree}: feature {value} of node {inner} is out of range ({width:,} input features)'}[which]


_CRAFTS = [('child', 10**9), ('feature', 10**6), ('child', 'loop')]


@pytest.mark.parametrize('step', ['evaluate', 'batch_inference'])
@pytest.mark.parametrize('field,value', _CRAFTS, ids=['child-1e9', 'feature-1e6', 'child-to-root'])
def test_crafted_trees_are_refused_before_they_predict(step, field, value, opt_ml_tree, opt_ml_trained, opt_ml_penguins, opt_ml_assert_failed):
    "They segfaulted the step (exit 139) or looped in native code until MaxRuntime; now: one line naming the step's estimator and tree, exit 1."
    t = opt_ml_tree
    t.input('model').mkdir(parents=True)
    expected = _crafted_model(t.input('model')/'model.tar.gz', opt_ml_trained['train_csv'], field, value)
    if step == 'evaluate': t.stage('test', opt_ml_trained['test_csv'])
    else: t.stage('data', opt_ml_penguins)
    p = t.python('-m', f'mlproj.scripts.{step}', timeout=120)        # the hang guard: TimeoutExpired fails the test
    line = opt_ml_assert_failed(p, t, step, [t.outputs])
    assert p.returncode == 1, (p.returncode, p.stderr[-500:])
    assert line == f'{step}: {t.input("model")}/model.tar.gz: model.skops: {expected}', line


@pytest.mark.parametrize('field,value', _CRAFTS, ids=['child-1e9', 'feature-1e6', 'child-to-root'])
def test_crafted_boosted_trees_are_refused_before_they_predict(field, value, opt_ml_tree, opt_ml_trained, opt_ml_penguins, opt_ml_assert_failed):
    "The same for histogram gradient boosting's TreePredictor node arrays (its type trusted here, as the widened trust list does)."
    t = opt_ml_tree
    t.input('model').mkdir(parents=True)
    expected = _crafted_model(t.input('model')/'model.tar.gz', opt_ml_trained['train_csv'], field, value, tree=7, boosted=True)
    t.stage('data', opt_ml_penguins)
    code = ("import runpy, sys\nimport mlproj.train as T\n"
            "T.TRUSTED_TYPES.append('sklearn.ensemble._hist_gradient_boosting.predictor.TreePredictor')\n"
            "sys.argv = ['batch_inference']\nrunpy.run_module('mlproj.scripts.batch_inference', run_name='__main__')")
    p = t.python('-c', code, timeout=120)
    line = opt_ml_assert_failed(p, t, 'batch_inference', [t.outputs])
    assert p.returncode == 1, (p.returncode, p.stderr[-500:])
    assert line == f'batch_inference: {t.input("model")}/model.tar.gz: model.skops: {expected}', line


def _retarred(src: Path, dest: Path, edit) -> Path:
    "`src`'s members written again into `dest`, the manifest passed through `edit(manifest) -> manifest` (JSON text, NaN allowed)."
    with tarfile.open(src, 'r:gz') as tar: members = [(ti.name, tar.extractfile(ti).read()) for ti in tar]
    members = [(n, json.dumps(edit(json.loads(b))).encode() if n == 'manifest.json' else b) for n, b in members]
    dest.parent.mkdir(parents=True, exist_ok=True)
    return _artifact(dest, members)


def _column_edit(name, **changes):
    def edit(manifest):
        manifest['schema']['columns'] = [dict(c, **changes) if c['name'] == name else c for c in manifest['schema']['columns']]
        return manifest
    return edit


@pytest.mark.parametrize('case,edit,message', [
    ('wider range', _column_edit('body_mass_g', hi=80000),
     "manifest.json describes another schema than the model was trained with (column 'body_mass_g': hi 80000 instead of 8000)"),
    ('new category', _column_edit('island', categories=['Biscoe', 'Dream', 'Torgersen', 'Atlantis']),
     "manifest.json describes another schema than the model was trained with (column 'island': categories ('Biscoe', 'Dream', 'Torgersen', 'Atlantis') instead of ('Biscoe', 'Dream', 'Torgersen'))"),
    ('NaN bound', _column_edit('body_mass_g', hi=float('nan')),
     "manifest.json holds no valid schema (SpecError: column 'body_mass_g': bound hi nan is not a finite number)"),
    ('infinite bound', _column_edit('bill_length_mm', lo=float('-inf')),
     "manifest.json holds no valid schema (SpecError: column 'bill_length_mm': bound lo -inf is not a finite number)"),
], ids=lambda x: x.replace(' ', '-') if isinstance(x, str) and len(x) < 20 else '')
def test_a_re_tarred_manifest_cannot_loosen_validation(case, edit, message, opt_ml_tree, opt_ml_trained, opt_ml_penguins, opt_ml_assert_failed):
    "The schema is the model's: a manifest widening a range, adding a category or switching a bound off with NaN is refused (Atlantis was scored)."
    t = opt_ml_tree
    art = _retarred(opt_ml_trained['model'], t.input('model')/'model.tar.gz', edit)
    lines = opt_ml_penguins.read_text().splitlines()
    header = lines[0].split(','); row = lines[1].split(','); row[header.index('island')] = 'Atlantis'
    t.stage_text('data', 'rows.csv', '\n'.join(lines + [','.join(row)]) + '\n')
    line = opt_ml_assert_failed(t.run('batch_inference'), t, 'batch_inference', [t.outputs])
    assert line == f'batch_inference: {art}: {message}', line
    # the same rows against the untouched model: Atlantis is refused as the schema says
    t2 = opt_ml_tree.__class__(t.root.parent/'again', t.root.parent/'again-work')
    t2.stage('model', opt_ml_trained['model']); t2.stage_text('data', 'rows.csv', '\n'.join(lines + [','.join(row)]) + '\n')
    assert "unknown category 'Atlantis'" in opt_ml_assert_failed(t2.run('batch_inference'), t2, 'batch_inference', [t2.outputs])
