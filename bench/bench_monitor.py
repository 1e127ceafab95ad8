"""Monitoring: throughput and peak memory of the monitor's lenient, exact summaries (`mlproj.monitor.summarize_files`)
against batch inference's validating read of the same rows (`mlproj.data.iter_tables`, no prediction), measured in the
same run, each in its own process. Prints figures; asserts nothing.

    .venv/bin/python bench/bench_monitor.py [--rows 1000000] [--shards 4] [--chunksize 50000]
"""
import argparse, json, subprocess, sys, tempfile, textwrap
from pathlib import Path

CHILD = textwrap.dedent("""
    import json, resource, sys, time
    import pandas as pd
    from mlproj.data import SCHEMA, iter_tables, load_table, bundled_path, split_table
    from mlproj import monitor as mon
    mode, src, chunksize = sys.argv[1], sys.argv[2], int(sys.argv[3])
    tr, _ = split_table(load_table(bundled_path()), 0.2, 42)
    base = mon.suggest_baseline(tr)
    t0 = time.perf_counter()
    if mode == 'monitor':
        s = mon.summarize_files(src, mon.make_plan(SCHEMA, base[mon.STATISTICS_FILE]), chunksize)
        rows, n_viol = s['rows'], len(mon.finish(s, base)['violations'])
    else:   # reference: the validating reader batch inference uses, nothing else
        rows, n_viol = sum(len(c.df) for c in iter_tables(src, chunksize, require_target=False)), None
    dt = time.perf_counter() - t0
    print(json.dumps({'rows': rows, 'seconds': dt, 'violations': n_viol, 'peak_rss_mb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
""")


def run(mode, src, chunksize):
    r = subprocess.run([sys.executable, '-c', CHILD, mode, str(src), str(chunksize)], capture_output=True, text=True, check=True)
    return json.loads(r.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--rows', type=int, default=1_000_000)
    ap.add_argument('--shards', type=int, default=4)
    ap.add_argument('--chunksize', type=int, default=50_000)
    a = ap.parse_args()
    from mlproj.data import synthetic_penguins
    with tempfile.TemporaryDirectory() as d:
        per = a.rows // a.shards
        for i in range(a.shards):
            synthetic_penguins(per, seed=i, start_id=1 + i * per).to_csv(Path(d)/f'part-{i}.csv', index=False)
        print(f'{per * a.shards:,} rows in {a.shards} CSV file(s), chunksize {a.chunksize:,}')
        for mode in ('validate (reference)', 'monitor'):
            r = run(mode.split()[0], d, a.chunksize)
            print(f"{mode:<22} {r['rows']:>10,} rows in {r['seconds']:6.2f} s = {r['rows'] / r['seconds']:>10,.0f} rows/s, "
                  f"peak RSS {r['peak_rss_mb']:,.0f} MB" + (f", {r['violations']} violation(s)" if r['violations'] is not None else ''))


if __name__ == '__main__':
    main()
