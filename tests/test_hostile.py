"""A hostile or careless user against the run cache and records, parameter files, `-o`, the exports and the lab (issue 21).

One test per serious finding — each fails on the code before the fix: a planted record swapping the model, special files
hanging or exhausting a run, a YAML alias bomb, `-o` replacing a device — and one per group of weak findings. Every
refusal is checked to be one line without a traceback. Runs that could hang or eat memory on broken code run as
subprocesses with a timeout and resource limits (address space, file size), so a regression fails instead of taking the
machine down."""
import hashlib, json, os, resource, shutil, stat, subprocess, sys, time
from pathlib import Path
import pytest

REPO = Path(__file__).resolve().parents[1]
MLPROJ = [str(Path(sys.executable).parent/'mlproj')]
BASE = ['--engine', 'script', '-p', 'train.n_estimators=20']
GUARDS = dict(address_space=4 << 30, file_size=1 << 30)       # a broken build reading /dev/zero fails fast instead


def _limits(address_space=None, file_size=None):
    def apply():
        if address_space: resource.setrlimit(resource.RLIMIT_AS, (address_space, address_space))
        if file_size: resource.setrlimit(resource.RLIMIT_FSIZE, (file_size, file_size))
    return apply


def mlproj(outputs, *args, timeout=300, limits=GUARDS, env=None, cwd=None):
    "The mlproj command as a subprocess over `outputs`, with a timeout (a hang fails the test) and resource limits."
    env = {**os.environ, 'MLPROJ_OUTPUTS': str(outputs), **(env or {})}
    env.pop('MLPROJ_TRACEBACK', None)
    return subprocess.run(MLPROJ + [str(a) for a in args], env=env, capture_output=True, text=True, timeout=timeout,
                          preexec_fn=_limits(**limits), cwd=cwd)


def one_line(r, code=2):
    "The single line of a refusal: exit `code`, one line on stderr, no traceback."
    assert r.returncode == code, (r.returncode, r.stderr[-3000:])
    assert 'Traceback' not in r.stderr and r.stderr.count('\n') == 1, r.stderr[-3000:]
    return r.stderr.strip()


def sha(p): return hashlib.sha256(Path(p).read_bytes()).hexdigest()


@pytest.fixture(scope='module')
def first(pipeline_first_run):
    "A completed first run `r1` (script engine, a small forest) over copies of the bundled table (conftest: made once per session)."
    return pipeline_first_run


@pytest.fixture
def project(first, tmp_path):
    "A private copy of the first run — copied as is, its record untouched: places are relative to the run folder."
    for f in ('raw.csv', 'data.csv'): shutil.copy(first/f, tmp_path/f)
    shutil.copytree(first/'outputs/r1', tmp_path/'outputs/r1', symlinks=True)
    return tmp_path


def rerun(p, *args, run_id='r2', **kw):
    r = mlproj(p/'outputs', 'run', *BASE, '--raw', p/'raw.csv', '--data', p/'data.csv', '--run-id', run_id, *args, **kw)
    rec = p/'outputs'/run_id/'run.json'
    return r, (json.loads(rec.read_text()) if rec.is_file() else None)


def r1_record(p): return json.loads((p/'outputs/r1/run.json').read_text())


def plant(p, folder, rec):
    (p/'outputs'/folder).mkdir(parents=True, exist_ok=True)
    (p/'outputs'/folder/'run.json').write_text(json.dumps(rec))


def assert_all_from_r1(r, rec):
    assert r.returncode == 0 and rec['status'] == 'Completed', r.stderr[-3000:]
    assert [(s['cache'], s.get('from_run')) for s in rec['steps']] == [('hit', 'r1')] * 5, [(s['step'], s['cache'], s.get('from_run'), s.get('cache_reason')) for s in rec['steps']]
    assert 'Traceback' not in r.stderr


def newer(rec, run_id):
    "`rec` as a newer run `run_id`: its steps end later, so the cache would try it first."
    rec = json.loads(json.dumps(rec)); rec['run_id'] = run_id; rec['started'] = '2099-01-01T00:00:00+00:00'
    for s in rec['steps']: s['ended'] = '2099-01-01T00:00:00+00:00'
    return rec


# ---------------------------------------------------------------- serious 1: a planted run record swaps the model

def test_a_planted_run_record_does_not_swap_the_model(project):
    "Newer records whose train outputs live outside their run folder, or whose run_id is not their folder, are not hits."
    evil = project/'elsewhere/model'; evil.mkdir(parents=True)
    (evil/'model.tar.gz').write_bytes(b'a model someone else made')
    digest = {'model.tar.gz': sha(evil/'model.tar.gz')}
    good = r1_record(project)
    p1 = newer(good, 'planted')                                       # outputs recorded outside its folder, digests of the swap
    t = next(s for s in p1['steps'] if s['step'] == 'train')
    t['outputs']['model'] = {'uri': evil.as_uri(), 'path': '../../elsewhere/model', 'sha256': digest, 'bytes': {'model.tar.gz': 25}}
    plant(project, 'planted', p1)
    p2 = newer(p1, 'r1')                                              # a record claiming to be r1, in another folder
    plant(project, 'impostor', p2)
    r, rec = rerun(project)
    assert_all_from_r1(r, rec)
    model = project/'outputs/r2/train/model/model.tar.gz'
    assert model.read_bytes() == (project/'outputs/r1/train/model/model.tar.gz').read_bytes()
    r1_digest = r1_record(project)['steps'][1]['outputs']['model']['sha256']['model.tar.gz']
    assert {s['parameters'].get('expected_model_sha256') for s in rec['steps'][2:]} == {r1_digest}   # lineage vouches for r1's model
    assert "impostor/run.json skipped: its run_id 'r1' is not its folder's name" in r.stderr, r.stderr


# ---------------------------------------------------------------- serious 2: special files hang or exhaust the run

def test_special_files_in_records_and_cached_outputs_neither_hang_nor_exhaust(project):
    "run.json as a FIFO or a link to /dev/zero, cached outputs as a FIFO or a link to /dev/zero: skipped, at once."
    out = project/'outputs'
    (out/'fifo').mkdir(); os.mkfifo(out/'fifo/run.json')
    (out/'zero').mkdir(); os.symlink('/dev/zero', out/'zero/run.json')
    for name, make in [('cfifo', lambda f: os.mkfifo(f)), ('czero', lambda f: os.symlink('/dev/zero', f))]:
        shutil.copytree(out/'r1', out/name, symlinks=True)
        rec = newer(r1_record(project), name); rec['steps'] = [s for s in rec['steps'] if s['step'] == 'train']
        plant(project, name, rec)
        f = out/name/'train/model/model.tar.gz'; f.unlink(); make(f)
    t0 = time.monotonic()
    r, rec = rerun(project, timeout=180)
    assert_all_from_r1(r, rec)
    assert 'fifo/run.json skipped: ' in r.stderr and 'is a FIFO' in r.stderr, r.stderr
    assert 'zero/run.json skipped: ' in r.stderr and 'symbolic link' in r.stderr, r.stderr
    assert os.path.getsize(out/'r2/train/model/model.tar.gz') == os.path.getsize(out/'r1/train/model/model.tar.gz')
    assert sum(f.stat().st_size for f in out.rglob('*') if f.is_file() and not f.is_symlink()) < 200 << 20   # no endless file
    assert time.monotonic() - t0 < 180


# ---------------------------------------------------------------- serious 4: a YAML alias bomb

def test_a_yaml_alias_bomb_is_refused_in_little_memory(tmp_path):
    "A 5 KB file of nested aliases (9^9 values once expanded): one short line, under a 2 GB address-space limit."
    lines = ['train:', '  seed:', '  - &a ["' + 'x' * 50 + '"' + ', "x"' * 8 + ']']        # one value: every level in one list
    lines += [f'  - &{c} [' + ', '.join([f'*{p}'] * 9) + ']' for p, c in zip('abcdefgh', 'bcdefghi')]
    bomb = tmp_path/'bomb.yaml'; bomb.write_text('\n'.join(lines) + '\n')
    assert bomb.stat().st_size < 5000
    r = mlproj(tmp_path/'outputs', 'run', '-f', bomb, timeout=120, limits=dict(address_space=2 << 30))
    line = one_line(r)
    assert 'YAML aliases (*a) are not accepted' in line and str(bomb) in line and len(line) < 400, line
    assert not (tmp_path/'outputs').exists() or not any(p.name != 'code' for p in (tmp_path/'outputs').iterdir())


# ---------------------------------------------------------------- serious 6: -o replaces a device

def test_export_o_never_replaces_a_device_a_fifo_or_a_folder(tmp_path):
    "A character device made in a temp folder (the numbers of /dev/null), a FIFO, a folder: refused, left as they were."
    dev = tmp_path/'null'
    os.mknod(dev, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    os.mkfifo(tmp_path/'fifo'); (tmp_path/'folder').mkdir()
    flags = ['pipeline', 'export', '--format', 'stepfunctions', '--bucket', 'my-bucket', '--role', 'arn:aws:iam::123456789012:role/r',
             '--image-uri', '123456789012.dkr.ecr.eu-west-1.amazonaws.com/img:1']
    for target, kind in [(dev, 'a character device'), (tmp_path/'fifo', 'a FIFO'), (tmp_path/'folder', 'a folder')]:
        r = mlproj(tmp_path/'outputs', *flags, '-o', target, timeout=120)
        assert f'is {kind}: name a regular file or a new path' in one_line(r), r.stderr
    assert stat.S_ISCHR(os.stat(dev).st_mode) and os.stat(dev).st_rdev == os.makedev(1, 3)
    assert stat.S_ISFIFO(os.stat(tmp_path/'fifo').st_mode) and not list((tmp_path/'folder').iterdir())
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith('.')) == []          # no temporary file left
    r = mlproj(tmp_path/'outputs', *flags, '-o', tmp_path/'sm.json', timeout=120)           # a new path: written whole
    assert r.returncode == 0 and json.loads((tmp_path/'sm.json').read_text())['StartAt'], r.stderr


# ---------------------------------------------------------------- weak: tracebacks instead of one line

MALFORMED = ['[]', 'null', '"a string"', '{"run_id": "b", "steps": 5}',
             '{"run_id": "b", "status": "InProgress", "steps": [], "driver": {"pid": "abc"}}',
             '{"run_id": "b", "steps": [{"step": "train", "status": "Completed", "cache_key": "k", "ended": 5}]}']


def test_malformed_records_are_skipped_with_a_note(project):
    """Malformed records, each in a run folder of its own, three at a time (a run names at most five skipped records): each skipped
    with a note of its own. Then all of them at once with --no-cache."""
    def plant_all(which):                                     # a record's run_id names its own folder, as a real one would
        for i in which: plant(project, f'b{i}', json.loads(MALFORMED[i].replace('"run_id": "b"', f'"run_id": "b{i}"')))
    for which in (range(0, 3), range(3, len(MALFORMED))):
        plant_all(which)
        r, rec = rerun(project, run_id=f'r2-{which[0]}')
        assert_all_from_r1(r, rec)
        notes = [l for l in r.stderr.splitlines() if 'note: ' in l]
        for i in which: assert any(f'note: b{i}/run.json skipped: ' in l for l in notes), (MALFORMED[i], notes)
        for folder in [f'b{i}' for i in which] + [f'r2-{which[0]}']:   # the next rerun sees only its own (and not this run's record)
            shutil.rmtree(project/'outputs'/folder)
    plant_all(range(len(MALFORMED)))
    r, rec = rerun(project, '--no-cache', run_id='r3', timeout=600)             # --no-cache too
    assert r.returncode == 0 and rec['status'] == 'Completed', r.stderr[-2000:]


@pytest.mark.parametrize('name', ['', '.', 'a\0b', 'x' * 300, '../../../etc/passwd'])
def test_a_malformed_recorded_output_name_is_a_miss_that_says_why(project, name):
    rec = newer(r1_record(project), 'odd'); rec['steps'] = rec['steps'][:1]
    rec['steps'][0]['outputs']['train']['sha256'] = {name: '0' * 64}
    rec['steps'][0]['outputs']['train']['bytes'] = {name: 1}
    shutil.copytree(project/'outputs/r1', project/'outputs/odd', symlinks=True); plant(project, 'odd', rec)
    r, out = rerun(project)
    assert_all_from_r1(r, out)
    line = next(l for l in r.stderr.splitlines() if ' preprocess: Completed' in l)     # the hit says which newer run it passed over, and why
    assert 'skipped outputs of run odd unusable (output train: recorded name' in line and 'from run r1' in line, line
    assert out['steps'][0]['cache_skipped'][0].startswith('outputs of run odd unusable (output train: recorded name'), out['steps'][0]


def test_bad_places_and_environments_are_one_line(project, tmp_path):
    for rid in ['x' * 300, '../escaped', str(tmp_path/'abs'), 'a/b', '.hidden']:
        assert 'use letters, digits and ._- only' in one_line(mlproj(project/'outputs', 'run', *BASE, '--run-id', rid, timeout=120))
    assert not (project/'escaped').exists() and not (tmp_path/'abs').exists()
    (tmp_path/'afile').write_text('x')
    assert 'is not a folder' in one_line(mlproj(tmp_path/'afile', 'run', *BASE, timeout=120))
    line = one_line(mlproj('/sys/mlproj-read-only', 'run', *BASE, timeout=120))   # sysfs refuses a folder, as a read-only checkout would
    assert 'Operation not permitted' in line or 'Read-only' in line, line
    (tmp_path/'latin1.yaml').write_bytes('train:\n  seed: 3 # caf\xe9\n'.encode('latin-1'))
    assert 'not UTF-8 text (byte 22, line 2)' in one_line(mlproj(tmp_path/'o', 'run', '-f', tmp_path/'latin1.yaml', timeout=120))


# ---------------------------------------------------------------- weak: paths confined

def test_a_run_folder_linked_outside_outputs_is_never_rewritten(project, tmp_path):
    outside = tmp_path/'outside'; outside.mkdir()
    gone = subprocess.Popen([sys.executable, '-c', 'pass']); gone.wait()
    body = json.dumps({'run_id': 'linked', 'status': 'InProgress', 'steps': [], 'driver': {'pid': gone.pid, 'started': 'x'}})
    (outside/'run.json').write_text(body)
    os.symlink(outside, project/'outputs/linked')
    r, rec = rerun(project)
    assert_all_from_r1(r, rec)
    assert (outside/'run.json').read_text() == body and 'linked/run.json skipped: the run folder is a symbolic link' in r.stderr
    # relative places: the copy of r1 in this test's folder is what was reused, not the first run's folder
    assert rec['steps'][1]['outputs']['model']['path'] == 'train/model' and str(project) in rec['steps'][1]['outputs']['model']['uri']


# ---------------------------------------------------------------- weak: numbers

@pytest.mark.parametrize('value', ['nan', 'inf', '-inf', '-1e309'])
def test_a_non_finite_gate_threshold_is_refused(tmp_path, value):
    assert 'expected float (a finite number)' in one_line(mlproj(tmp_path/'o', 'run', '-p', f'gate.threshold={value}', timeout=120))


# ---------------------------------------------------------------- weak: exports that would fail at deploy time

def test_exports_apply_s3_naming_escape_fn_sub_and_derive_the_partition(tmp_path):
    from mlproj.cli import main
    role = 'arn:aws:iam::123456789012:role/r'
    def export(*args):
        return mlproj(tmp_path/'o', 'pipeline', 'export', '--image-uri', '123456789012.dkr.ecr.eu-west-1.amazonaws.com/img:1', *args, timeout=120)
    for bucket in ['a..b', '192.168.1.1', 'xn--bucket', 'bucket-s3alias', 'sthree-bucket', 'bucket--ol-s3']:
        assert 'is not a valid S3 bucket name' in one_line(export('--format', 'sagemaker', '--bucket', bucket, '--role', role))
    r = mlproj(tmp_path/'o', 'pipeline', 'export', '--format', 'cloudformation', '--bucket', 'my-bucket', '--role', role,
               '--image-uri', 'img:${Tag}', '--input', 'raw=s3://my-bucket/${Prefix}/raw/', timeout=120)
    assert r.returncode == 0, r.stderr
    body = json.loads(r.stdout)['Resources']['SageMakerPipeline']['Properties']['PipelineDefinition']['PipelineDefinitionBody']['Fn::Sub']
    assert 'img:${!Tag}' in body and 's3://my-bucket/${!Prefix}/raw/' in body and '${ProcessingRoleArn}' in body
    assert '${Tag}' not in body and '${Prefix}' not in body
    cn = 'arn:aws-cn:iam::123456789012:role/r'
    r = mlproj(tmp_path/'o', 'pipeline', 'export', '--format', 'stepfunctions', '--bucket', 'my-bucket', '--role', cn, '--region', 'cn-north-1',
               '--image-uri', 'img:1', timeout=120)
    assert r.returncode == 0, r.stderr
    arns = {s['Resource'] for s in json.loads(r.stdout)['States'].values() if 'Resource' in s}
    assert arns and all(a.startswith('arn:aws-cn:states:::') for a in arns), arns
    assert 'is in partition' in one_line(export('--format', 'stepfunctions', '--bucket', 'my-bucket', '--role', role, '--region', 'cn-north-1'))


# ---------------------------------------------------------------- weak: unbounded inputs

def test_huge_inputs_are_refused_within_bounds(project, tmp_path, cli):
    big = tmp_path/'big.yaml'
    with open(big, 'w') as f: f.write('train:\n  seed: 1\n'); f.truncate(100 << 20)       # 100 MB
    t0 = time.monotonic()
    assert 'larger than 1,048,576 bytes' in one_line(mlproj(tmp_path/'o', 'run', '-f', big, timeout=120))
    assert time.monotonic() - t0 < 60
    code, _, err = cli('run', '-p', 'train.seed=' + 'x' * (10 << 20))                  # too long for an argv: in-process
    assert code == 2 and err.count('\n') == 1 and len(err) < 300 and '(10,485,760 characters)' in err, err[:500]
    (project/'outputs/huge').mkdir()
    with open(project/'outputs/huge/run.json', 'w') as f: f.truncate(205 << 20)             # 205 MB, sparse
    r, rec = rerun(project, limits=dict(address_space=3 << 30, file_size=1 << 30))
    assert_all_from_r1(r, rec)
    assert 'huge/run.json skipped: is larger than 16,777,216 bytes' in r.stderr, r.stderr


# ---------------------------------------------------------------- weak: the lab deleting work

def mlproj_lab(outputs, *args):
    env = {**os.environ, 'MLPROJ_OUTPUTS': str(outputs)}
    return subprocess.run([sys.executable, '-m', 'mlproj.lab', '--port', '0', *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)


def test_the_lab_keeps_other_work(project, tmp_path):
    out = project/'outputs'
    sb = tmp_path/'sb'; sb.mkdir()
    (tmp_path/'sb.lock').write_text(json.dumps({'pid': os.getpid(), 'started': Path(f'/proc/{os.getpid()}/stat').read_text().rsplit(')', 1)[1].split()[19]}))
    r = mlproj_lab(out, '--sandbox', sb)
    assert r.returncode == 2 and f'is in use by the lab of process {os.getpid()}' in r.stderr and 'Traceback' not in r.stderr, r.stderr
    mine = tmp_path/'mine'; mine.mkdir(); (mine/'.mlproj-lab.json').write_text('{}'); (mine/'notes.ipynb').write_text('keep')
    r = mlproj_lab(out, '--sandbox', mine)
    assert r.returncode == 2 and 'refusing to replace' in r.stderr and (mine/'notes.ipynb').read_text() == 'keep', r.stderr
    (tmp_path/'afile').write_text('x')
    r = mlproj_lab(out, '--sandbox', tmp_path/'afile')
    assert r.returncode == 2 and 'is a file, not a folder' in r.stderr and 'Traceback' not in r.stderr, r.stderr
    planted = newer(r1_record(project), 'planted')
    for s in planted['steps']:
        if 'raw' in s['inputs']: s['inputs']['raw'] = {'uri': 'file:///etc/apt'}
    plant(project, 'planted', planted)
    r = mlproj_lab(out, '--sandbox', tmp_path/'new')
    assert r.returncode == 2 and "input 'raw' has no sha256" in r.stderr and not (tmp_path/'new').exists(), r.stderr
