"""tuner.recurrent's layers compute what Keras's do: same weights, outputs, gradients and dropout, and load back."""

import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from tuner import recurrent
from tuner.models import ModelConfig, build_model

RNG = np.random.default_rng(0)
X = RNG.random((16, 28, 28), dtype=np.float32)
Y = RNG.integers(0, 10, 16)


def _model(module, cell: str, *, layers: int = 1, dropout: float = 0.0, **kw):
    keras.utils.set_random_seed(1)
    recurrent_layers = [
        getattr(module, cell)(6, return_sequences=i < layers - 1, dropout=dropout, **kw) for i in range(layers)
    ]
    for layer in recurrent_layers:
        layer.fused = True  # LSTM's is off until tuner.models chooses it (test_models.py)
    return keras.Sequential([keras.Input((28, 28)), *recurrent_layers, keras.layers.Dense(10, activation="softmax")])


def _forward_backward(model, *, training: bool):
    keras.utils.set_random_seed(5)  # the same dropout draws for both models
    x = tf.constant(X)
    with tf.GradientTape() as tape:
        tape.watch(x)
        out = model(x, training=training)
        loss = keras.losses.SparseCategoricalCrossentropy()(Y, out)
    grads = tape.gradient(loss, [*model.trainable_weights, x])  # the input's gradient: adversarial training's FGSM
    return out.numpy(), [g.numpy() for g in grads]


@pytest.fixture
def calls(monkeypatch):
    """How often each fused recurrence ran."""
    counted = {"_simple": 0, "_gru": 0, "_lstm": 0}
    for name in counted:
        original = getattr(recurrent, name)

        def counting(*args, _name=name, _original=original):
            counted[_name] += 1
            return _original(*args)

        monkeypatch.setattr(recurrent, name, counting)
    return counted


FUSED = {"SimpleRNN": "_simple", "GRU": "_gru", "LSTM": "_lstm"}


@pytest.mark.parametrize("cell", ["SimpleRNN", "GRU", "LSTM"])
@pytest.mark.parametrize(("layers", "dropout"), [(1, 0.0), (2, 0.3)])
def test_same_function_and_gradients_as_keras(cell, layers, dropout, calls):
    ours = _model(recurrent, cell, layers=layers, dropout=dropout)
    theirs = _model(keras.layers, cell, layers=layers, dropout=dropout)
    assert [w.path.split("/")[-1] for w in ours.weights] == [w.path.split("/")[-1] for w in theirs.weights]
    for a, b in zip(ours.weights, theirs.weights, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    out, grads = _forward_backward(ours, training=True)
    want_out, want_grads = _forward_backward(theirs, training=True)
    assert calls[FUSED[cell]] == layers  # the fused path ran, not Keras's loop
    np.testing.assert_allclose(out, want_out, rtol=1e-5, atol=1e-6)
    for g, want in zip(grads, want_grads, strict=True):
        np.testing.assert_allclose(g, want, rtol=1e-4, atol=1e-6 * np.abs(want).max())
    if dropout:  # inference drops nothing, in both
        np.testing.assert_allclose(ours(X).numpy(), theirs(X).numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cell", ["SimpleRNN", "GRU", "LSTM"])
def test_a_one_step_sequence(cell):
    """No step before the last: the recurrent kernel's gradient is zero, as Keras's."""
    x = tf.constant(X[:, :1, :])
    grads = []
    for module in (recurrent, keras.layers):
        keras.utils.set_random_seed(1)
        layer = getattr(module, cell)(6)
        layer.fused = True  # LSTM's is off until tuner.models chooses it
        model = keras.Sequential([keras.Input((1, 28)), layer, keras.layers.Dense(10)])
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(model(x, training=True) ** 2)
        grads.append([g.numpy() for g in tape.gradient(loss, model.trainable_weights)])
    for g, want in zip(*grads, strict=True):
        assert g.shape == want.shape
        np.testing.assert_allclose(g, want, rtol=1e-4, atol=1e-6)
    assert grads[0][1].ndim == 2 and not np.any(grads[0][1])  # the recurrent kernel's


@pytest.mark.parametrize("cell", ["SimpleRNN", "GRU", "LSTM"])
def test_without_bias(cell, calls):
    ours, theirs = _model(recurrent, cell, use_bias=False), _model(keras.layers, cell, use_bias=False)
    out, grads = _forward_backward(ours, training=True)
    want_out, want_grads = _forward_backward(theirs, training=True)
    assert calls[FUSED[cell]] == 1  # the fused path ran, not Keras's loop
    np.testing.assert_allclose(out, want_out, rtol=1e-5, atol=1e-6)
    for g, want in zip(grads, want_grads, strict=True):
        np.testing.assert_allclose(g, want, rtol=1e-4, atol=1e-6 * np.abs(want).max())


def test_inference_and_uncovered_settings_run_keras_loop(calls):
    """Inference, a given initial state or going backwards run Keras's own loop, and give Keras's figures."""
    keras.utils.set_random_seed(1)
    ours, theirs = recurrent.GRU(5, go_backwards=True), keras.layers.GRU(5, go_backwards=True)
    plain = recurrent.GRU(5)
    x = tf.constant(X)
    for layer in (ours, theirs, plain):
        layer.build(x.shape)
    theirs.set_weights(ours.get_weights())
    np.testing.assert_allclose(ours(x, training=True).numpy(), theirs(x, training=True).numpy(), rtol=1e-6)
    state = [tf.ones((16, 5))]
    np.testing.assert_allclose(
        ours(x, initial_state=state, training=True).numpy(), theirs(x, initial_state=state).numpy(), rtol=1e-6
    )
    plain(x, training=False)
    assert calls["_gru"] == 0
    plain(x, training=True)
    assert calls["_gru"] == 1


def test_build_model_uses_the_fused_layers_and_they_load_back(tmp_path, calls):
    for cell in ("SimpleRNN", "LSTM", "GRU"):
        model = build_model(ModelConfig(cell=cell, units=8, layers=2), seed=0)
        expected = getattr(recurrent, cell)
        assert [type(layer) for layer in model.layers[:2]] == [expected, expected]
        model.train_on_batch(X, Y)
        path = tmp_path / f"{cell}.keras"
        model.save(path)
        loaded = keras.models.load_model(path)
        assert type(loaded.layers[0]) is expected
        np.testing.assert_array_equal(loaded.predict(X, verbose=0), model.predict(X, verbose=0))
    assert calls == {"_simple": 2, "_gru": 2, "_lstm": 0}  # one train step traced, two layers each; LSTM's: not
    # chosen (test_models.py)


def test_a_fresh_process_loads_a_saved_model(tmp_path):
    """`tuner confusions` and `tuner attack` load the best model in a process that built none."""
    import optuna

    from tuner import artifacts

    model = build_model(ModelConfig(cell="GRU", units=8), seed=0)
    store = optuna.artifacts.FileSystemArtifactStore(str(tmp_path))
    db = f"sqlite:///{tmp_path / 's.db'}"
    study = optuna.create_study(study_name="s", storage=db)
    trial = study.ask()
    artifacts.save_model(trial, model, store)
    study.tell(trial, 0.5)
    np.save(tmp_path / "x.npy", X)
    code = (
        "import sys, numpy as np, optuna, optuna.artifacts as a\n"
        "from tuner import artifacts\n"
        "t = optuna.load_study(study_name='s', storage=sys.argv[1]).trials[0]\n"
        "m = artifacts.load_model(t, a.FileSystemArtifactStore(sys.argv[2]))\n"
        "np.save(sys.argv[3], m.predict(np.load(sys.argv[4]), verbose=0))\n"
        "print(type(m.layers[0]).__module__)\n"
    )
    paths = [str(tmp_path), str(tmp_path / "p.npy"), str(tmp_path / "x.npy")]
    out = subprocess.run([sys.executable, "-c", code, db, *paths], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "tuner.recurrent"
    # the same weights; another process may round its float sums differently (3e-8 seen)
    np.testing.assert_allclose(np.load(tmp_path / "p.npy"), model.predict(X, verbose=0), rtol=1e-5, atol=1e-7)
