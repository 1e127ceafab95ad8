"""Notebook jobs against runtime scripts: what `--engine notebook` costs over `--engine script` for the same step, and
where that time goes, measured in the same run. Prints figures; asserts nothing.

    .venv/bin/python bench/bench_notebook.py [--runs 5] [--step preprocess] [--no-pipeline]

Each run is the real command, `mlproj job run <step> --engine <engine>` on the bundled data, in a fresh process, the
two engines alternating; the figure is the median. The parts are each timed in fresh processes (median of 3): what
a notebook job does that a script job does not. Last, `mlproj run` (every step, notebook engine, as `make run`
does) is timed once, cold: its outputs folder is new.
"""
import argparse, os, statistics, subprocess, sys, tempfile, time
from pathlib import Path

BIN = Path(sys.executable).parent


def timed(argv, env=None) -> float:
    t0 = time.perf_counter()
    r = subprocess.run(argv, capture_output=True, text=True, env=env)
    dt = time.perf_counter() - t0
    if r.returncode: raise SystemExit(f'{" ".join(map(str, argv))} failed:\n{r.stderr[-3000:]}')
    return dt


def py(code: str, n: int = 3) -> float:
    from mlproj.runner import SKIP_OPTIONAL          # as the runner's processes do
    return statistics.median(timed([sys.executable, '-c', SKIP_OPTIONAL + code]) for _ in range(n))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--runs', type=int, default=5)
    ap.add_argument('--step', default='preprocess', help='a step whose inputs have bundled defaults (preprocess, or batch_inference after a run)')
    ap.add_argument('--no-pipeline', action='store_true', help='skip timing `mlproj run`')
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        env = {**os.environ, 'MLPROJ_OUTPUTS': d}
        times = {'script': [], 'notebook': []}
        timed([BIN/'mlproj', 'job', 'run', a.step, '--engine', 'notebook', '--name', 'warm-up'], env)   # file caches warm for both
        for i in range(a.runs):
            for engine in times:
                times[engine].append(timed([BIN/'mlproj', 'job', 'run', a.step, '--engine', engine, '--name', f'{engine}-{i}'], env))
        med = {e: statistics.median(t) for e, t in times.items()}
        print(f'mlproj job run {a.step}, median of {a.runs} runs each (same machine, same run of the bench)')
        for e, t in times.items(): print(f"  --engine {e:<9} {med[e]:6.2f} s   (runs: {', '.join(f'{x:.2f}' for x in t)})")
        print(f"  notebook engine costs {med['notebook'] - med['script']:+.2f} s over the script engine (target <= +1.00 s)")
        report = Path(d)/'notebook-0'/'report'
        executed = next(report.glob('*.ipynb'))

        print('\nwhere a notebook job spends the extra time (each part in fresh processes, median of 3):')
        base = py('pass')
        parts = [
            ('python start (both engines pay it)', base),
            ("the step's imports (both engines: the script, or the kernel)", py('import mlproj.steps, mlproj.data, mlproj.train, pandas, sklearn.ensemble') - base),
            ('papermill import (runner reads parameters; papermill process)', py('import papermill.inspection') - base),
            ('Jupyter kernel start, ready, shut down', py('from jupyter_client.manager import start_new_kernel\n'
                                                         'km, kc = start_new_kernel(kernel_name="python3"); kc.stop_channels(); km.shutdown_kernel(now=True)') - base),
            ('nbconvert import + HTML templates loaded', py('import nbformat\nfrom nbconvert import HTMLExporter\n'
                                                           'HTMLExporter().from_notebook_node(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("1")]))') - base),
        ]
        for name, t in parts: print(f'  {name:<64} {t:5.2f} s')
        from mlproj.runner import SKIP_OPTIONAL
        code = SKIP_OPTIONAL + ('import time, nbformat\nfrom nbconvert import HTMLExporter\nex = HTMLExporter()\n'
                'ex.from_notebook_node(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("1")]))\n'
                f't = time.perf_counter(); ex.from_filename({str(executed)!r}); print(time.perf_counter() - t)')
        render = statistics.median(                 # the rendering alone, timed inside its process
            float(subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True).stdout) for _ in range(3))
        print(f"  {'HTML of the executed notebook, renderer warm':<64} {render:5.2f} s")
        print('  (the runner overlaps the second papermill import and the nbconvert import with the run: see nbs/85_runner.ipynb)')

        if not a.no_pipeline:
            penv = {**os.environ, 'MLPROJ_OUTPUTS': str(Path(d)/'pipeline')}
            t = timed([BIN/'mlproj', 'run'], penv)
            from mlproj.pipeline import PIPELINE
            print(f'\nmlproj run ({len(PIPELINE.steps)} steps, notebook engine, cold outputs folder): {t:.1f} s (target <= 15 s)')


if __name__ == '__main__':
    main()
