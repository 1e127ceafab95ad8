"""The package's shape: imports point down the layers only, and reading a step's declaration costs no heavy import.

The layers, bottom to top (drawn in nbs/index.ipynb): a module may import modules of lower layers only — never one
above it, never a sibling of its own layer. Function-level (lazy) imports count too."""
import ast, subprocess, sys
from pathlib import Path
import pytest

PKG = Path(__file__).resolve().parents[1]/'mlproj'

LAYERS = [
    ['errors'],
    ['contract'],
    ['params', 'storage'],
    ['data'],
    ['features'],
    ['train', 'inference'],
    ['evaluate'],
    ['monitor'],
    ['serve'],
    ['steps'],
    ['scripts'],
    ['runner'],
    ['jobs'],
    ['local', 'sagemaker_backend'],
    ['cache'],
    ['endpoint'],
    ['registry'],
    ['pipeline'],
    ['export', 'lab'],
    ['cli'],
]
LAYER = {m: i for i, ms in enumerate(LAYERS) for m in ms}


def module_name(path: Path) -> str:
    "'scripts' for mlproj/scripts/__init__.py, 'jobs' for mlproj/jobs.py."
    rel = path.relative_to(PKG).with_suffix('')
    parts = [p for p in rel.parts if p != '__init__']
    return parts[0] if parts else ''          # '' for mlproj/__init__.py


def package_imports(path: Path, root: Path = PKG) -> list[tuple[str, int]]:
    "[(imported mlproj module, line)] of every import in `path` (a file of the package at `root`), at any depth, absolute or relative."
    tree, out = ast.parse(path.read_text()), []
    pkg_parts = ['mlproj'] + list(path.relative_to(root).parent.parts)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split('.')[0] == 'mlproj' and '.' in a.name: out.append((a.name.split('.')[1], node.lineno))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg_parts[:len(pkg_parts) - (node.level - 1)]
                full = base + (node.module.split('.') if node.module else [])
            else:
                full = (node.module or '').split('.')
            if full[0] != 'mlproj': continue
            if len(full) > 1: out.append((full[1], node.lineno))
            else: out += [(a.name, node.lineno) for a in node.names          # from mlproj import steps (not __version__)
                          if (root/f'{a.name}.py').exists() or (root/a.name).is_dir()]
    return out


def modules():
    return sorted(p for p in PKG.rglob('*.py') if not p.name.startswith('_') or p.name == '__init__.py')


def test_every_module_has_a_layer():
    names = {module_name(p) for p in modules()} - {''}
    assert names - set(LAYER) == set(), f'modules without a layer (add them to LAYERS and to the map in nbs/index.ipynb): {names - set(LAYER)}'


@pytest.mark.parametrize('path', modules(), ids=lambda p: str(p.relative_to(PKG)))
def test_imports_point_down_only(path):
    if path.relative_to(PKG) == Path('__init__.py'):          # the package's root imports none of its modules (import mlproj stays light)
        assert package_imports(path) == [], package_imports(path)
        return
    me = module_name(path)
    bad = [f'{path.relative_to(PKG.parent)}:{line} imports mlproj.{m} (layer {LAYER.get(m)}) from layer {LAYER[me]} ({me})'
           for m, line in package_imports(path) if m != me and (m not in LAYER or LAYER[m] >= LAYER[me])]
    assert not bad, '\n'.join(bad)


def test_the_import_reader_sees_lazy_and_relative_imports(tmp_path):
    "The checker itself: an upward import inside a function, written relatively, is found."
    src = PKG/'contract.py'
    planted = tmp_path/'mlproj'/'contract.py'
    planted.parent.mkdir()
    planted.write_text(src.read_text() + '\n\ndef _planted():\n    from .steps import STEPS\n    return STEPS\n')
    found = package_imports(planted, planted.parent)
    assert ('steps', planted.read_text().count('\n') - 1) in found, found


HEAVY = ('sklearn', 'matplotlib', 'sagemaker')

def imported_modules(argv: list[str]) -> set[str]:
    "Top-level names of every module `python -X importtime <argv>` imported."
    r = subprocess.run([sys.executable, '-X', 'importtime', *argv], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    return {line.split('|')[-1].strip().split('.')[0] for line in r.stderr.splitlines() if line.startswith('import time:')}


@pytest.mark.parametrize('step', ['preprocess', 'train', 'evaluate', 'batch_inference', 'monitor'])
def test_script_help_imports_no_heavy_library(step):
    seen = imported_modules(['-m', f'mlproj.scripts.{step}', '--help'])
    assert 'mlproj' in seen and 'fastcore' in seen          # the measurement sees the package's own imports
    assert not seen & set(HEAVY), sorted(seen & set(HEAVY))


@pytest.mark.parametrize('args', [['--help'], ['job', 'params'], ['job', 'run', '--help'], ['pipeline', 'export', '--help']])
def test_cli_help_imports_no_heavy_library(args):
    seen = imported_modules(['-c', f'import sys; from mlproj.cli import main; sys.exit(main({args!r}))'])
    assert not seen & set(HEAVY), sorted(seen & set(HEAVY))


def test_running_a_step_does_import_what_it_needs(tmp_path):
    "The other side of the check above: the measurement would see scikit-learn if it were imported."
    seen = imported_modules(['-c', 'import mlproj.train'])
    assert 'sklearn' in seen


def test_readme_graph_is_the_declared_graph():
    "The picture in the README is drawn from the pipeline declaration, not by hand."
    from mlproj.pipeline import pipeline_mermaid
    readme = (PKG.parent/'README.md').read_text()
    assert f'```mermaid\n{pipeline_mermaid()}\n```' in readme


@pytest.mark.parametrize('nb', sorted(p.relative_to(PKG.parent).as_posix() for p in (PKG.parent/'nbs').rglob('*.ipynb') if '.ipynb_checkpoints' not in p.parts))
def test_notebook_cell_ids_are_unique(nb):
    "A repeated cell id (a merge can leave one) is renamed by nbformat's next write, moving the `# %% ... #id` references of mlproj/."
    import collections, json
    ids = collections.Counter(c.get('id') for c in json.loads((PKG.parent/nb).read_text())['cells'])
    assert not [i for i, n in ids.items() if n > 1], f'{nb}: repeated cell ids'
