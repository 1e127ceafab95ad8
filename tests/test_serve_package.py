"""`mlproj serve package`: the model package SageMaker's scikit-learn image serves (model artifact, code/inference.py,
code/requirements.txt, the mlproj wheel), installed from its own requirements.txt in a fresh virtual environment
outside the checkout, serving a request there."""
import json, os, subprocess, sys, tarfile, urllib.error, urllib.request
from pathlib import Path
import pytest
from conftest import endpoint          # the local endpoint in a subprocess, stopped gracefully
from mlproj import __version__
WHEEL = f'mlproj-{__version__}-py3-none-any.whl'   # the wheel of this checkout's version (settings.ini)

MLPROJ = str(Path(sys.executable).parent/'mlproj')
ROOT = Path(__file__).resolve().parents[1]
ROW = b'Dream,39.1,18.7,181,3750,male\nBiscoe,,,,,\n'


def test_package_serves_from_a_fresh_venv(opt_ml_trained, fresh_venv, tmp_path):
    pkg = tmp_path/'pkg'/'model.tar.gz'
    r = subprocess.run([MLPROJ, 'serve', 'package', '--model', opt_ml_trained['model'], '--dest', pkg], capture_output=True, text=True,
                       timeout=600, env={**os.environ, 'MLPROJ_OUTPUTS': str(tmp_path/'outputs')})
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout)
    assert out['environment'] == {'SAGEMAKER_PROGRAM': 'inference.py', 'SAGEMAKER_SUBMIT_DIRECTORY': '/opt/ml/model/code'}
    with tarfile.open(pkg) as t: names = sorted(t.getnames())
    assert names == ['code/inference.py', f'code/{WHEEL}', 'code/requirements.txt', 'model.tar.gz']
    model_dir = tmp_path/'opt_ml_model'                       # where SageMaker extracts ModelDataUrl
    with tarfile.open(pkg) as t: t.extractall(model_dir, filter='data')
    code = model_dir/'code'
    assert (code/'requirements.txt').read_text() == f'./{WHEEL}\n'
    assert 'from mlproj.serve import model_fn, input_fn, predict_fn, output_fn' in (code/'inference.py').read_text()
    assert (model_dir/'model.tar.gz').read_bytes() == Path(opt_ml_trained['model']).read_bytes()   # the artifact, unchanged

    venv, _ = fresh_venv(code/WHEEL, tmp_path/'env')
    py = str(venv/'bin/python')
    # the container's step: pip install -r requirements.txt from the code folder (dependencies come from the .pth)
    subprocess.run([py, '-m', 'pip', 'install', '--quiet', '--no-deps', '--no-index', '--force-reinstall', '-r', 'requirements.txt'],
                   cwd=code, check=True)
    # the handlers as the container imports them: inference.py from SAGEMAKER_SUBMIT_DIRECTORY, called with model_dir
    script = ('import sys, json; sys.path.insert(0, sys.argv[1]); import inference, mlproj\n'
              'm = inference.model_fn(sys.argv[2])\n'
              'body, kind = inference.output_fn(inference.predict_fn(inference.input_fn(sys.stdin.buffer.read(), "text/csv"), m), "text/csv")\n'
              'print(json.dumps({"mlproj": mlproj.__file__, "kind": kind, "body": body.decode()}))\n')
    got = subprocess.run([py, '-c', script, str(code), str(model_dir)], input=ROW, capture_output=True, cwd=tmp_path, timeout=300)
    assert got.returncode == 0, got.stderr[-2000:]
    doc = json.loads(got.stdout)
    assert Path(doc['mlproj']).is_relative_to(venv)          # the wheel's mlproj, not the checkout's
    from mlproj.serve import input_fn, model_fn, output_fn, predict_fn
    want, kind = output_fn(predict_fn(input_fn(ROW, 'text/csv'), model_fn(str(model_dir))), 'text/csv')
    assert (doc['kind'], doc['body']) == (kind, want.decode())

    # and the venv's own `mlproj serve` serves the package over HTTP
    with endpoint([venv/'bin/mlproj', 'serve', '--model', pkg, '--port', '0', '--workers', '1'], tmp_path/'o2', cwd=tmp_path) as (url, _):
        req = urllib.request.Request(url + '/invocations', data=ROW, headers={'Content-Type': 'text/csv', 'Accept': 'text/csv'})
        assert urllib.request.urlopen(req, timeout=60).read() == want
