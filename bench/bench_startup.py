"""Start-up costs of local jobs, warm (instances forked from the fork server that imported the heavy libraries) against
cold (`--cold`: every process a fresh interpreter, as before), all measured in the same run. Prints figures beside
each goal of issue 22; asserts nothing.

    .venv/bin/python bench/bench_startup.py [--runs 3] [--no-pipeline]

1. A one-row batch-inference job (script engine): `run_local` of the job's request, timed from the call to its
   return, in a driver whose fork server is already up (as every job of a `mlproj run` after the first finds it);
   warm and cold alternating, median of `--runs`.
2. One step (`preprocess`), notebook engine against script engine, warm and cold, the same way.
3. `mlproj run` end to end (notebook engine, as `make run`): cold (`--cold`), warm, and the cached rerun, each the
   real command in a fresh process (the warm one starts its own fork server: that cost is in its figure).
"""
import argparse, os, statistics, subprocess, sys, tempfile, time
from pathlib import Path

BIN = Path(sys.executable).parent


def timed(argv, env) -> float:
    t0 = time.perf_counter()
    r = subprocess.run(argv, capture_output=True, text=True, env=env)
    dt = time.perf_counter() - t0
    if r.returncode: raise SystemExit(f'{" ".join(map(str, argv))} failed:\n{r.stderr[-3000:]}')
    return dt


def job_seconds(make_req, mode: str) -> float:
    "Wall time of one local job, warm or cold."
    from mlproj.local import run_local
    from mlproj.jobs import outputs_root
    os.environ['MLPROJ_COLD'] = '1' if mode == 'cold' else '0'
    req = make_req()
    t0 = time.perf_counter()
    d = run_local(req, jobs_dir=outputs_root()/'jobs', stream=None)
    dt = time.perf_counter() - t0
    if d['ProcessingJobStatus'] != 'Completed': raise SystemExit(f"{req['ProcessingJobName']}: {d.get('FailureReason')}")
    return dt


def alternate(make_req, runs: int) -> dict:
    times = {'warm': [], 'cold': []}
    for _ in range(runs):
        for mode in times: times[mode].append(job_seconds(make_req, mode))
    return times


def show(label: str, t: list) -> float:
    m = statistics.median(t)
    print(f"  {label:<44} {m:6.2f} s   (runs: {', '.join(f'{x:.2f}' for x in t)})")
    return m


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--runs', type=int, default=3)
    ap.add_argument('--no-pipeline', action='store_true', help='skip the three `mlproj run` figures')
    a = ap.parse_args()
    print(f'load average at start: {" ".join(f"{x:.2f}" for x in os.getloadavg())} on {os.cpu_count()} cores')
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        os.environ.update({'MLPROJ_OUTPUTS': str(d/'outputs'), 'MPLBACKEND': os.environ.get('MPLBACKEND', 'Agg')})
        env = dict(os.environ)
        from mlproj.data import bundled_path, synthetic_penguins, TARGET
        from mlproj.jobs import render_request, step_job
        from mlproj.local import run_local, warm_server

        # a model to score with: preprocess + train as jobs (warm; not timed)
        os.environ['MLPROJ_COLD'] = '0'
        server = warm_server(); t0 = time.perf_counter(); ready = server.ready()
        print(f'fork server: imported its libraries in {time.perf_counter() - t0:.2f} s after the first call (single-threaded: {ready})')
        for step, ins, outs in [('preprocess', {'raw': str(bundled_path())}, {'train': str(d/'train'), 'test': str(d/'test')}),
                                ('train', {'train': str(d/'train')}, {'model': str(d/'model')})]:
            r = run_local(render_request(step_job(step, ins, outs)), jobs_dir=d/'outputs/jobs', stream=None)
            assert r['ProcessingJobStatus'] == 'Completed', r
        (d/'one').mkdir()
        synthetic_penguins(1, seed=3).drop(columns=[TARGET]).to_csv(d/'one/row.csv', index=False)
        n = iter(range(10**6))

        print(f'\n1. one-row batch-inference job, script engine (median of {a.runs}; the server already up)')
        batch = lambda: render_request(step_job('batch_inference', {'model': str(d/'model'), 'data': str(d/'one')},
                                                {'predictions': str(d/f'pred-{next(n)}')}, engine='script'))
        t = alternate(batch, a.runs)
        cold, warm = show('cold', t['cold']), show('warm', t['warm'])
        print(f'  warm: {warm:.2f} s (goal <= 1.00 s; cold {cold:.2f} s, {cold / warm:.1f}x)')

        print(f'\n2. one step (preprocess), notebook engine vs script engine (median of {a.runs} each)')
        med = {}
        for engine in ('script', 'notebook'):
            outs = lambda e=engine: {'train': str(d/f'tr-{next(n)}'), 'test': str(d/f'te-{next(n)}'), **({'report': str(d/f'rep-{next(n)}')} if e == 'notebook' else {})}
            t = alternate(lambda e=engine: render_request(step_job('preprocess', {'raw': str(bundled_path())}, outs(e), engine=e)), a.runs)
            for mode in ('cold', 'warm'): med[engine, mode] = show(f'{engine} engine, {mode}', t[mode])
        print(f"  notebook engine over script engine: warm {med['notebook', 'warm'] - med['script', 'warm']:+.2f} s (goal <= +1.00 s), "
              f"cold {med['notebook', 'cold'] - med['script', 'cold']:+.2f} s")
        server.close()

        if not a.no_pipeline:
            print('\n3. mlproj run, notebook engine (as make run), each in a fresh process')
            penv = {k: v for k, v in env.items() if k != 'MLPROJ_COLD'}
            cold = timed([BIN/'mlproj', 'run', '--cold', '--run-id', 'cold'], {**penv, 'MLPROJ_OUTPUTS': str(d/'p-cold')})
            warm = timed([BIN/'mlproj', 'run', '--run-id', 'warm'], {**penv, 'MLPROJ_OUTPUTS': str(d/'p-warm')})
            cached = timed([BIN/'mlproj', 'run', '--run-id', 'again'], {**penv, 'MLPROJ_OUTPUTS': str(d/'p-warm')})
            print(f'  cold (--cold)            {cold:6.2f} s')
            print(f'  warm                     {warm:6.2f} s   (goal <= 12 s; {cold / warm:.1f}x faster than cold)')
            print(f'  cached rerun             {cached:6.2f} s   (goal < 1 s)')
    print(f'load average at end: {" ".join(f"{x:.2f}" for x in os.getloadavg())}')


if __name__ == '__main__':
    main()
