"""Confusions, attacks and adversarial training on one tiny SimpleRNN trained once for the module.

    /work/venv/bin/pytest tests/test_adversarial.py

The model (SimpleRNN 64 units, 3 epochs on 2,000 stratified images) reaches about 75% test accuracy, weak
enough to be fast and strong enough that attacks have something to break.
"""

from __future__ import annotations

import os

os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"

import subprocess  # noqa: E402
import sys  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from tuner import adversarial as adv  # noqa: E402
from tuner.data import load, stratified_indices  # noqa: E402
from tuner.models import ModelConfig, build_model, train  # noqa: E402

CONFIG = ModelConfig(cell="SimpleRNN", units=64, learning_rate=0.003)
EPOCHS, BATCH, SEED = 3, 32, 0
EPS = 0.05  # FGSM leaves the plain model about 30% accuracy: room to see an attack or a defence work


@pytest.fixture(scope="module")
def splits():
    return load(subset=2000, validation=True)


@pytest.fixture(scope="module")
def model(splits):
    """The plain model; its training run is the baseline the adversarial training is compared with."""
    m = build_model(CONFIG, seed=SEED)
    train(m, splits, batch_size=BATCH, epochs=EPOCHS, seed=SEED, evaluate_test=False)
    return m


@pytest.fixture(scope="module")
def test_set(splits):
    keep = stratified_indices(splits.y_test, 500, SEED)
    return splits.x_test[keep], splits.y_test[keep]


def _accuracy(model, x, y) -> float:
    return float((model.predict(x, verbose=0).argmax(axis=1) == y).mean())


# --------------------------------------------------------------------------------------------- confusions


def test_confusion_matrix_counts_every_image_once(model, test_set):
    x, y = test_set
    m = adv.confusion_matrix(model, x, y)
    pred = model.predict(x, verbose=0).argmax(axis=1)
    assert m.shape == (10, 10) and np.issubdtype(m.dtype, np.integer)
    assert m.sum() == len(y)
    assert np.trace(m) == int((pred == y).sum())
    assert list(m.sum(axis=1)) == list(np.bincount(y, minlength=10))  # rows are the true digits
    assert list(m.sum(axis=0)) == list(np.bincount(pred, minlength=10))  # columns the predicted ones


def test_most_confused_orders_off_diagonal_cells():
    m = np.zeros((10, 10), dtype=int)
    np.fill_diagonal(m, 100)  # never reported
    m[4, 9], m[9, 4], m[3, 5], m[5, 3], m[7, 1] = 12, 7, 12, 3, 1
    assert adv.most_confused(m, k=10) == [(3, 5, 12), (4, 9, 12), (9, 4, 7), (5, 3, 3), (7, 1, 1)]
    assert adv.most_confused(m, k=2) == [(3, 5, 12), (4, 9, 12)]


def test_most_confused_on_a_real_matrix_matches_its_cells(model, test_set):
    m = adv.confusion_matrix(model, *test_set)
    top = adv.most_confused(m, k=5)
    assert len(top) == 5
    assert [c for _, _, c in top] == sorted((c for _, _, c in top), reverse=True)
    assert all(t != p and m[t, p] == c for t, p, c in top)
    off = m.copy()
    np.fill_diagonal(off, 0)
    assert top[0][2] == off.max()


def test_consistent_pairs_keeps_only_pairs_in_every_top_k():
    a, b, c = (np.zeros((10, 10), dtype=int) for _ in range(3))
    a[4, 9], a[3, 5], a[7, 1] = 10, 8, 6
    b[4, 9], b[3, 5], b[2, 7] = 5, 9, 7
    c[3, 5], c[4, 9], c[7, 1] = 9, 1, 8
    assert adv.consistent_pairs([a, b, c], k=3) == [(3, 5, 26), (4, 9, 16)]
    assert adv.consistent_pairs([a, b, c], k=1) == []
    assert adv.consistent_pairs([a], k=2) == [(4, 9, 10), (3, 5, 8)]


def test_misclassified_are_the_wrong_predictions(model, test_set):
    x, y = test_set
    wrong = adv.misclassified(model, x, y)
    pred = model.predict(x, verbose=0).argmax(axis=1)
    assert len(wrong) == len(y) - np.trace(adv.confusion_matrix(model, x, y))
    assert np.all(pred[wrong] != y[wrong])
    assert np.all(np.delete(pred, wrong) == np.delete(y, wrong))


# --------------------------------------------------------------------------------------------- attacks


def test_untargeted_attacks_lower_accuracy_and_pgd_is_stronger(model, test_set):
    x, y = test_set
    clean = _accuracy(model, x, y)
    fgsm_acc = _accuracy(model, adv.fgsm(model, x, y, EPS), y)
    pgd_acc = _accuracy(model, adv.pgd(model, x, y, EPS, steps=20), y)
    assert clean > 0.6  # the fixture learned something
    assert fgsm_acc < clean - 0.2
    assert pgd_acc <= fgsm_acc


@pytest.mark.parametrize("attack", ["fgsm", "pgd", "pgd_targeted"])
@pytest.mark.parametrize("eps", [0.02, 0.3])
def test_perturbations_stay_in_the_eps_ball_and_unit_range(model, test_set, attack, eps):
    x, y = test_set[0][:200], test_set[1][:200]
    if attack == "fgsm":
        a = adv.fgsm(model, x, y, eps)
    else:
        a = adv.pgd(model, x, y, eps, steps=5, target=0 if attack == "pgd_targeted" else None)
    assert a.shape == x.shape and a.dtype == np.float32
    assert np.abs(a - x).max() <= eps + 1e-6
    assert a.min() >= 0.0 and a.max() <= 1.0
    assert np.abs(a - x).max() >= eps - 1e-6  # the attack moved pixels as far as allowed


def test_targeted_pgd_turns_a_source_class_into_the_target(model, test_set):
    x, y = test_set
    threes = y == 3
    a = adv.pgd(model, x[threes], y[threes], 0.3, steps=40, target=8)
    pred = model.predict(a, verbose=0).argmax(axis=1)
    report = adv.attack_report(model, x[threes], y[threes], a, target=8)
    assert (pred == 8).mean() > 0.5
    assert report["targeted"] and report["success_rate"] > 0.5
    clean_pred = model.predict(x[threes], verbose=0).argmax(axis=1)
    assert report["n_attacked"] == int((clean_pred != 8).sum())


def test_targeted_attack_takes_one_target_per_image(model, test_set):
    x, y = test_set[0][:100], test_set[1][:100]
    target = (y + 1) % 10
    a = adv.pgd(model, x, y, 0.3, steps=40, target=target)
    assert (model.predict(a, verbose=0).argmax(axis=1) == target).mean() > 0.5


def test_pgd_is_reproducible_from_its_seed(model, test_set):
    x, y = test_set[0][:50], test_set[1][:50]
    first, again = adv.pgd(model, x, y, 0.1, steps=3, seed=1), adv.pgd(model, x, y, 0.1, steps=3, seed=1)
    other = adv.pgd(model, x, y, 0.1, steps=3, seed=2)
    assert np.array_equal(first, again)
    assert not np.array_equal(first, other)


def test_attack_report_figures(model, test_set):
    x, y = test_set
    clean_pred = model.predict(x, verbose=0).argmax(axis=1)
    a = adv.fgsm(model, x, y, EPS)
    adv_pred = model.predict(a, verbose=0).argmax(axis=1)
    report = adv.attack_report(model, x, y, a)
    correct = clean_pred == y
    assert report["n"] == len(y) and not report["targeted"]
    assert report["n_attacked"] == int(correct.sum())
    assert report["n_succeeded"] == int((correct & (adv_pred != y)).sum())
    assert report["success_rate"] == pytest.approx(report["n_succeeded"] / report["n_attacked"])
    assert report["clean_accuracy"] == pytest.approx(correct.mean())
    assert report["adversarial_accuracy"] == pytest.approx((adv_pred == y).mean())
    assert 0.1 < report["mean_confidence"] <= 1.0
    assert report["max_perturbation"] == pytest.approx(EPS, abs=1e-6)
    untouched = adv.attack_report(model, x, y, x)  # no perturbation: nothing succeeds
    assert untouched["success_rate"] == 0 and untouched["adversarial_accuracy"] == untouched["clean_accuracy"]


def test_pictures_are_written(model, test_set, tmp_path):
    from matplotlib.image import imread

    x, y = test_set[0][:10], test_set[1][:10]
    a = adv.fgsm(model, x, y, 0.1)
    clean_pred = model.predict(x, verbose=0).argmax(axis=1)
    adv_pred = model.predict(a, verbose=0).argmax(axis=1)
    grid = adv.save_grid_png(tmp_path / "grid.png", x, a, clean_pred, adv_pred, n=8)
    matrix = adv.save_confusion_png(tmp_path / "confusion.png", adv.confusion_matrix(model, x, y))
    for path in (grid, matrix):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    height, width = imread(grid).shape[:2]
    assert width > 2 * height  # eight columns, three rows


def test_importing_the_module_does_not_start_tensorflow():
    code = "import sys, tuner.adversarial; sys.exit('tensorflow' in sys.modules or 'keras' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


# --------------------------------------------------------------------------------------------- training


def test_adversarial_training_logs_and_is_more_robust(model, splits, test_set):
    """Same config, seed, data and epochs as the plain fixture, with half of each batch made by FGSM.

    Measured over seeds 0..2: FGSM accuracy at eps 0.05 rises from 0.21-0.32 to 0.44-0.51 (by 0.12 to 0.24)
    while clean accuracy drops by 3 to 15 points; the assertion asks for a rise of more than 0.05.
    """
    x, y = test_set
    robust = build_model(CONFIG, seed=SEED)
    result = train(adv.make_adversarial_model(robust, EPS, 0.5), splits, batch_size=BATCH, epochs=EPOCHS, seed=SEED)
    assert len(result.epochs) == EPOCHS
    for e in result.epochs:
        assert np.isfinite(e.loss) and 0 < e.accuracy <= 1 and e.val_accuracy is not None
    assert result.epochs[-1].loss < result.epochs[0].loss
    assert result.test_accuracy == pytest.approx(_accuracy(robust, splits.x_test, splits.y_test), abs=1e-6)
    plain_robust = _accuracy(model, adv.fgsm(model, x, y, EPS), y)
    trained_robust = _accuracy(robust, adv.fgsm(robust, x, y, EPS), y)
    assert trained_robust > plain_robust + 0.05


def test_adversarial_fit_accepts_validation_data(splits):
    m = build_model(ModelConfig(units=8), seed=SEED)
    history = adv.make_adversarial_model(m, 0.1, 1.0).fit(
        splits.x_train[:256],
        splits.y_train[:256],
        batch_size=64,
        epochs=1,
        validation_data=(splits.x_val[:64], splits.y_val[:64]),
        verbose=0,
    )
    assert {"loss", "accuracy", "val_loss", "val_accuracy"} <= set(history.history)


def test_share_zero_trains_exactly_like_the_plain_model(splits):
    """With no adversarial images the wrapper must not change training at all: same weights to the bit."""
    x, y = splits.x_train[:512], splits.y_train[:512]
    plain = build_model(ModelConfig(units=8), seed=SEED)
    plain.fit(x, y, batch_size=64, epochs=1, shuffle=False, verbose=0)
    wrapped = build_model(ModelConfig(units=8), seed=SEED)
    adv.make_adversarial_model(wrapped, 0.1, 0.0).fit(x, y, batch_size=64, epochs=1, shuffle=False, verbose=0)
    moved = build_model(ModelConfig(units=8), seed=SEED)
    adv.make_adversarial_model(moved, 0.1, 1.0).fit(x, y, batch_size=64, epochs=1, shuffle=False, verbose=0)
    for a, b in zip(plain.get_weights(), wrapped.get_weights()):
        assert np.array_equal(a, b)
    assert not all(np.array_equal(a, b) for a, b in zip(plain.get_weights(), moved.get_weights()))


# --------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("eps", [0, -0.1, 1.5, float("nan")])
@pytest.mark.parametrize("attack", [adv.fgsm, adv.pgd])
def test_eps_outside_the_unit_interval_is_refused(model, test_set, attack, eps):
    with pytest.raises(ValueError, match=r"eps must be in \(0, 1\]"):
        attack(model, test_set[0][:4], test_set[1][:4], eps)


@pytest.mark.parametrize("target", [10, -1, [3, 3, 12, 3]])
def test_unknown_target_class_is_refused(model, test_set, target):
    with pytest.raises(ValueError, match="unknown target class .*0..9"):
        adv.fgsm(model, test_set[0][:4], test_set[1][:4], 0.1, target=target)


def test_unknown_label_is_refused(model, test_set):
    y = test_set[1][:4].copy()
    y[1] = 11
    with pytest.raises(ValueError, match="unknown label class 11"):
        adv.pgd(model, test_set[0][:4], y, 0.1)
    with pytest.raises(ValueError, match="unknown label class 11"):
        adv.confusion_matrix(model, test_set[0][:4], y)


@pytest.mark.parametrize("share", [-0.1, 1.5])
def test_share_outside_the_unit_interval_is_refused(share):
    m = build_model(ModelConfig(units=4), seed=SEED)
    with pytest.raises(ValueError, match=r"share must be in \[0, 1\]"):
        adv.make_adversarial_model(m, 0.1, share)


def test_adversarial_training_needs_a_compiled_model():
    import keras

    m = keras.Sequential([keras.Input((28, 28)), keras.layers.SimpleRNN(4), keras.layers.Dense(10, "softmax")])
    with pytest.raises(ValueError, match="compile the model before"):
        adv.make_adversarial_model(m, 0.1, 0.5)


def test_adversarial_training_refuses_bad_eps():
    m = build_model(ModelConfig(units=4), seed=SEED)
    with pytest.raises(ValueError, match=r"eps must be in \(0, 1\]"):
        adv.make_adversarial_model(m, 2.0, 0.5)


@pytest.mark.parametrize(
    "call",
    [
        lambda m, x, y: adv.fgsm(m, x, y, 0.1),
        lambda m, x, y: adv.pgd(m, x, y, 0.1),
        lambda m, x, y: adv.confusion_matrix(m, x, y),
        lambda m, x, y: adv.misclassified(m, x, y),
        lambda m, x, y: adv.attack_report(m, x, y, x),
        lambda m, x, y: adv.save_grid_png("unused.png", x, x, y, y),
    ],
)
def test_empty_input_is_refused(model, call):
    with pytest.raises(ValueError, match="no images given"):
        call(model, np.zeros((0, 28, 28), np.float32), np.zeros(0, np.int32))


def test_other_bad_inputs_are_refused(model, test_set):
    x, y = test_set[0][:4], test_set[1][:4]
    with pytest.raises(ValueError, match="x holds 4 images but y has shape"):
        adv.fgsm(model, x, y[:3], 0.1)
    with pytest.raises(ValueError, match=r"pixels must be in \[0, 1\]"):
        adv.fgsm(model, x * 255, y, 0.1)
    with pytest.raises(ValueError, match="one class or one per image"):
        adv.pgd(model, x, y, 0.1, target=[1, 2])
    with pytest.raises(ValueError, match="steps must be an integer >= 1"):
        adv.pgd(model, x, y, 0.1, steps=0)
    with pytest.raises(ValueError, match="no confusion matrices given"):
        adv.consistent_pairs([])
    with pytest.raises(ValueError, match="10x10"):
        adv.most_confused(np.zeros((3, 3)))
