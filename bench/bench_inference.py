"""Batch inference: throughput and peak memory of the chunked path against bare `model.predict_proba`
on the same rows, measured in the same run. Prints figures; asserts nothing.

    .venv/bin/python bench/bench_inference.py [--rows 1000000] [--shards 4] [--chunksize 50000]
"""
import argparse, json, os, resource, subprocess, sys, tempfile, textwrap, time
from pathlib import Path


CHILD = textwrap.dedent("""
    import json, resource, sys, time
    from pathlib import Path
    import pandas as pd
    from mlproj.train import load_model
    from mlproj.data import FEATURES, load_table
    from mlproj.inference import predict_files
    mode, model_path, src, out, chunksize = sys.argv[1:6]
    model, _ = load_model(model_path)
    t0 = time.perf_counter()
    if mode == 'chunked':
        rows = predict_files(model, src, out, chunksize=int(chunksize))['rows']
    else:  # reference: whole table in memory, bare predict_proba, nothing written
        df = pd.concat([pd.read_parquet(f) if f.suffix == '.parquet' else pd.read_csv(f) for f in sorted(Path(src).iterdir())])
        t0 = time.perf_counter()
        model.predict_proba(df[list(FEATURES)]); rows = len(df)
    dt = time.perf_counter() - t0
    print(json.dumps({'rows': rows, 'seconds': dt, 'peak_rss_mb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
""")


def run(mode, model, src, out, chunksize):
    r = subprocess.run([sys.executable, '-c', CHILD, mode, str(model), str(src), str(out), str(chunksize)],
                       capture_output=True, text=True, check=True)
    return json.loads(r.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--rows', type=int, default=1_000_000)
    ap.add_argument('--shards', type=int, default=4)
    ap.add_argument('--chunksize', type=int, default=50_000)
    ap.add_argument('--n-estimators', type=int, default=200)
    a = ap.parse_args()
    from mlproj.data import synthetic_penguins, load_table, bundled_path, TARGET
    from mlproj.train import train_model, write_model_artifact
    with tempfile.TemporaryDirectory() as d:
        d = Path(d); (d/'rows').mkdir()
        model = train_model(load_table(bundled_path()), seed=42, n_estimators=a.n_estimators)
        write_model_artifact(model, d/'model.tar.gz')
        per = -(-a.rows // a.shards)
        for i in range(a.shards):
            synthetic_penguins(min(per, a.rows - i*per), seed=i, start_id=1 + i*per).drop(columns=[TARGET]).to_csv(d/'rows'/f'part-{i}.csv', index=False)
        size = sum(f.stat().st_size for f in (d/'rows').iterdir()) / 2**20
        print(f'input: {a.rows:,} rows in {a.shards} CSV shards, {size:.0f} MB; model: extra trees x{a.n_estimators}')
        ref = run('reference', d/'model.tar.gz', d/'rows', d/'unused.csv', 0)
        chk = run('chunked', d/'model.tar.gz', d/'rows', d/'pred.csv', a.chunksize)
        for name, r in [('reference: in-memory predict_proba', ref), (f'batch inference, chunksize {a.chunksize:,}', chk)]:
            print(f"{name:<40} {r['rows']/r['seconds']:>12,.0f} rows/s {r['seconds']:>8.2f} s  peak RSS {r['peak_rss_mb']:>7.0f} MB")
        print(f"chunked path: {chk['seconds']/ref['seconds']:.2f}x the reference time (includes CSV parse, validation, CSV write), "
              f"{chk['peak_rss_mb']/ref['peak_rss_mb']:.2f}x its peak memory")


if __name__ == '__main__':
    main()
