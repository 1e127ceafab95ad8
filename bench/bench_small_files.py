"""Batch inference over many small shards: the per-file cost of the step, against the same rows in one file,
measured in the same run. Prints figures; asserts nothing.

    .venv/bin/python bench/bench_small_files.py [--files 2000] [--rows-per-file 1]

Both runs are the real runtime script (`python -m mlproj.scripts.batch_inference`) over an /opt/ml tree, the
model a 200-tree extra-trees forest trained on the bundled table; the input holds only the model's features (no id
column), so every prediction carries its file and row.
"""
import argparse, json, subprocess, sys, tempfile, time
from pathlib import Path


def run_step(root: Path, data: Path) -> tuple[float, dict]:
    env = {'MLPROJ_OPT_ML': str(root), 'PATH': '/usr/bin:/bin'}
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, '-m', 'mlproj.scripts.batch_inference', '--data', str(data), '--model', str(root/'model'),
                        '--predictions', str(root/'out'/data.name)], env=env, capture_output=True, text=True)
    dt = time.perf_counter() - t0
    if r.returncode: raise SystemExit(r.stderr[-2000:])
    return dt, json.loads(r.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--files', type=int, default=2000)
    ap.add_argument('--rows-per-file', type=int, default=1)
    a = ap.parse_args()
    from mlproj.data import SCHEMA, load_table, bundled_path, synthetic_penguins
    from mlproj.train import train_model, write_model_artifact
    with tempfile.TemporaryDirectory() as d:
        root = Path(d); (root/'model').mkdir()
        write_model_artifact(train_model(load_table(bundled_path()), seed=42), root/'model/model.tar.gz')
        n = a.files * a.rows_per_file
        rows = synthetic_penguins(n, seed=1)[list(SCHEMA.features)]
        shards = root/'shards'; shards.mkdir(); one = root/'one'; one.mkdir()
        for i in range(a.files):
            rows.iloc[i*a.rows_per_file:(i+1)*a.rows_per_file].to_csv(shards/f'part-{i:05d}.csv', index=False)
        rows.to_csv(one/'all.csv', index=False)
        t_one, _ = run_step(root, one)
        t_many, summary = run_step(root, shards)
        print(f'{n:,} rows; model: extra trees x200; the step end to end (process start, model load, read, validate, predict, write)')
        print(f"{'reference: the same rows in 1 file':<44} {t_one:>7.2f} s {n/t_one:>10,.0f} rows/s")
        print(f"{f'{a.files:,} files of {a.rows_per_file} row(s)':<44} {t_many:>7.2f} s {n/t_many:>10,.0f} rows/s")
        print(f'per-file cost: {(t_many - t_one) / a.files * 1000:.2f} ms; summary printed by the step: {len(json.dumps(summary)):,} bytes '
              f"(files {summary['summary']['files']:,}, first {len(summary['summary']['first_files'])} listed)")


if __name__ == '__main__':
    main()
