"""An unchanged `mlproj run` among thousands of earlier runs: what the run cache costs as `outputs/` grows, against the
same rerun with one earlier run, measured in the same run. Prints figures; asserts nothing.

    .venv/bin/python bench/bench_cache.py [--runs 5000]

One real first run (script engine, a 20-tree forest) is made; then `--runs` earlier runs are added beside it, each a
copy of its record (the same size, about what a real run writes) under its own run id, with other cache keys — runs of
other parameters, none a hit. Each rerun is the real `mlproj` command (a subprocess) and must reuse every step from the
first run; the figures are the run's own seconds (`run.json` → `seconds`: the cache lookups, copies and checks) and
the wall time of the command (plus interpreter start and imports). The first rerun after the runs appear builds the
cache index (`outputs/.cache-index.json`) from the records; the next ones read the index and stat the records.
"""
import argparse, json, os, shutil, subprocess, sys, tempfile, time
from pathlib import Path

MLPROJ = [str(Path(sys.executable).parent/'mlproj')]
ARGS = ['--engine', 'script', '-p', 'train.n_estimators=20']


def run(outputs: Path, run_id: str, raw: Path, data: Path) -> tuple[float, dict]:
    env = {**os.environ, 'MLPROJ_OUTPUTS': str(outputs)}
    t0 = time.perf_counter()
    r = subprocess.run(MLPROJ + ['run', *ARGS, '--raw', str(raw), '--data', str(data), '--run-id', run_id],
                       env=env, capture_output=True, text=True, timeout=1800)
    wall = time.perf_counter() - t0
    if r.returncode: raise SystemExit(r.stderr[-3000:])
    return wall, json.loads((outputs/run_id/'run.json').read_text())


def rerun(outputs, run_id, raw, data) -> tuple[float, float]:
    wall, rec = run(outputs, run_id, raw, data)
    hits = sum(s['cache'] == 'hit' and s['from_run'] == 'first' for s in rec['steps'])
    if hits != len(rec['steps']): raise SystemExit(f'{run_id}: {hits}/{len(rec["steps"])} steps from the first run')
    shutil.rmtree(outputs/run_id)                     # the next rerun sees the same outputs/
    return rec['seconds'], wall


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--runs', type=int, default=5000, help='earlier runs beside the first one')
    ap.add_argument('--repeat', type=int, default=3, help='reruns measured per case (the median is printed)')
    a = ap.parse_args()
    from mlproj.data import bundled_path
    with tempfile.TemporaryDirectory() as d:
        d = Path(d); out = d/'outputs'
        shutil.copy(bundled_path(), d/'raw.csv'); shutil.copy(bundled_path(), d/'data.csv')
        run(out, 'first', d/'raw.csv', d/'data.csv')
        med = lambda xs: sorted(xs)[len(xs)//2]
        ref = [rerun(out, f'ref{i}', d/'raw.csv', d/'data.csv') for i in range(a.repeat)]

        text = (out/'first/run.json').read_text()
        rec = json.loads(text)
        t0 = time.perf_counter()
        for i in range(a.runs):
            rid = f'earlier-{i:05d}'
            r = {**rec, 'run_id': rid, 'started': f'2020-01-01T00:00:00+00:00',
                 'steps': [{**s, 'cache_key': f'{i:08d}' + s['cache_key'][8:], 'ended': '2020-01-01T00:00:00+00:00'} for s in rec['steps']]}
            (out/rid).mkdir(); (out/rid/'run.json').write_text(json.dumps(r, indent=2))
        made = time.perf_counter() - t0
        size = sum((out/f'earlier-{i:05d}'/'run.json').stat().st_size for i in range(a.runs))
        (out/'.cache-index.json').unlink(missing_ok=True)
        build = rerun(out, 'build', d/'raw.csv', d/'data.csv')
        many = [rerun(out, f'many{i}', d/'raw.csv', d/'data.csv') for i in range(a.repeat)]
        index = (out/'.cache-index.json').stat().st_size if (out/'.cache-index.json').exists() else None   # None: a build without the index

    print(f'earlier runs: {a.runs:,} records, {size/1e6:.0f} MB (written in {made:.1f} s); ' + (f'cache index {index/1e6:.1f} MB' if index else 'no cache index'))
    print(f'{"unchanged rerun (5/5 steps from cache)":<52} {"run seconds":>12} {"wall s":>8}')
    print(f'{"reference: 1 earlier run":<52} {med([x for x, _ in ref]):>12.2f} {med([w for _, w in ref]):>8.2f}')
    print(f'{f"{a.runs:,} earlier runs, index built from the records":<52} {build[0]:>12.2f} {build[1]:>8.2f}')
    print(f'{f"{a.runs:,} earlier runs, index current (median of {a.repeat})":<52} {med([x for x, _ in many]):>12.2f} {med([w for _, w in many]):>8.2f}')


if __name__ == '__main__':
    main()
