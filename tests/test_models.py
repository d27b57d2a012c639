"""The training path's input pipeline and reproducibility (tuner.models)."""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from tuner import data, models


def _epochs(dataset, n_batches: int) -> list[list[np.ndarray]]:
    """The labels of every batch, split into epochs of `n_batches`."""
    labels = [y.numpy() for _, y in dataset]
    return [labels[i : i + n_batches] for i in range(0, len(labels), n_batches)]


def test_batches_reshuffle_every_epoch_and_repeat_across_runs():
    x = np.arange(10, dtype=np.float32).reshape(10, 1)
    y = np.arange(10, dtype=np.int32)
    dataset = models.batches(x, y, batch_size=4, epochs=3, seed=7)
    epochs = _epochs(dataset, n_batches=3)
    assert len(epochs) == 3
    for batches in epochs:
        assert [len(b) for b in batches] == [4, 4, 2]  # Keras's sizes: full batches, then the partial one
        assert sorted(np.concatenate(batches).tolist()) == list(range(10))  # every row once an epoch
    orders = [np.concatenate(b).tolist() for b in epochs]
    assert len({tuple(o) for o in orders}) == 3, "every epoch must be a new permutation"
    again = [np.concatenate(b).tolist() for b in _epochs(models.batches(x, y, batch_size=4, epochs=3, seed=7), 3)]
    assert again == orders  # the same seed, the same batches
    other = [np.concatenate(b).tolist() for b in _epochs(models.batches(x, y, batch_size=4, epochs=3, seed=8), 3)]
    assert other != orders
    for xb, yb in models.batches(x, y, batch_size=4, seed=7):  # rows stay paired with their labels
        assert xb.numpy()[:, 0].tolist() == yb.numpy().tolist()


def test_batches_without_seed_keep_the_arrays_order_with_autotuning_off():
    x = np.zeros((5, 2), dtype=np.float32)
    y = np.arange(5, dtype=np.int32)
    dataset = models.batches(x, y, batch_size=2)
    assert [b.numpy().tolist() for _, b in dataset] == [[0, 1], [2, 3], [4]]
    # tf.data's autotuning thread made the next epoch's start wait 1-4 s (tuner.models.batches)
    assert dataset.options().autotune.enabled is False


def test_training_is_reproducible_and_reshuffles():
    splits = data.load(subset=600, validation=True)

    def run():
        model = models.build_model(models.ModelConfig(cell="GRU", units=8), seed=3)
        return models.train(model, splits, batch_size=64, epochs=2, seed=3).history()

    first, second = run(), run()
    drop = ("seconds",)
    assert [{k: v for k, v in e.items() if k not in drop} for e in first] == [
        {k: v for k, v in e.items() if k not in drop} for e in second
    ]
    assert all(e["val_accuracy"] is not None for e in first)


def test_training_arrays_become_one_constant_kept_while_the_array_lives():
    import gc

    x = np.arange(12, dtype=np.float32).reshape(3, 2, 2)
    first = models._constant(x)
    assert models._constant(x) is first  # made once, whatever the number of trials
    np.testing.assert_array_equal(first.numpy(), x)
    key = id(x)
    del x
    gc.collect()
    assert key not in models._CONSTANTS


def _train_step_traces(model, splits, **fit) -> int:
    """How many times fitting `model` traces its train step (Python runs `train_step` once per trace)."""
    traced = []
    step = model.train_step
    model.train_step = lambda data: traced.append(1) or step(data)
    models.train(model, splits, evaluate_test=False, **fit)
    return len(traced)


def test_the_train_step_is_traced_once_per_model():
    import keras

    splits = data.load(subset=300)
    model = models.build_model(models.ModelConfig(cell="LSTM", units=4), seed=0)
    assert _train_step_traces(model, splits, batch_size=64, epochs=2, seed=0) == 1
    from tuner.adversarial import make_adversarial_model

    adversarial = make_adversarial_model(models.build_model(models.ModelConfig(cell="GRU", units=4), seed=0), 0.1)
    assert _train_step_traces(adversarial, splits, batch_size=64, epochs=1, seed=0) == 1
    # what the build saves: the same model compiled without it is traced twice (Keras creates the optimizer's
    # slots in the first trace, and TensorFlow traces again once variables were made)
    keras.backend.clear_session()
    plain = keras.Sequential([keras.Input((28, 28)), keras.layers.LSTM(4), keras.layers.Dense(10)])
    plain.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    assert _train_step_traces(plain, splits, batch_size=64, epochs=2, seed=0) == 2


def test_a_worker_makes_its_data_constants_before_its_first_trial():
    from tuner.objective import make_objective
    from tuner.spec import parse

    loaded = data.load(subset=300, validation=True)  # copied: arrays no other test has trained on
    splits = data.Splits(*(a.copy() if isinstance(a, np.ndarray) else a for a in dataclasses.astuple(loaded)))
    assert not any(id(a) in models._CONSTANTS for a in (splits.x_train, splits.x_test))
    make_objective(parse({"study": {"kind": "grid"}, "grid": {"units": [8]}}), splits)
    for array in (splits.x_train, splits.y_train, splits.x_val, splits.y_val, splits.x_test, splits.y_test):
        assert id(array) in models._CONSTANTS


def test_a_keras_whose_private_build_differs_still_trains(monkeypatch):
    import keras

    def other_signature(self, iterator):  # what a later Keras might take instead
        raise AssertionError("not reached: the call with data_batch fails first")

    monkeypatch.setattr(keras.Model, "_symbolic_build", other_signature, raising=False)
    model = models.build_model(models.ModelConfig(cell="SimpleRNN", units=4), seed=0)
    result = models.train(model, data.load(subset=300), batch_size=64, epochs=1, seed=0, evaluate_test=False)
    assert len(result.epochs) == 1 and math.isfinite(result.epochs[0].loss)
