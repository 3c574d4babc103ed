"""The three probes on synthetic features: separable -> ~1, shuffled labels -> chance;
k-NN (whitened and raw) against a brute-force reference written from the definition."""

import numpy as np
import pytest

from stoptool.probe.knn import knn_probe, knn_scores
from stoptool.probe.linear import linear_probe
from stoptool.probe.logreg import logreg_probe
from stoptool.probe.metrics import topk_accuracy

CLASSES = 10


def separable(seed=0, n_train=500, n_test=300, dim=24):
    """Gaussian blobs far apart: linearly separable with a wide margin."""
    rng = np.random.default_rng(seed)
    means = rng.normal(0, 1, (CLASSES, dim)) * 6
    def draw(n):
        y = rng.integers(0, CLASSES, n)
        return (means[y] + rng.normal(0, 1, (n, dim)) + 3.0).astype(np.float32), y
    return (*draw(n_train), *draw(n_test))


def run(method, *data, **kw):
    if method == "logreg":
        return logreg_probe(*data, CLASSES)
    if method == "linear":
        return linear_probe(*data, CLASSES, min_steps=300, **kw)
    return knn_probe(*data, CLASSES)


@pytest.mark.parametrize("method", ["logreg", "linear", "knn"])
def test_separable_features_are_learned(method):
    res = run(method, *separable())
    assert res["top1"] >= 0.99
    assert res["top5"] >= res["top1"]


@pytest.mark.parametrize("method", ["logreg", "linear", "knn"])
def test_shuffled_labels_give_chance(method):
    x_tr, y_tr, x_te, y_te = separable(seed=1, n_test=2000)
    rng = np.random.default_rng(2)
    # labels drawn independently of the features, for training and test alike
    res = run(method, x_tr, rng.permutation(y_tr), x_te, rng.permutation(y_te))
    assert abs(res["top1"] - 1 / CLASSES) < 0.04  # std of chance here is about 0.007
    assert abs(res["top5"] - 5 / CLASSES) < 0.06


def test_top5_only_with_more_than_five_classes():
    x_tr, y_tr, x_te, y_te = separable()
    keep_tr, keep_te = y_tr < 5, y_te < 5
    res = logreg_probe(x_tr[keep_tr], y_tr[keep_tr], x_te[keep_te], y_te[keep_te], 5)
    assert res["top5"] is None and res["top1"] >= 0.99


def test_logreg_picks_c_on_held_out_training_data():
    res = logreg_probe(*separable(), CLASSES)
    grid = res["params"]["held_out_accuracy"]
    assert len(grid) >= 4 and res["params"]["C"] in {float(c) for c in grid}
    assert grid[str(res["params"]["C"])] == max(grid.values())


def test_linear_probe_is_repeatable():
    data = separable(seed=3)
    x_tr, y_tr, x_te, y_te = data
    y_tr = np.random.default_rng(0).permutation(y_tr)  # a hard problem, so results vary with the seed
    a = linear_probe(x_tr, y_tr, x_te, y_te, CLASSES, seed=5, min_steps=100)
    b = linear_probe(x_tr, y_tr, x_te, y_te, CLASSES, seed=5, min_steps=100)
    assert a["top1"] == b["top1"]


def test_features_too_large_for_the_gpu_are_sent_a_minibatch_at_a_time(monkeypatch):
    """The path for features over half the GPU's free memory trains the same classifier as
    the path that moves them whole (run here on the CPU, where both apply)."""
    import torch

    from stoptool.probe import linear

    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (1000, 4000))
    gpu = torch.device("cuda", 0)
    assert linear.fits_on(gpu, 500) and not linear.fits_on(gpu, 501)
    assert linear.fits_on(torch.device("cpu"), 10**15)
    data = separable(seed=4)
    whole = linear_probe(*data, CLASSES, seed=2, min_steps=60)
    monkeypatch.setattr(linear, "fits_on", lambda device, nbytes: False)
    streamed = linear_probe(*data, CLASSES, seed=2, min_steps=60)
    assert streamed["top1"] == whole["top1"] and streamed["top5"] == whole["top5"]


def whiten_by_definition(x_train, x_test, eps=1e-3):
    """PCA whitening by the training split, from its singular value decomposition (the code
    under test uses the covariance's eigenvectors): minus the mean, each principal direction
    over its standard deviation plus eps × the largest."""
    x_train, x_test = np.asarray(x_train, np.float64), np.asarray(x_test, np.float64)
    mean = x_train.mean(0)
    _, s, vt = np.linalg.svd(x_train - mean, full_matrices=False)
    std = s / np.sqrt(len(x_train))
    w = vt.T / (std + eps * std[0])
    return (x_train - mean) @ w, (x_test - mean) @ w


def brute_force_knn(x_train, y_train, x_test, k, temperature, classes):
    """One test image at a time, in plain Python, straight from the definition."""
    out = np.zeros((len(x_test), classes))
    for i, q in enumerate(x_test):
        sims = [float(np.dot(q, t) / (np.linalg.norm(q) * np.linalg.norm(t))) for t in x_train]
        for j in sorted(range(len(sims)), key=lambda j: -sims[j])[:k]:
            out[i, y_train[j]] += np.exp(sims[j] / temperature)
    return out


def correlated(seed, n_train=120, n_test=40, dim=8, classes=7):
    """Features with correlated dimensions of very unequal variance around a shared offset."""
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(dim, dim)) * np.logspace(0, -3, dim)[:, None]
    x_tr = (rng.normal(size=(n_train, dim)) @ mix + 5.0).astype(np.float32)
    x_te = (rng.normal(size=(n_test, dim)) @ mix + 5.0).astype(np.float32)
    return x_tr, rng.integers(0, classes, n_train), x_te, rng.integers(0, classes, n_test)


def test_raw_knn_is_dinos_weighted_vote():
    """features="raw": cosine on the features as they come, k = 20 neighbours each voting
    exp(cos / 0.07) for its class (DINO's k-NN), computed one image at a time in plain Python."""
    x_tr, y_tr, x_te, y_te = correlated(4)
    fast = knn_scores(x_tr, y_tr, x_te, 7, k=20, temperature=0.07, features="raw", chunk=16)
    ref = brute_force_knn(x_tr, y_tr, x_te, 20, 0.07, 7)
    np.testing.assert_allclose(fast, ref, rtol=1e-4)
    res = knn_probe(x_tr, y_tr, x_te, y_te, 7, features="raw")
    assert res["top1"] == topk_accuracy(ref, y_te, 1) and res["top5"] == topk_accuracy(ref, y_te, 5)
    assert res["params"] == {"k": 20, "temperature": 0.07, "features": "raw"}


def test_whitened_knn_is_the_same_vote_on_pca_whitened_features():
    x_tr, y_tr, x_te, y_te = correlated(4)
    fast = knn_scores(x_tr, y_tr, x_te, 7, k=20, temperature=0.07, chunk=16)  # the default
    w_tr, w_te = whiten_by_definition(x_tr, x_te)
    ref = brute_force_knn(w_tr, y_tr, w_te, 20, 0.07, 7)
    np.testing.assert_allclose(fast, ref, rtol=1e-4)
    res = knn_probe(x_tr, y_tr, x_te, y_te, 7)
    assert res["top1"] == topk_accuracy(ref, y_te, 1) and res["top5"] == topk_accuracy(ref, y_te, 5)
    assert res["params"] == {"k": 20, "temperature": 0.07, "features": "whitened"}


def _shift(x, rng):
    return x + rng.normal(size=x.shape[1]) * 40.0  # one vector added to every feature


def _rotate(x, rng):
    return x @ np.linalg.qr(rng.normal(size=(x.shape[1], x.shape[1])))[0]


def _scale(x, rng):
    return x * 7.0


def _stretch(x, rng):
    return x * rng.uniform(0.3, 3.0, x.shape[1])  # each dimension by its own factor


@pytest.mark.parametrize("move, exact, raw_too", [
    (_shift, True, False), (_rotate, True, True), (_scale, True, True), (_stretch, False, False)])
def test_whitened_knn_predictions_survive_moving_every_feature_alike(move, exact, raw_too):
    """Adding one vector to every feature, rotating or scaling them all leaves the whitened
    k-NN's votes as they were; scaling each dimension by its own factor, its predictions (the
    votes move a little: the ridge is a share of the largest direction). The raw cosine is
    unmoved only by rotations and a common scale."""
    x_tr, y_tr, x_te, _ = separable(seed=5, n_train=300, n_test=100, dim=12)
    rng = np.random.default_rng(6)
    moved = move(np.vstack([x_tr, x_te]).astype(np.float64), rng).astype(np.float32)
    m_tr, m_te = moved[: len(x_tr)], moved[len(x_tr):]
    a = knn_scores(x_tr, y_tr, x_te, CLASSES)
    b = knn_scores(m_tr, y_tr, m_te, CLASSES)
    assert (a.argmax(1) == b.argmax(1)).all()
    if exact:
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-3)
    raw_a = knn_scores(x_tr, y_tr, x_te, CLASSES, features="raw")
    raw_b = knn_scores(m_tr, y_tr, m_te, CLASSES, features="raw")
    assert np.allclose(raw_a, raw_b, rtol=1e-3, atol=1e-3) == raw_too


def test_whitened_knn_finds_the_class_where_a_few_large_directions_hide_it():
    """Features as an average-pooled encoder can give: a large mean shared by every image and
    two directions of large variance that carry no class, the class in small directions. The
    raw cosine sees the large directions and lands near chance; whitened, it finds the class."""
    rng = np.random.default_rng(7)
    means = rng.normal(0, 1, (CLASSES, 10))

    def draw(n):
        y = rng.integers(0, CLASSES, n)
        small = 0.05 * (means[y] + 0.3 * rng.normal(size=(n, 10)))  # the class, at a 20th of the scale
        large = rng.normal(size=(n, 2)) * 3.0  # no class in it
        return (np.hstack([small, large]) + 20.0).astype(np.float32), y

    (x_tr, y_tr), (x_te, y_te) = draw(600), draw(300)
    raw = knn_probe(x_tr, y_tr, x_te, y_te, CLASSES, features="raw")["top1"]
    whitened = knn_probe(x_tr, y_tr, x_te, y_te, CLASSES)["top1"]
    assert raw < 0.3 and whitened > 0.9, (raw, whitened)


def test_topk_accuracy():
    scores = np.array([[0.1, 0.7, 0.2], [0.5, 0.3, 0.2], [0.2, 0.3, 0.5]])
    y = np.array([1, 1, 0])
    assert topk_accuracy(scores, y, 1) == pytest.approx(1 / 3)
    assert topk_accuracy(scores, y, 2) == pytest.approx(2 / 3)
    assert topk_accuracy(scores, y, 3) == 1.0


def test_logreg_standardizes_features():
    """Scaling the features (as a different encoder width or norm would) changes nothing."""
    x_train, y_train, x_test, y_test = separable(seed=3)
    plain = logreg_probe(x_train, y_train, x_test, y_test, CLASSES)
    scaled = logreg_probe(x_train * 1e4, y_train, x_test * 1e4, y_test, CLASSES)
    assert scaled["top1"] == plain["top1"] and scaled["params"] == plain["params"]


@pytest.mark.parametrize("num_classes", [2, 10])  # two classes present, of two or of ten
def test_logreg_with_two_classes_agrees_with_sklearn(num_classes):
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(0)
    y_train, y_test = rng.integers(0, 2, 200), rng.integers(0, 2, 100)
    x_train = (y_train[:, None] * 1.0 + rng.normal(0, 1, (200, 5))).astype(np.float32)  # overlapping
    x_test = (y_test[:, None] * 1.0 + rng.normal(0, 1, (100, 5))).astype(np.float32)
    res = logreg_probe(x_train, y_train, x_test, y_test, num_classes)
    scaler = StandardScaler().fit(x_train)
    clf = LogisticRegression(C=res["params"]["C"], max_iter=1000, tol=1e-4)
    clf.fit(scaler.transform(x_train), y_train)
    expected = float((clf.predict(scaler.transform(x_test)) == y_test).mean())
    assert 0.6 < expected < 1.0 and res["top1"] == pytest.approx(expected)
