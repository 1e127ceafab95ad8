"""A hostile and a careless caller against the serving, transform and registry surfaces: one real `mlproj serve`
(gunicorn, two workers, capture on) for the whole module, real HTTP from http.client and raw sockets, the real boto3
runtime client; transform jobs, model packages and the registry through the `mlproj` command. Every refusal is one
clear line — over HTTP a 4xx with a JSON body holding exactly `error` and `message` — nothing is written outside its
place, and nothing hangs: a client that stalls is answered 408 after MLPROJ_SERVE_READ_TIMEOUT (2 s here)."""
import http.client, io, json, os, socket, subprocess, sys, tarfile, threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlparse
import pytest
from conftest import start_endpoint, stop_endpoint          # the local endpoint in a subprocess, stopped gracefully

pytestmark = pytest.mark.usefixtures('loopback_only')
MLPROJ = str(Path(sys.executable).parent/'mlproj')
FEATURES = ['island', 'bill_length_mm', 'bill_depth_mm', 'flipper_length_mm', 'body_mass_g', 'sex']
HEADER = ','.join(FEATURES).encode() + b'\n'
ROW = b'Dream,39.1,18.7,181,3750,male\n'
RECORD = '{"island": "Dream", "bill_length_mm": %s, "bill_depth_mm": 18.7, "flipper_length_mm": 181, "body_mass_g": 3750, "sex": "male"}'
READ_TIMEOUT = 2


@pytest.fixture(scope='module')
def served(opt_ml_trained, tmp_path_factory):
    "One endpoint for the module: (host, port, capture folder, outputs)."
    out = tmp_path_factory.mktemp('hostile')
    old = os.environ.get('MLPROJ_SERVE_READ_TIMEOUT')
    os.environ['MLPROJ_SERVE_READ_TIMEOUT'] = str(READ_TIMEOUT)
    try: p, url, err = start_endpoint([MLPROJ, 'serve', '--model', opt_ml_trained['model'], '--port', '0', '--workers', '2',
                                       '--capture', out/'capture', '--endpoint-name', 'hostile'], out)
    finally:
        if old is None: os.environ.pop('MLPROJ_SERVE_READ_TIMEOUT')
        else: os.environ['MLPROJ_SERVE_READ_TIMEOUT'] = old
    u = urlparse(url)
    yield u.hostname, u.port, out/'capture', out
    stop_endpoint(p, err)


def request(served, method, path, body=b'', headers=None):
    "(status, content type, body) of one HTTP request."
    c = http.client.HTTPConnection(served[0], served[1], timeout=60)
    try:
        c.request(method, path, body=body, headers=headers or {})
        r = c.getresponse()
        return r.status, r.getheader('Content-Type'), r.read()
    finally: c.close()


def raw(served, data: bytes, stop_after=None) -> bytes:
    "Send raw bytes (and stop sending, keeping the connection open); everything the server answers until it closes."
    s = socket.create_connection(served[:2], timeout=60)
    try:
        s.sendall(data)
        out = b''
        while (b := s.recv(65536)): out += b
        return out
    finally: s.close()


def refused(status, ctype, body, want: int, *words):
    "A refusal as the endpoint answers every one: the status, JSON {error, message}, a one-line message holding `words`."
    assert (status, ctype) == (want, 'application/json'), (status, ctype, body[:300])
    doc = json.loads(body)
    assert set(doc) == {'error', 'message'} and '\n' not in doc['message'] and 'Traceback' not in doc['message'], doc
    for w in words: assert w in doc['message'], (w, doc)
    return doc


def http_answer(data: bytes):
    "(status, content type, body) of a raw HTTP/1.1 answer."
    head, _, body = data.partition(b'\r\n\r\n')
    lines = head.decode('latin-1').split('\r\n')
    headers = dict(l.split(': ', 1) for l in lines[1:])
    return int(lines[0].split()[1]), headers.get('Content-Type'), body


def captured(served) -> list:
    return [json.loads(l) for f in sorted(served[2].rglob('*.jsonl')) for l in f.read_text().splitlines()]


# --- bodies: every bad one a 4xx naming its problem -------------------------------------------------------------------

BAD_BODIES = [
    ('JSON nested 100,000 deep', b'[' * 100_000 + b']' * 100_000, 'application/json', 400, 'nested too deeply'),
    ('JSON number of 5,000 digits', ('[' + RECORD % ('9' * 5000) + ']').encode(), 'application/json', 400, 'more digits'),
    ('JSON Infinity', ('[' + RECORD % 'Infinity' + ']').encode(), 'application/json', 400, "column 'bill_length_mm'", 'outside the plausible range'),
    ('JSON scalar', b'42', 'application/json', 400, 'JSON rows are a list of records'),
    ('JSON key twice', ('[' + RECORD.replace('"island": "Dream"', '"island": "Dream", "island": "Mars"') % 39 + ']').encode(), 'application/json', 400, "key 'island' appears twice"),
    ('JSON columns naming one twice', b'{"columns": ["island", "island"], "data": [["Dream", "Mars"]]}', 'application/json', 400, '"columns" names \'island\' twice'),
    ('JSON Lines key twice', (RECORD % 39).replace('"sex": "male"', '"sex": "male", "sex": "female"').encode(), 'application/jsonlines', 400, "line 1: key 'sex' appears twice"),
    ('JSON empty list', b'[]', 'application/json', 400, 'holds no rows'),
    ('JSON nested cell', ('[' + RECORD % '{"a": 1}' + ']').encode(), 'application/json', 400, 'a nested JSON value is not a cell'),
    ('JSON truncated', b'{"instances": [', 'application/json', 400, 'not valid JSON'),
    ('JSON Lines bad 3rd line', (RECORD % 39 + '\n\n' + 'nope\n').encode(), 'application/jsonlines', 400, 'line 3 is not valid JSON'),
    ('CSV quoted newline', HEADER + b'"Dre\nam",39.1,18.7,181,3750,male\n', 'text/csv', 400, "column 'island'", 'unknown category'),
    ('CSV unclosed quote', HEADER + b'"Dream,39.1,18.7,181,3750,male\n', 'text/csv', 400, 'row 1: 1 values, the header names 6 columns'),
    ('CSV header naming a column twice', b'island,' + HEADER + b'Dream,Biscoe,39.1,18.7,181,3750,male\n', 'text/csv', 400, "column 'island' appears twice"),
    ('CSV header, no rows', HEADER, 'text/csv', 400, 'holds no rows'),
    ('empty body', b'', 'text/csv', 400, 'holds no rows'),
    ('CSV NUL byte', b'Dream\x00,39.1,18.7,181,3750,male\n', 'text/csv', 400, 'unknown category'),
    ('CSV 1.1 MB single line', b'Dream,' + b'9' * 1_100_000 + b',18.7,181,3750,male\n', 'text/csv', 400, 'not readable CSV (field larger than field limit'),
    ('CSV 200,000 columns', b','.join([b'x'] * 200_000) + b'\n', 'text/csv', 400, 'row 1: 200000 values'),
    ('CSV by semicolons', b'Dream;39.1;18.7;181;3750;male\n', 'text/csv', 400, 'row 1: 1 values'),
    ('CSV in UTF-16', ROW.decode().encode('utf-16'), 'text/csv', 400, 'byte 0 (0xff) is not UTF-8 text'),
    ('charset latin-1', ROW, 'text/csv; charset=latin-1', 415, "charset 'latin-1' is not supported"),
    ('unparsable content type', ROW, ';;;==', 415, 'is not supported'),
    ('NumPy body', ROW, 'application/x-npy', 415, 'is not supported'),
]


@pytest.mark.parametrize('name, body, ctype, status, words', [pytest.param(*c[:4], c[4:], id=c[0]) for c in BAD_BODIES])
def test_bad_bodies_are_4xx_json_naming_the_problem(served, name, body, ctype, status, words):
    refused(*request(served, 'POST', '/invocations', body, {'Content-Type': ctype}), status, *words)


def test_compressed_bodies_are_refused_not_misread(served):
    import gzip
    s, ct, b = request(served, 'POST', '/invocations', gzip.compress(ROW), {'Content-Type': 'text/csv', 'Content-Encoding': 'gzip'})
    refused(s, ct, b, 415, "Content-Encoding 'gzip' is not supported")


def test_quirky_but_valid_bodies_answer_as_the_plain_one(served):
    "BOM + CRLF + header, upper-case types with charset, chunked encoding, JSON NaN and the text 'nan' (missing, as batch inference reads them)."
    def answer(body, ctype, extra=None):
        s, ct, b = request(served, 'POST', '/invocations', body, {'Content-Type': ctype, 'Accept': 'application/json', **(extra or {})})
        assert s == 200, b[:300]
        return json.loads(b)['predictions']
    plain = answer(ROW, 'text/csv')
    assert answer(b'\xef\xbb\xbf' + (HEADER + ROW).replace(b'\n', b'\r\n'), 'TEXT/CSV; Charset=UTF-8') == plain
    assert answer(('[' + RECORD % 39.1 + ']').encode(), 'application/json') == plain
    chunked = raw(served, b'POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: text/csv\r\nAccept: application/json\r\n'
                          b'Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n' + b'%x\r\n%s\r\n0\r\n\r\n' % (len(ROW), ROW))
    assert http_answer(chunked)[0] == 200 and json.loads(http_answer(chunked)[2])['predictions'] == plain
    missing = answer(b'Dream,,18.7,181,3750,male\n', 'text/csv')
    assert missing != plain
    assert answer(('[' + RECORD % 'NaN' + ']').encode(), 'application/json') == missing
    assert answer(b'Dream,nan,18.7,181,3750,male\n', 'text/csv') == missing


def test_accept_weights(served):
    def kind(accept):
        s, ct, b = request(served, 'POST', '/invocations', ROW, {'Content-Type': 'text/csv', 'Accept': accept})
        return s, ct, b
    assert kind('application/json;q=0.1, text/csv;q=0.9')[1] == 'text/csv'
    assert kind('text/csv;q=abc, application/jsonlines;q=0.5')[1] == 'text/csv'            # an unreadable weight counts as 1
    refused(*kind('text/csv;q=0'), 406, "accept 'text/csv;q=0' names no type")             # q=0: not acceptable
    refused(*kind(',,,'), 406, 'names no type')
    refused(*kind('image/png'), 406, "accept 'image/png'")


# --- paths, methods, HTTP itself ---------------------------------------------------------------------------------------

@pytest.mark.parametrize('method, path, status, words', [
    ('GET', '/../../etc/passwd', 404, "no route '/../../etc/passwd'"),
    ('POST', '/endpoints/../invocations', 404, 'no route'),
    ('POST', '/endpoints/bad_name!/invocations', 404, 'no route'),
    ('POST', '/invocations/', 404, "no route '/invocations/'"),
    ('PUT', '/invocations', 405, 'PUT is not allowed'),
    ('DELETE', '/ping', 405, 'DELETE is not allowed'),
    ('OPTIONS', '/invocations', 405, 'OPTIONS is not allowed'),
    ('GET', '/invocations', 405, 'GET is not allowed'),
    ('PATCH', '/execution-parameters', 405, 'PATCH is not allowed')])
def test_paths_and_methods(served, method, path, status, words):
    refused(*request(served, method, path, ROW if method != 'GET' else b'', {'Content-Type': 'text/csv'}), status, words)


def test_head_ping_and_query_strings(served):
    assert request(served, 'HEAD', '/ping')[0] == 200
    assert request(served, 'POST', '/invocations?debug=1', ROW, {'Content-Type': 'text/csv'})[0] == 200


@pytest.mark.parametrize('name, data, status, words', [
    ('negative Content-Length', b'POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: text/csv\r\nContent-Length: -5\r\n\r\n' + ROW, 400, 'malformed HTTP request'),
    ('Content-Length not a number', b'POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n' + ROW, 400, 'malformed HTTP request'),
    ('two Content-Lengths', b'POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 30\r\n\r\n' + ROW, 400, 'malformed HTTP request'),
    ('Content-Length and chunked', b'POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n', 400, 'malformed HTTP request'),
    ('TLS hello on plain HTTP', b'\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03\r\n\r\n', 400, 'Invalid HTTP request line'),
    ('20 kB header', b'POST /invocations HTTP/1.1\r\nHost: x\r\nX-A: ' + b'a' * 20_000 + b'\r\nContent-Length: 0\r\n\r\n', 431, 'malformed HTTP request'),
    ('bad chunk size', b'POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: text/csv\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n', 400, 'InvalidChunkSize'),
    ('body shorter than its Content-Length, then EOF', None, 400, 'ended after 5 of the 1,000 bytes')])
def test_malformed_http_is_answered_in_json(served, name, data, status, words):
    if data is None:           # the client closes its side after 5 bytes: the server reads EOF, not a stall
        s = socket.create_connection(served[:2], timeout=60)
        s.sendall(b'POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: text/csv\r\nContent-Length: 1000\r\n\r\nDream'); s.shutdown(socket.SHUT_WR)
        got = b''
        while (b := s.recv(65536)): got += b
        s.close()
    else: got = raw(served, data)
    refused(*http_answer(got), status, words)


def test_stalled_clients_get_408_and_the_endpoint_keeps_answering(served):
    "Slowloris: headers or a body that stop arriving are answered 408 after the read timeout, on every worker at once."
    stalls = [b'POST /invocations HTTP/1.1\r\nHost: x\r\n',                                                       # headers never end
              b'POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: text/csv\r\nContent-Length: 1000\r\n\r\nDream']    # body stops
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda d: http_answer(raw(served, d)), stalls * 2))                           # both workers held
    for (s, ct, b), words in zip(answers, ['headers did not arrive', 'body stopped arriving'] * 2):
        refused(s, ct, b, 408, words)
    assert request(served, 'POST', '/invocations', ROW, {'Content-Type': 'text/csv'})[0] == 200
    # a declared body far over the limit that never comes: 413 (not a wait for 99 exabytes)
    huge = raw(served, b'POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: text/csv\r\nContent-Length: 99999999999999999999\r\n\r\nDream')
    refused(*http_answer(huge), 413, 'over the limit of 6,291,456 bytes')


def test_bodies_over_the_limit_are_413_even_chunked(served):
    big = b'x' * 7_000_000
    refused(*request(served, 'POST', '/invocations', big, {'Content-Type': 'text/csv'}), 413, '7,000,000 bytes is over the limit')
    got = raw(served, b'POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: text/csv\r\nTransfer-Encoding: chunked\r\n\r\n'
                      + b'%x\r\n' % len(big) + big + b'\r\n0\r\n\r\n')
    refused(*http_answer(got), 413, 'over the limit of 6,291,456 bytes')      # read, not a reset connection


def test_concurrent_mixed_traffic_and_capture_holds_only_answered_requests(served):
    "64 requests 16 at a time, one in four malformed: each answered as alone; capture gains exactly one record per 200."
    before = len(captured(served))
    good = request(served, 'POST', '/invocations', HEADER + ROW * 50, {'Content-Type': 'text/csv', 'Accept': 'text/csv'})
    assert good[0] == 200
    bodies = [(HEADER + ROW * 50, 200) if i % 4 else (HEADER + ROW.replace(b'male', b'robot') * 50, 400) for i in range(64)]
    with ThreadPoolExecutor(16) as pool:
        got = list(pool.map(lambda b: request(served, 'POST', '/invocations', b[0], {'Content-Type': 'text/csv', 'Accept': 'text/csv'}), bodies))
    for (body, want), (s, ct, b) in zip(bodies, got):
        if want == 200: assert (s, b) == (200, good[2])
        else: refused(s, ct, b, 400, "request row 1, column 'sex': unknown category 'robot'")
    recs = captured(served)
    assert len(recs) - before == 1 + sum(w == 200 for _, w in bodies)
    mine = [r for r in recs if r['captureData']['endpointInput']['data'] == (HEADER + ROW * 50).decode()]
    assert len(mine) == 1 + sum(w == 200 for _, w in bodies)
    assert all(r['eventVersion'] == '0' and r['captureData']['endpointInput']['encoding'] == 'CSV' and
               r['captureData']['endpointOutput']['data'] == good[2].decode() for r in mine)


def test_runtime_client_gets_model_errors_for_odd_requests(served):
    import boto3
    rt = boto3.client('sagemaker-runtime', endpoint_url=f'http://{served[0]}:{served[1]}', region_name='us-east-1',
                      aws_access_key_id='x', aws_secret_access_key='x')
    for ctype, body, status in [('application/x-npy', ROW, 415), ('application/json', b'[' * 50_000, 400), ('text/csv', b'', 400)]:
        with pytest.raises(rt.exceptions.ModelError) as e:
            rt.invoke_endpoint(EndpointName='hostile', ContentType=ctype, Body=body)
        assert e.value.response['OriginalStatusCode'] == status
        assert set(json.loads(e.value.response['OriginalMessage'])) == {'error', 'message'}
    with pytest.raises(rt.exceptions.ModelError) as e:
        rt.invoke_endpoint(EndpointName='hostile', ContentType='text/csv', Accept='image/png', Body=ROW)
    assert e.value.response['OriginalStatusCode'] == 406


# --- batch transform ---------------------------------------------------------------------------------------------------

def mlproj(outputs, *args, env=None):
    return subprocess.run([MLPROJ, *map(str, args)], capture_output=True, text=True, timeout=600,
                          env={**os.environ, 'MLPROJ_OUTPUTS': str(outputs), **(env or {})})


def one_line_error(r, *words):
    assert r.returncode == 2 and 'Traceback' not in r.stderr, r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert lines[-1].startswith('mlproj: error: ') and all(w in lines[-1] for w in words), lines
    return lines[-1]


def test_transform_of_odd_files(opt_ml_trained, tmp_path):
    "Empty, blank, CRLF, BOM, no final newline, a nested oddly named file; a non-UTF-8 file fails alone, and its stale .out from an earlier job goes."
    src, out = tmp_path/'in', tmp_path/'out'
    files = {'good.csv': ROW * 2, 'empty.csv': b'', 'blank.csv': b'\n\n\n', 'crlf.csv': ROW.replace(b'\n', b'\r\n') * 2,
             'bom.csv': b'\xef\xbb\xbf' + ROW, 'nonl.csv': ROW.rstrip(b'\n'), 'sub/deeper/we ird n\u00e4me\'s "q".csv': ROW,
             'latin1.csv': ROW.replace(b'male', b'm\xe9le')}
    for rel, data in files.items(): (src/rel).parent.mkdir(parents=True, exist_ok=True); (src/rel).write_bytes(data)
    out.mkdir(); (out/'latin1.csv.out').write_bytes(b'an earlier job\n')
    r = mlproj(tmp_path, 'transform', 'run', '--model', opt_ml_trained['model'], '--input', src, '--output', out, '--workers', 1)
    assert r.returncode == 1, r.stderr[-2000:]
    d = json.loads(r.stdout)
    assert d['TransformJobStatus'] == 'Failed' and d['FailureReason'].startswith('1 of 8 input file(s) failed; first: latin1.csv: record 1: HTTP 400')
    assert {k for k, v in d['Files'].items() if v['status'] != 'Completed'} == {'latin1.csv'}
    from mlproj.serve import input_fn, model_fn, output_fn, predict_fn      # the handlers in this process: the reference
    line = output_fn(predict_fn(input_fn(ROW, 'text/csv'), model_fn(str(Path(opt_ml_trained['model']).parent))), 'text/csv')[0]
    want = {'good.csv.out': line * 2, 'empty.csv.out': b'', 'blank.csv.out': b'', 'crlf.csv.out': line * 2, 'bom.csv.out': line,
            'nonl.csv.out': line, 'sub/deeper/we ird n\u00e4me\'s "q".csv.out': line}
    assert {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob('*') if p.is_file()} == want


def test_transform_refuses_an_output_it_cannot_own_before_starting(opt_ml_trained, tmp_path):
    (tmp_path/'in').mkdir(); (tmp_path/'in'/'a.csv').write_bytes(ROW); (tmp_path/'afile').write_text('x')
    r = mlproj(tmp_path, 'transform', 'run', '--model', opt_ml_trained['model'], '--input', tmp_path/'in', '--output', tmp_path/'afile')
    one_line_error(r, 'afile is a file, not a folder')
    r = mlproj(tmp_path, 'transform', 'run', '--model', opt_ml_trained['model'], '--input', tmp_path/'in', '--output', tmp_path/'in'/'out')
    one_line_error(r, 'is inside the input folder')
    assert sorted(p.name for p in (tmp_path/'in').iterdir()) == ['a.csv']


def test_transform_joins_json_lines_as_sagemaker_does(opt_ml_trained, tmp_path):
    (tmp_path/'in').mkdir()
    (tmp_path/'in'/'a.jsonl').write_text((RECORD % 39.1 + '\n') + (RECORD % 45.2 + '\n'))
    r = mlproj(tmp_path, 'transform', 'run', '--model', opt_ml_trained['model'], '--input', tmp_path/'in', '--output', tmp_path/'out',
               '--content-type', 'application/jsonlines', '--accept', 'application/jsonlines', '--join-source', 'Input', '--workers', 1)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [json.loads(l) for l in (tmp_path/'out'/'a.jsonl.out').read_text().splitlines()]
    assert [r['bill_length_mm'] for r in rows] == [39.1, 45.2]
    assert all(set(r['SageMakerOutput']) >= {'predicted_species', 'proba_Adelie'} for r in rows)


# --- model packages ----------------------------------------------------------------------------------------------------

def package_with(tmp_path, model, name, extra=(), replace=None) -> Path:
    "A copy of the model package of `model` with `extra` tar members added (TarInfo, bytes) or members replaced."
    from mlproj.endpoint import package_model
    good = tmp_path/'good.tar.gz'
    if not good.exists(): package_model(model, good)
    with tarfile.open(good) as t: members = {m.name: t.extractfile(m).read() for m in t}
    members.update(replace or {})
    dest = tmp_path/f'{name}.tar.gz'
    with tarfile.open(dest, 'w:gz') as t:
        for n, b in members.items(): ti = tarfile.TarInfo(n); ti.size = len(b); t.addfile(ti, io.BytesIO(b))
        for ti, b in extra: t.addfile(ti, io.BytesIO(b) if b is not None else None)
    return dest


def member(name, **kw):
    ti = tarfile.TarInfo(name)
    for k, v in kw.items(): setattr(ti, k, v)
    return ti


def test_package_members_that_escape_or_link_are_refused(opt_ml_trained, tmp_path):
    import tempfile
    target = Path(tempfile.gettempdir())/f'mlproj-hostile-{os.getpid()}.txt'        # where '../../' from the sandbox's model_dir lands
    cases = [('escape', [(member(f'../../{target.name}', size=4), b'evil')], 'OutsideDestinationError'),
             ('symlink', [(member('code/link', type=tarfile.SYMTYPE, linkname='/etc/passwd'), None)], 'AbsoluteLinkError'),
             ('hardlink', [(member('code/hl', type=tarfile.LNKTYPE, linkname='/etc/passwd'), None)], 'AbsoluteLinkError'),
             ('device', [(member('code/dev', type=tarfile.CHRTYPE, devmajor=1, devminor=3), None)], 'SpecialFileError')]
    for name, extra, words in cases:
        pkg = package_with(tmp_path, opt_ml_trained['model'], name, extra)
        r = mlproj(tmp_path, 'serve', '--model', pkg, '--port', '0')
        one_line_error(r, f'{name}.tar.gz: cannot extract the model package', words)
    assert not target.exists()


@pytest.mark.parametrize('script, words', [
    (b'import os\nimport no_such_module_xyz\n', "inference.py line 2 does not import (ModuleNotFoundError: No module named 'no_such_module_xyz')"),
    (b'def (\n', 'inference.py line 1 does not import (SyntaxError'),
    (b'raise SystemExit(3)\n', 'does not import (SystemExit')])
def test_a_broken_entry_script_is_one_line(opt_ml_trained, tmp_path, script, words):
    pkg = package_with(tmp_path, opt_ml_trained['model'], 'broken', replace={'code/inference.py': script})
    one_line_error(mlproj(tmp_path, 'serve', '--model', pkg, '--port', '0'), words)


def test_a_threshold_for_a_multiclass_model_is_refused(opt_ml_trained, tmp_path):
    one_line_error(mlproj(tmp_path, 'serve', '--model', opt_ml_trained['model'], '--threshold', '0.3', '--port', '0'),
                   "--threshold='0.3': a decision threshold applies to binary models only, this model is multiclass")
    one_line_error(mlproj(tmp_path, 'serve', '--model', opt_ml_trained['model'], '--port', '0', env={'MLPROJ_THRESHOLD': '0.3'}),
                   "MLPROJ_THRESHOLD='0.3': a decision threshold applies to binary models only")


# --- the registry ------------------------------------------------------------------------------------------------------

@pytest.fixture
def registry(tmp_path, monkeypatch):
    "A local registry with group mlproj, versions 1 and 2 (pending), under tmp_path/outputs."
    from mlproj.registry import LocalRegistry, package_request, MODEL, EVALUATION, STATISTICS, CONSTRAINTS, PACKAGE_KEY
    monkeypatch.setenv('MLPROJ_OUTPUTS', str(tmp_path/'outputs'))
    reg = LocalRegistry(tmp_path/'outputs'/'registry')
    for k in ('k1', 'k2'):
        src = tmp_path/k; src.mkdir()
        for n in (MODEL, EVALUATION, STATISTICS, CONSTRAINTS): (src/n).write_text(json.dumps({'n': n, 'k': k}))
        reg.register('mlproj', {n: src/n for n in (MODEL, EVALUATION, STATISTICS, CONSTRAINTS)},
                     lambda u, s, k=k: package_request('mlproj', u, s, 'mlproj-local', metadata={PACKAGE_KEY: k}), k)
    return reg


@pytest.mark.parametrize('ref, words', [
    ('../x', "bad model package reference '../x'"), ('G/0', "bad model package reference 'G/0'"), ('G/-1', "bad model package reference 'G/-1'"),
    ('G/1e3', 'bad model package reference'), ('G/1/2', 'bad model package reference'), ('/1', "model package group ''"),
    ('a_b/1', "model package group 'a_b'"), ('g-/1', "model package group 'g-'"), ('a' * 64 + '/1', 'expected 1 to 63 letters'),
    ('\u00c4/1', "model package group '\u00c4'"), ('mlproj/latest-approved', 'group mlproj has no approved versions'),
    ('mlproj/3', 'model package mlproj/3 does not exist (versions 1 to 2)'), ('other/1', "no model package group 'other'")])
def test_odd_package_references_are_one_line(registry, cli, ref, words):
    for cmd in (('model', 'show', ref), ('model', 'approve', ref, '-m', 'ok'), ('serve', '--model-package', ref, '--port', '0')):
        code, out, err = cli(*cmd)
        assert (code, out) == (2, ''), (cmd, err)
        assert err.count('\n') == 1 and err.startswith('mlproj: error: ') and words in err, (cmd, err)
    assert sorted(p.name for p in registry.root.iterdir()) == ['mlproj']          # refusing wrote nothing (no stray group folder)


def test_approval_descriptions_are_one_bounded_line(registry, cli):
    for m, words in [('ok\n\x1b[31mred', 'control character (U+000A at position 3)'), ('x' * 1_000_000, '1,000,000 characters, over the limit of 1,024'),
                     ('tab\there', 'control character (U+0009')]:
        code, out, err = cli('model', 'approve', 'mlproj/1', '-m', m)
        assert (code, out) == (2, '') and err.count('\n') == 1 and words in err, err
    assert registry.describe('mlproj', 1)['ModelApprovalStatus'] == 'PendingManualApproval'          # nothing changed
    assert cli('model', 'approve', 'mlproj/1', '-m', 'beats the baseline \u2014 reviewed')[0] == 0


def test_a_hand_edited_version_record_is_refused_everywhere(registry, cli):
    v = registry.root/'mlproj'/'2'
    for name, text in [('approvals.json', '[]'), ('approvals.json', '{not json'), ('approvals.json', '[{"ModelApprovalStatus": "Approved"}]'),
                       ('package.json', '{}')]:
        keep = (v/name).read_text()
        (v/name).write_text(text)
        for cmd in (('model', 'show', 'mlproj/2'), ('model', 'approve', 'mlproj/2', '-m', 'x'), ('model', 'list'),
                    ('serve', '--model-package', 'mlproj/latest', '--port', '0')):
            code, out, err = cli(*cmd)
            assert code == 2 and err.count('\n') == 1 and 'model package mlproj/2: ' in err and 'cannot be used' in err, (name, text, cmd, err)
        (v/name).write_text(keep)
    (registry.root/'mlproj'/'03').mkdir()                   # not a version folder: ignored, not read as version 3
    assert registry.versions('mlproj') == [1, 2]


def test_two_approvals_racing(registry, tmp_path):
    "Two `mlproj model approve` at once: one approves, the other is told it already is; the history holds one approval."
    go = tmp_path/'go'
    script = ('import sys, time, pathlib\nfrom mlproj.cli import main\n'
              'while not pathlib.Path(sys.argv[1]).exists(): time.sleep(0.001)\n'
              'sys.exit(main(["model", "approve", "mlproj/1", "-m", sys.argv[2]]))\n')
    env = {**os.environ, 'MLPROJ_OUTPUTS': str(tmp_path/'outputs')}
    procs = [subprocess.Popen([sys.executable, '-c', script, str(go), f'reviewer {i}'], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in (1, 2)]
    import time; time.sleep(1.5); go.touch()
    results = sorted((p.wait(120), p.stderr.read()) for p in procs)
    assert [c for c, _ in results] == [0, 2], results
    assert 'mlproj/1 is already Approved' in results[1][1] and results[1][1].count('\n') == 1
    assert [h['ModelApprovalStatus'] for h in registry.describe('mlproj', 1)['ApprovalHistory']] == ['PendingManualApproval', 'Approved']


# --- captured traffic into the monitor -----------------------------------------------------------------------------------

def test_a_malformed_capture_line_fails_the_monitor_naming_file_and_line(opt_ml_trained, tmp_path):
    hour = tmp_path/'capture'/'ep'/'AllTraffic'/'2026'/'12'/'01'/'17'; hour.mkdir(parents=True)
    rec = {'captureData': {'endpointInput': {'observedContentType': 'text/csv', 'mode': 'INPUT', 'data': ROW.decode(), 'encoding': 'CSV'}},
           'eventMetadata': {'eventId': 'e1', 'inferenceTime': '2026-12-01T17:00:00Z'}, 'eventVersion': '0'}
    (hour/'a.jsonl').write_text(json.dumps(rec) + '\n' + '{"captureData": \n')
    (tmp_path/'none').mkdir()
    r = mlproj(tmp_path, 'job', 'run', 'monitor', '--engine', 'script', '--input', f"model={Path(opt_ml_trained['model']).parent}",
               '--input', f"data={tmp_path/'capture'}", '--input', f"predictions={tmp_path/'none'}")
    assert r.returncode == 1
    d = json.loads(r.stdout)
    assert d['ProcessingJobStatus'] == 'Failed' and 'a.jsonl line 2 is not valid JSON' in d['ExitMessage'], d
    assert not list(tmp_path.glob('mlproj-monitor-*/monitoring/*'))          # no half-written output


@pytest.mark.parametrize('content, words', [
    ('[' * 100_000 + ']' * 100_000 + '\n', 'a.jsonl line 1: JSON nested too deeply to read'),
    ('{"island": "Dream", "island": "Mars"}\n', "a.jsonl line 1: key 'island' appears twice"),
    ('', 'a.jsonl: holds no rows'),
])
def test_capture_files_the_monitor_cannot_read_are_one_line_naming_them(opt_ml_trained, tmp_path, content, words):
    "Deep nesting, a key twice, an empty file: the monitor's job fails naming the file (and line), never a RecursionError or a CSV's words."
    hour = tmp_path/'capture'/'ep'/'AllTraffic'/'2026'/'12'/'01'/'17'; hour.mkdir(parents=True)
    (hour/'a.jsonl').write_text(content)
    (tmp_path/'none').mkdir()
    r = mlproj(tmp_path, 'job', 'run', 'monitor', '--engine', 'script', '--input', f"model={Path(opt_ml_trained['model']).parent}",
               '--input', f"data={tmp_path/'capture'}", '--input', f"predictions={tmp_path/'none'}")
    d = json.loads(r.stdout)
    assert r.returncode == 1 and d['ProcessingJobStatus'] == 'Failed' and words in d['ExitMessage'], d.get('ExitMessage')
    assert 'Traceback' not in r.stderr and 'RecursionError' not in r.stderr
    assert not list(tmp_path.glob('mlproj-monitor-*/monitoring/*'))


# --- the command line around the endpoint -------------------------------------------------------------------------------

def test_serve_refuses_what_it_cannot_honour_before_serving(opt_ml_trained, tmp_path):
    "A capture endpoint name that is a path, a capture folder that is a file, a port in use: one line each, nothing written outside."
    model = opt_ml_trained['model']
    one_line_error(mlproj(tmp_path, 'serve', '--model', model, '--port', '0', '--capture', tmp_path/'cap', '--endpoint-name', '../../escaped'),
                   "endpoint name '../../escaped'")
    assert not (tmp_path/'escaped').exists() and not (tmp_path.parent/'escaped').exists()
    (tmp_path/'afile').write_text('x')
    one_line_error(mlproj(tmp_path, 'serve', '--model', model, '--port', '0', '--capture', tmp_path/'afile'), 'capture folder', 'cannot be created')
    one_line_error(mlproj(tmp_path, 'serve', '--model', model, '--port', '0', '--sampling', 'nan', '--capture', tmp_path/'cap'), 'sampling must be a percentage')
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0)); s.listen()
        one_line_error(mlproj(tmp_path, 'serve', '--model', model, '--port', s.getsockname()[1]), f'cannot listen on 127.0.0.1:{s.getsockname()[1]}')


def test_a_package_made_for_another_mlproj_is_refused(opt_ml_trained, tmp_path):
    pkg = package_with(tmp_path, opt_ml_trained['model'], 'other', replace={'code/requirements.txt': b'./mlproj-9.9.9-py3-none-any.whl\n'})
    one_line_error(mlproj(tmp_path, 'serve', '--model', pkg, '--port', '0'), "asks for mlproj '9.9.9'")


@pytest.mark.parametrize('args, words', [
    (('--max-payload', '101'), 'MaxPayloadInMB is at most 100'), (('--max-payload', '50', '--max-concurrent', '3'), '3 × 50'),
    (('--split-type', 'RecordIO'), 'SplitType RecordIO is not supported locally'), (('--name', 'bad name!'), "TransformJobName: 'bad name!'"),
    (('--join-source', 'Input', '--split-type', 'None'), 'JoinSource Input on CSV needs SplitType Line')])
def test_transform_requests_sagemaker_would_refuse(opt_ml_trained, tmp_path, args, words):
    (tmp_path/'in').mkdir(); (tmp_path/'in'/'a.csv').write_bytes(ROW)
    one_line_error(mlproj(tmp_path, 'transform', 'run', '--model', opt_ml_trained['model'], '--input', tmp_path/'in', '--output', tmp_path/'out', *args), words)
    assert not (tmp_path/'out').exists()


def test_a_request_outliving_the_timeout_is_told_so(opt_ml_trained, tmp_path):
    "A model slower than SAGEMAKER_MODEL_SERVER_TIMEOUT (an entry script that sleeps): a 504 naming the timeout, and the endpoint answers again."
    slow = (b'import time\nfrom mlproj.serve import model_fn, input_fn, output_fn\nfrom mlproj.serve import predict_fn as _predict\n'
            b'def predict_fn(data, model):\n    if len(data.rows) == 2: time.sleep(30)\n    return _predict(data, model)\n')
    pkg = package_with(tmp_path, opt_ml_trained['model'], 'slow', replace={'code/inference.py': slow})
    p, url, err = start_endpoint([MLPROJ, 'serve', '--model', pkg, '--port', '0', '--workers', '1', '--timeout', '3'], tmp_path/'o')
    try:
        u = urlparse(url); at = (u.hostname, u.port)
        refused(*request(at, 'POST', '/invocations', ROW * 2, {'Content-Type': 'text/csv'}), 504, 'did not answer within the model server timeout (3 s')
        import time
        for _ in range(600):                     # the arbiter boots a new worker, which loads the model
            try:
                if request(at, 'POST', '/invocations', ROW, {'Content-Type': 'text/csv'})[0] == 200: break
            except OSError: pass
            time.sleep(0.1)
        else: raise AssertionError('the endpoint did not answer again')
    finally: stop_endpoint(p, err)


def test_serve_package_never_overwrites_the_model_and_takes_a_folder(opt_ml_trained, tmp_path):
    import shutil
    model = tmp_path/'m'/'model.tar.gz'; model.parent.mkdir(); shutil.copy(opt_ml_trained['model'], model)
    before = model.read_bytes()
    one_line_error(mlproj(tmp_path, 'serve', 'package', '--model', model, '--no-wheel', '--dest', model), 'is the model artifact itself')
    assert model.read_bytes() == before and sorted(p.name for p in model.parent.iterdir()) == ['model.tar.gz']
    (tmp_path/'dir').mkdir()
    r = mlproj(tmp_path, 'serve', 'package', '--model', model, '--no-wheel', '--dest', tmp_path/'dir')
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout)['package'] == str(tmp_path/'dir'/'model.tar.gz')
    assert sorted(p.name for p in (tmp_path/'dir').iterdir()) == ['model.tar.gz'] and not list(tmp_path.glob('.*.tmp'))
