"""A wheel install, outside the checkout: the job notebooks ship inside the package, so a notebook job runs.

The wheel is built the way the SageMaker backend builds it (`build_wheels`, from a clean copy of the checkout) and
installed without dependencies into a fresh venv in a temporary folder; the dependencies come from this test's own
environment through a .pth file (no network needed). The checkout is not on the fresh venv's path: `mlproj` there is
the wheel's."""
import json, os, subprocess
from pathlib import Path
import pytest


@pytest.fixture(scope='module')
def wheel_venv(tmp_path_factory, fresh_venv):
    import mlproj
    from mlproj.sagemaker_backend import build_wheels
    base = tmp_path_factory.mktemp('wheel')
    wheels = build_wheels(base/'wheels', dependencies=False, say=lambda m: None)
    assert [w.name for w in wheels] == [f'mlproj-{mlproj.__version__}-py3-none-any.whl']
    venv, jupyter = fresh_venv(wheels[0], base)
    work = base/'work'; work.mkdir()
    return venv, work, jupyter


def test_the_wheel_is_what_the_fresh_venv_imports(wheel_venv):
    venv, work, _ = wheel_venv
    r = subprocess.run([str(venv/'bin/python'), '-c', 'import mlproj, mlproj.jobs; print(mlproj.__file__); print(mlproj.jobs.job_notebook("train"))'],
                       cwd=work, capture_output=True, text=True, check=True)
    where, nb = r.stdout.split()
    assert where.startswith(str(venv)) and nb.startswith(str(venv)), r.stdout


def test_wheel_install_runs_a_notebook_job(wheel_venv, opt_ml_penguins):
    venv, work, jupyter = wheel_venv
    env = {k: v for k, v in os.environ.items() if k not in ('MLPROJ_JOB_NOTEBOOKS', 'PYTHONPATH', 'MLPROJ_OPT_ML')}
    env.update(MLPROJ_OUTPUTS=str(work/'outputs'), MPLBACKEND='Agg', JUPYTER_PATH=str(jupyter))
    r = subprocess.run([str(venv/'bin/mlproj'), 'job', 'run', 'train', '--engine', 'notebook', '--input', f'train={opt_ml_penguins}',
                        '-p', 'n_estimators=10', '--name', 'wheel-train'], cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    d = json.loads(r.stdout)
    assert d['ProcessingJobStatus'] == 'Completed'
    out = work/'outputs/wheel-train'
    assert (out/'model/model.tar.gz').is_file()
    assert sorted(p.name for p in (out/'report').iterdir()) == ['train.html', 'train.ipynb']
    executed = json.loads((out/'report/train.ipynb').read_text())
    assert any('n_estimators = 10' in ''.join(c['source']) for c in executed['cells']), 'the parameter did not reach the notebook'
    code = Path(d['ProcessingInputs'][-1]['S3Input']['S3Uri'][len('file://'):])
    assert sorted(p.name for p in code.iterdir()) == ['entry.py', 'train.ipynb']
    # and the kernel that ran the notebook was the venv's Python, which imports the wheel's mlproj
    r = subprocess.run([str(venv/'bin/python'), '-c', 'from jupyter_client.kernelspec import KernelSpecManager as K; print(K().get_kernel_spec("python3").argv[0])'],
                       cwd=work, env=env, capture_output=True, text=True, check=True)
    assert r.stdout.strip().startswith(str(venv)), r.stdout
