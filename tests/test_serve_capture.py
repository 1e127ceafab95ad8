"""Captured traffic is monitored like any batch: `mlproj serve --capture` writes SageMaker's data-capture layout and
records, and `mlproj job run monitor --input data=<capture folder>` checks it against the training baseline."""
import json, os, re, subprocess, sys, urllib.error, urllib.request
from pathlib import Path
import pandas as pd
import pytest
from conftest import endpoint          # the local endpoint in a subprocess, stopped gracefully

MLPROJ = str(Path(sys.executable).parent/'mlproj')
BUNDLED = Path(__file__).resolve().parents[1]/'mlproj'/'assets'/'penguins.csv'
FEATURES = ['island', 'bill_length_mm', 'bill_depth_mm', 'flipper_length_mm', 'body_mass_g', 'sex']


def capture_traffic(model, capture, rows: pd.DataFrame, outputs):
    "Serve `model` with capture on, send `rows` as one-row headerless CSV, JSON records and JSON Lines requests, stop the server."
    with endpoint([MLPROJ, 'serve', '--model', model, '--port', '0', '--workers', '1', '--capture', capture,
                   '--endpoint-name', 'penguins'], outputs) as (url, _):
        text = rows[FEATURES].astype(object).where(rows[FEATURES].notna(), '').astype(str)
        third = len(rows) // 3
        bodies = [(','.join(r) + '\n', 'text/csv') for r in text.iloc[:third].itertuples(index=False)]
        bodies.append((rows.iloc[third:2 * third].to_json(orient='records'), 'application/json'))
        bodies.append((rows.iloc[2 * third:].to_json(orient='records', lines=True), 'application/jsonlines'))
        for body, kind in bodies:
            req = urllib.request.Request(url + '/invocations', data=body.encode(), headers={'Content-Type': kind})
            assert urllib.request.urlopen(req, timeout=60).status == 200
    return len(bodies)


def monitor(model, data, outputs):
    none = Path(outputs)/'no-predictions'; none.mkdir(parents=True)          # live traffic has no batch predictions to compare
    r = subprocess.run([MLPROJ, 'job', 'run', 'monitor', '--engine', 'script', '--input', f'model={model}', '--input', f'data={data}',
                        '--input', f'predictions={none}'],
                       capture_output=True, text=True, timeout=600, env={**os.environ, 'MLPROJ_OUTPUTS': str(outputs)})
    assert r.returncode == 0, r.stderr[-3000:]
    found = list(Path(outputs).glob('mlproj-monitor-*/monitoring/constraint_violations.json'))     # the collected output
    assert len(found) == 1, found
    return json.loads(found[0].read_text())['violations']


def test_captured_drift_is_a_baseline_drift_violation(opt_ml_trained, tmp_path):
    model = Path(opt_ml_trained['model']).parent
    rows = pd.read_csv(BUNDLED)
    drifted = rows.assign(body_mass_g=(rows['body_mass_g'] + 1500).clip(upper=7900))       # heavier penguins, still plausible
    n = capture_traffic(model, tmp_path/'capture', drifted, tmp_path/'o')
    files = sorted((tmp_path/'capture').rglob('*.jsonl'))
    assert files and all(re.fullmatch(r'penguins/AllTraffic/\d{4}/\d\d/\d\d/\d\d', f.parent.relative_to(tmp_path/'capture').as_posix()) for f in files)
    recs = [json.loads(l) for f in files for l in f.read_text().splitlines()]
    assert len(recs) == n and {r['eventVersion'] for r in recs} == {'0'}
    assert {r['captureData']['endpointInput']['encoding'] for r in recs} == {'CSV', 'JSON'}
    assert all(set(r['captureData']) == {'endpointInput', 'endpointOutput'} for r in recs)

    violations = monitor(model, tmp_path/'capture', tmp_path/'m1')
    drift = [v for v in violations if v['constraint_check_type'] == 'baseline_drift_check']
    assert [v['feature_name'] for v in drift] == ['body_mass_g'], violations


def test_captured_traffic_like_training_has_no_drift(opt_ml_trained, tmp_path):
    "The control: the same requests, not drifted, give no baseline_drift_check violation (so the one above is the drift's)."
    model = Path(opt_ml_trained['model']).parent
    capture_traffic(model, tmp_path/'capture', pd.read_csv(BUNDLED), tmp_path/'o')
    violations = monitor(model, tmp_path/'capture', tmp_path/'m1')
    assert not [v for v in violations if v['constraint_check_type'] == 'baseline_drift_check'], violations
