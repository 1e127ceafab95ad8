"""Seeds decide everything: the same seeds give byte-identical artifacts in two separate runs (two processes, two
roots); a different seed changes what it seeds, and only that."""
import tarfile, hashlib
from concurrent.futures import ThreadPoolExecutor
import pytest

N_EST = 30


def _chain(tree, penguins, split_seed=42, train_seed=42, split_from=None):
    "preprocess (or reuse `split_from`'s training split) + train + batch_inference in `tree`."
    if split_from is None:
        tree.stage('raw', penguins)
        tree.run_ok('preprocess', '--seed', split_seed)
        tree.promote('train')
    else:
        tree.stage('train', split_from.output('train') / 'train-algo-1.csv')
    tree.run_ok('train', '--seed', train_seed, '--n_estimators', N_EST)
    tree.promote('model')
    tree.stage('data', penguins)
    tree.run_ok('batch_inference')
    return tree


@pytest.fixture(scope='module')
def opt_ml_repro_runs(opt_ml_build_once, opt_ml_tree_factory, opt_ml_penguins):
    "a, b: same seeds in two roots; train_seed: a's split, another forest seed; split_seed: preprocess only, another seed."
    names = ('a', 'b', 'train_seed', 'split_seed')
    def make(base):
        a, b, c, d = (opt_ml_tree_factory(base / n) for n in names)
        def split_only(t):
            t.stage('raw', opt_ml_penguins); t.run_ok('preprocess', '--seed', 7)
        # the independent chains run at the same time (each step still its own process, each chain its own root);
        # the train_seed chain reuses a's split, so it starts once a is done
        with ThreadPoolExecutor(3) as pool:
            fa, fb, fd = pool.submit(_chain, a, opt_ml_penguins), pool.submit(_chain, b, opt_ml_penguins), pool.submit(split_only, d)
            fa.result()
            fc = pool.submit(_chain, c, opt_ml_penguins, train_seed=7, split_from=a)
            for f in (fb, fc, fd): f.result()
    base = opt_ml_build_once('opt_ml_repro_runs', make)      # once per session, even when the tests below land on two workers
    runs = {n: opt_ml_tree_factory(base / n) for n in names}
    assert runs['a'].root != runs['b'].root
    return runs


def _model(t): return t.output('model') / 'model.tar.gz'
def _pred(t): return t.output('predictions') / 'predictions-algo-1.csv'

def _model_file_sha(t):
    with tarfile.open(_model(t), 'r:gz') as tar: return hashlib.sha256(tar.extractfile('model.skops').read()).hexdigest()

def _probas(t):
    _, rows = t.read_csv(_pred(t))
    return [tuple(r[k] for k in r if k.startswith('proba_')) for r in rows]

def _test_ids(t):
    return [r['penguin_id'] for r in t.read_csv(t.output('test') / 'test-algo-1.csv')[1]]


def test_same_seed_same_split(opt_ml_repro_runs):
    a, b = opt_ml_repro_runs['a'], opt_ml_repro_runs['b']
    for name in ('train', 'test'):
        fa, fb = a.output(name) / f'{name}-algo-1.csv', b.output(name) / f'{name}-algo-1.csv'
        assert fa.read_bytes() == fb.read_bytes(), name


def test_same_seed_same_model_bytes(opt_ml_repro_runs):
    a, b = opt_ml_repro_runs['a'], opt_ml_repro_runs['b']
    assert a.sha256(_model(a)) == b.sha256(_model(b))


def test_same_seed_same_predictions_bytes(opt_ml_repro_runs):
    a, b = opt_ml_repro_runs['a'], opt_ml_repro_runs['b']
    assert _pred(a).read_bytes() == _pred(b).read_bytes()
    assert len(_probas(a)) == 344


def test_train_seed_changes_model_and_probabilities(opt_ml_repro_runs):
    a, c = opt_ml_repro_runs['a'], opt_ml_repro_runs['train_seed']
    assert a.sha256(_model(a)) != c.sha256(_model(c))
    # not only the manifest (which records the seed): the fitted forest itself differs
    assert _model_file_sha(a) != _model_file_sha(c)
    pa, pc = _probas(a), _probas(c)
    assert len(pa) == len(pc) == 344
    assert pa != pc, 'another forest seed gave the very same probabilities'
    # same rows scored, in the same order
    ids = lambda t: [r['penguin_id'] for r in t.read_csv(_pred(t))[1]]
    assert ids(a) == ids(c)


def test_split_seed_changes_split(opt_ml_repro_runs):
    a, d = opt_ml_repro_runs['a'], opt_ml_repro_runs['split_seed']
    ta, td = _test_ids(a), _test_ids(d)
    assert set(ta) != set(td), 'another split seed held out the very same rows'
    # still a stratified split of the same shape
    count = lambda t: sorted((r['species'] for r in t.read_csv(t.output('test') / 'test-algo-1.csv')[1]))
    assert len(ta) == len(td)
    assert count(a) == count(d)
