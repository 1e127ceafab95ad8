"""The local endpoint: latency, throughput and behaviour under load, each beside its in-process reference measured in
the same run. Prints figures; asserts nothing.

    .venv/bin/python bench/bench_serve.py [--workers 2] [--n-estimators 200] [--one-row 400] [--big 30] [--load 2000] [--concurrency 16]

The endpoint is `mlproj serve` in a subprocess (gunicorn sync workers, the package extracted to a sandbox), called over
loopback HTTP with a new connection per request (the sync workers close each one, as the container's gunicorn does
behind nginx). References, in this process, on the same model and rows: bare `model.predict_proba`, and the four
handlers called directly (input_fn -> predict_fn -> output_fn), which is what the endpoint adds HTTP to. The three are
timed in turns (one call of each, again and again), so a shared machine's load weighs on all three alike; each turn's
difference to `predict_proba` gives `over_predict_proba` (median).

- one-row CSV request: median and p99 latency;
- 1,000-row CSV requests: rows per second;
- load: `--load` requests, `--concurrency` at a time, one in ten malformed (four kinds): status counts, whether every
  malformed one got a 4xx whose message names its problem, 5xx count, server RSS (master + workers) after the first
  100 requests and at the end, and /ping polled every 50 ms throughout (failures, slowest answer).
"""
import argparse, http.client, json, random, statistics, sys, tempfile, threading, time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd

from mlproj.data import FEATURES, bundled_path, load_table
from mlproj.endpoint import LocalServer
from mlproj.serve import input_fn, model_fn, output_fn, predict_fn
from mlproj.train import train_model, write_model_artifact


def pct(xs, q): return float(np.percentile(xs, q))


def request(port, body: bytes, ctype='text/csv', accept='text/csv', path='/invocations', method='POST'):
    c = http.client.HTTPConnection('127.0.0.1', port, timeout=120)
    try:
        c.request(method, path, body=body if method == 'POST' else None, headers={'Content-Type': ctype, 'Accept': accept} if method == 'POST' else {})
        r = c.getresponse()
        return r.status, r.read()
    finally:
        c.close()


def rss_kb(pid: int) -> int:
    "RSS of `pid` and its children (the gunicorn master and its workers), in kB."
    total = 0
    kids = Path(f'/proc/{pid}/task/{pid}/children').read_text().split()
    for p in [pid, *map(int, kids)]:
        try: total += int(next(l for l in Path(f'/proc/{p}/status').read_text().splitlines() if l.startswith('VmRSS')).split()[1])
        except (OSError, StopIteration): pass
    return total


def timed(fn, n):
    out = []
    for _ in range(n):
        t0 = time.perf_counter(); fn(); out.append((time.perf_counter() - t0) * 1000)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--workers', type=int, default=2); ap.add_argument('--n-estimators', type=int, default=200)
    ap.add_argument('--one-row', type=int, default=400); ap.add_argument('--big', type=int, default=30)
    ap.add_argument('--load', type=int, default=2000); ap.add_argument('--concurrency', type=int, default=16)
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix='bench-serve-'))
    df = load_table(bundled_path())
    write_model_artifact(train_model(df, seed=42, n_estimators=a.n_estimators), tmp/'model.tar.gz')
    served = model_fn(str(tmp))
    raw = pd.read_csv(bundled_path(), dtype=str, keep_default_na=False)
    row = raw.iloc[[0]]
    one_csv = (','.join(row[list(FEATURES)].iloc[0]) + '\n').encode()
    big_raw = pd.concat([raw] * 3, ignore_index=True).head(1000)
    big_csv = big_raw.to_csv(index=False).encode()
    X1, X1000 = df[list(FEATURES)].head(1), pd.concat([df] * 3, ignore_index=True).head(1000)[list(FEATURES)]
    figures = {'workers': a.workers, 'n_estimators': a.n_estimators}

    # in-process references and the endpoint, measured in turns (reference, handlers, endpoint, reference, ...) so that all
    # three see the same load on a shared machine; `over_predict_proba` is the median of each turn's own difference
    served.pipeline.predict_proba(X1)
    def handlers(body): return output_fn(predict_fn(input_fn(body, 'text/csv'), served), 'text/csv')
    for _ in range(20): handlers(one_csv); handlers(big_csv)

    with LocalServer(tmp, a.workers) as srv:
        port = int(srv.url.rsplit(':', 1)[1])
        for _ in range(20): request(port, one_csv)                       # every worker warm
        def turns(fns, n):
            out = [[] for _ in fns]
            for _ in range(n):
                for k, fn in enumerate(fns): out[k] += timed(fn, 1)
            return out
        ref1, hand1, ep1 = turns([lambda: served.pipeline.predict_proba(X1), lambda: handlers(one_csv), lambda: request(port, one_csv)], a.one_row)
        refbig, handbig, epbig = turns([lambda: served.pipeline.predict_proba(X1000), lambda: handlers(big_csv), lambda: request(port, big_csv)], a.big)
        over = lambda xs, ref: statistics.median(x - r for x, r in zip(xs, ref))
        figures['one_row_ms'] = {
            'endpoint': {'median': statistics.median(ep1), 'p99': pct(ep1, 99), 'over_predict_proba': over(ep1, ref1)},
            'in_process_predict_proba': {'median': statistics.median(ref1), 'p99': pct(ref1, 99)},
            'in_process_handlers': {'median': statistics.median(hand1), 'p99': pct(hand1, 99), 'over_predict_proba': over(hand1, ref1)}}
        figures['rows_per_s_1000_row_requests'] = {
            'endpoint': 1000 / (statistics.median(epbig) / 1000), 'in_process_predict_proba': 1000 / (statistics.median(refbig) / 1000),
            'in_process_handlers': 1000 / (statistics.median(handbig) / 1000)}
        figures['rows_per_s_1000_row_requests']['endpoint_over_predict_proba'] = (
            figures['rows_per_s_1000_row_requests']['endpoint'] / figures['rows_per_s_1000_row_requests']['in_process_predict_proba'])
        figures['rows_per_s_1000_row_requests']['in_process_handlers_over_predict_proba'] = (
            figures['rows_per_s_1000_row_requests']['in_process_handlers'] / figures['rows_per_s_1000_row_requests']['in_process_predict_proba'])
        figures['load_average'] = Path('/proc/loadavg').read_text().split()[:3] if Path('/proc/loadavg').exists() else None

        # load: one in ten malformed, four kinds, each with the words its message must contain
        bad = [(b'Dream,39.1,18.7,181,3750,robot\n', 'text/csv', 400, "column 'sex': unknown category 'robot'"),
               (b'Dream,39.1\n', 'text/csv', 400, 'request row 1: 2 values'),
               (b'{"instances": [', 'application/json', 400, 'not valid JSON'),
               (one_csv, 'application/x-npy', 415, 'not supported')]
        rng = random.Random(7)
        plan = [bad[rng.randrange(4)] if i % 10 == 9 else (one_csv if rng.random() < 0.8 else big_csv, 'text/csv', 200, '') for i in range(a.load)]
        pings, stop = [], threading.Event()
        def pinger():
            while not stop.is_set():
                t0 = time.perf_counter()
                try: s, _ = request(port, b'', path='/ping', method='GET')
                except OSError: s = 0
                pings.append((s, (time.perf_counter() - t0) * 1000)); time.sleep(0.05)
        th = threading.Thread(target=pinger, daemon=True); th.start()
        results, rss = [], {}
        def one(i):
            body, ctype, want, words = plan[i]
            s, out = request(port, body, ctype)
            ok = s == want and (s == 200 or (json.loads(out).get('error') and words in json.loads(out).get('message', '')))
            return s, ok, want != 200
        t0 = time.perf_counter()
        with ThreadPoolExecutor(a.concurrency) as pool:
            first = list(pool.map(one, range(100))); rss['after_first_100_kB'] = rss_kb(srv.proc.pid)
            rest = list(pool.map(one, range(100, a.load)))
        dt = time.perf_counter() - t0
        rss['at_end_kB'] = rss_kb(srv.proc.pid)
        stop.set(); th.join()
        results = first + rest
        statuses = {}
        for s, _, _ in results: statuses[s] = statuses.get(s, 0) + 1
        figures['load'] = {
            'requests': a.load, 'concurrency': a.concurrency, 'seconds': dt, 'requests_per_s': a.load / dt, 'statuses': statuses,
            '5xx': sum(v for k, v in statuses.items() if k >= 500),
            'malformed': sum(1 for *_, m in results if m), 'malformed_answered_4xx_naming_the_problem': sum(1 for _, ok, m in results if m and ok),
            'well_formed_200': sum(1 for s, ok, m in results if not m and ok),
            'rss': {**rss, 'end_over_first_100': rss['at_end_kB'] / rss['after_first_100_kB']},
            'ping': {'polls': len(pings), 'failures': sum(1 for s, _ in pings if s != 200), 'max_ms': max(ms for _, ms in pings),
                     'median_ms': statistics.median(ms for _, ms in pings)}}
    print(json.dumps(figures, indent=2, default=float))


if __name__ == '__main__':
    main()
