"""The training path's input pipeline and reproducibility (tuner.models)."""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import platform
import subprocess
import sys

import numpy as np
import pytest

from tuner import data, models


def _epochs(batches: models.EpochBatches, n: int) -> list[list[np.ndarray]]:
    """The labels of every batch of `n` passes, each pass after selecting its epoch."""
    passes = []
    for epoch in range(n):
        batches.select(epoch)
        passes.append([y.numpy() for _, y in batches.dataset])
    return passes


def test_batches_reshuffle_every_epoch_and_repeat_across_runs():
    x = np.arange(10, dtype=np.float32).reshape(10, 1)
    y = np.arange(10, dtype=np.int32)
    epochs = _epochs(models.batches(x, y, batch_size=4, epochs=3, seed=7), 3)
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
    # numpy's generator draws the epochs' permutations in turn, as before passes ended at the epoch's end
    rng = np.random.default_rng(7)
    assert orders == [rng.permutation(10).tolist() for _ in range(3)]
    for xb, yb in models.batches(x, y, batch_size=4, seed=7).dataset:  # rows stay paired with their labels
        assert xb.numpy()[:, 0].tolist() == yb.numpy().tolist()


def test_batches_without_seed_keep_the_arrays_order_with_autotuning_off():
    x = np.zeros((5, 2), dtype=np.float32)
    y = np.arange(5, dtype=np.int32)
    dataset = models.batches(x, y, batch_size=2).dataset
    assert [b.numpy().tolist() for _, b in dataset] == [[0, 1], [2, 3], [4]]
    # tf.data's autotuning thread made the next epoch's start wait 1-4 s (tuner.models.batches)
    assert dataset.options().autotune.enabled is False


def test_several_steps_per_call_compute_what_one_step_per_call_does():
    """Keras runs `STEPS_PER_EXECUTION` train steps per call; each call ends at its epoch's end, so the figures
    (and the last batch's accuracy, which now comes from the graph) are those of one step per call."""
    import sys
    from pathlib import Path

    splits = data.load(subset=600, validation=True)  # 600 images in batches of 64: 10 steps, calls of 8 and 2
    assert models.STEPS_PER_EXECUTION == 8
    bench = str(Path(__file__).resolve().parents[1] / "bench")
    sys.path.insert(0, bench)
    try:  # how tuner took it before (the benchmarks still do, for Keras's own models)
        from train_speed import last_batch_from_running_means
    finally:
        sys.path.remove(bench)
    old_way = last_batch_from_running_means()(models.FitResult(), batch_size=64, n_train=600)

    def fit(steps_per_execution: int, callbacks=()) -> tuple[models.FitResult, int]:
        model = models.build_model(models.ModelConfig(cell="GRU", units=8), seed=4)
        model.steps_per_execution = steps_per_execution  # read when the train step is traced, in `fit`
        calls = []
        train_function = model.make_train_function() or model.train_function
        model.train_function = lambda iterator: calls.append(1) or train_function(iterator)
        return models.train(model, splits, batch_size=64, epochs=3, seed=4, callbacks=callbacks), len(calls)

    several, several_calls = fit(8)
    one, one_calls = fit(1, [old_way])
    assert (several_calls, one_calls) == (3 * 2, 3 * 10)
    assert _figures(several) == _figures(one)
    assert [e.last_batch_accuracy for e in several.epochs] == [e.last_batch_accuracy for e in old_way.result.epochs]
    assert all(round(e.last_batch_accuracy * 24, 6).is_integer() for e in several.epochs)  # a count of 24


def test_a_model_loops_over_steps_only_if_its_first_trial_is_long_enough():
    """Tracing the loop of steps costs a new model more than it saves on short trials (models.LOOP_FROM_STEPS);
    the choice is made before anything is traced and kept, since Keras reads it when tracing and when counting."""
    from tuner.adversarial import make_adversarial_model

    splits = data.load(subset=300)  # batches of 64: 5 steps an epoch
    assert models.LOOP_FROM_STEPS == 400
    model = models.build_model(models.ModelConfig(units=2), seed=0)
    assert model.steps_per_execution == 1  # as compiled
    models.train(model, splits, batch_size=64, epochs=2, seed=0, evaluate_test=False)  # 10 steps
    assert model.steps_per_execution == 1
    models.train(model, splits, batch_size=8, epochs=11, seed=0, evaluate_test=False)  # 418 steps, but traced
    assert model.steps_per_execution == 1
    fresh = models.build_model(models.ModelConfig(units=2), seed=0)
    models.choose_steps_per_execution(fresh, 400)
    assert fresh.steps_per_execution == models.STEPS_PER_EXECUTION
    assert make_adversarial_model(fresh, 0.1).steps_per_execution == models.STEPS_PER_EXECUTION
    other = models.build_model(models.ModelConfig(units=2), seed=0)
    models.evaluate(other, splits.x_test[:10], splits.y_test[:10])  # its test step traced at one step a call
    models.choose_steps_per_execution(other, 10_000)
    assert other.steps_per_execution == 1


def test_lstm_trains_with_the_fused_recurrence_only_in_models_that_loop_over_steps(monkeypatch):
    """Its longer tracing is repaid only by long trials: the same choice as the steps a call."""
    from tuner import recurrent

    ran = []
    monkeypatch.setattr(recurrent, "_lstm", lambda *args, _lstm=recurrent._lstm: ran.append(1) or _lstm(*args))
    splits = data.load(subset=300)
    short = models.build_model(models.ModelConfig(cell="LSTM", units=2, layers=2), seed=0)
    assert [type(layer) for layer in short.layers[:2]] == [recurrent.LSTM, recurrent.LSTM]
    models.train(short, splits, batch_size=64, epochs=2, seed=0, evaluate_test=False)  # 10 steps: Keras's loop
    assert ran == [] and not any(layer.fused for layer in short.layers[:2])
    long = models.build_model(models.ModelConfig(cell="LSTM", units=2, layers=2), seed=0)
    models.train(long, splits, batch_size=8, epochs=11, seed=0, evaluate_test=False)  # 418 steps
    assert long.steps_per_execution == models.STEPS_PER_EXECUTION
    assert ran == [1, 1] and all(layer.fused for layer in long.layers[:2])  # one train step traced, two layers


def test_a_benchmarks_warm_up_keeps_the_steps_a_call_of_the_trial_it_stands_for():
    import sys
    from pathlib import Path

    bench = str(Path(__file__).resolve().parents[1] / "bench")
    sys.path.insert(0, bench)
    try:
        import benchlib
    finally:
        sys.path.remove(bench)
    model = models.build_model(models.ModelConfig(units=2), seed=0)
    benchlib.as_in_a_trial(model, 60_000, 256)  # 5 epochs of 235 steps
    models.train(model, data.load(subset=300), batch_size=64, epochs=1, seed=0, evaluate_test=False)  # 5 steps
    assert model.steps_per_execution == models.STEPS_PER_EXECUTION


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


def test_evaluation_batches_are_made_once_per_pair_of_arrays():
    import gc

    x = np.arange(7 * 4, dtype=np.float32).reshape(7, 2, 2)
    y = np.arange(7, dtype=np.int32)
    dataset = models.eval_batches(x, y)
    assert models.eval_batches(x, y) is dataset  # every trial scores on the same pipeline
    assert np.concatenate([b.numpy() for _, b in dataset]).tolist() == list(range(7))  # the arrays' order
    assert np.concatenate([b.numpy() for _, b in dataset]).tolist() == list(range(7))  # and again
    key = (id(x), id(y))
    del x, dataset
    gc.collect()
    assert key not in models._EVAL_BATCHES


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


def test_building_a_model_does_not_trace_its_forward_pass(monkeypatch):
    """The loss, metrics and optimizer are built from the model's known output shape: no layer's `call` runs
    before training (Keras's own build traces the whole forward pass for that shape)."""
    import keras

    calls = []
    for layer in (keras.layers.LSTM, keras.layers.Dense):

        @functools.wraps(layer.call)  # Keras reads call's signature
        def counted(self, *args, _call=layer.call, **kwargs):
            calls.append(self)
            return _call(self, *args, **kwargs)

        monkeypatch.setattr(layer, "call", counted)
    from tuner.adversarial import make_adversarial_model

    model = models.build_model(models.ModelConfig(cell="LSTM", units=4), seed=0)
    wrapper = make_adversarial_model(models.build_model(models.ModelConfig(cell="LSTM", units=4), seed=0), 0.1)
    assert calls == []
    for built in (model, wrapper):
        assert built._compile_loss.built and built._compile_metrics.built and built.optimizer.built
    assert len(model.optimizer.variables) == 2 + 2 * len(model.trainable_variables)  # Adam: step, rate, m, v
    model.predict(np.zeros((1, 28, 28), np.float32), verbose=0)
    assert calls  # the counting sees a real call


def test_a_keras_whose_private_build_differs_still_trains(monkeypatch):
    import keras

    def other_signature(self, iterator):  # what a later Keras might take instead
        raise AssertionError("not reached: the call with data_batch fails first")

    monkeypatch.setattr(keras.Model, "_symbolic_build", other_signature, raising=False)
    model = models.build_model(models.ModelConfig(cell="SimpleRNN", units=4), seed=0)
    result = models.train(model, data.load(subset=300), batch_size=64, epochs=1, seed=0, evaluate_test=False)
    assert len(result.epochs) == 1 and math.isfinite(result.epochs[0].loss)


def _count_steps(model) -> dict:
    """Count the traces of `model`'s train and test steps from now on (Python runs a step once per trace)."""
    traces = {"train": 0, "test": 0}
    for kind in traces:
        step = getattr(model, f"{kind}_step")

        def counted(data, kind=kind, step=step):
            traces[kind] += 1
            return step(data)

        setattr(model, f"{kind}_step", counted)
    return traces


def _figures(result: models.FitResult) -> list:
    return [[v for k, v in e.items() if k != "seconds"] for e in result.history()] + [result.test_accuracy]


def test_a_kept_model_trains_exactly_as_a_fresh_one_without_tracing_again():
    splits = data.load(subset=600, validation=True)
    # dropout: the kept layer's seed state is reset too; nadam: an optimizer variable that starts at 1, not 0
    config = models.ModelConfig(cell="LSTM", units=8, dropout=0.2, optimizer="nadam", learning_rate=0.003)
    cache = models.ModelCache()
    with cache.model(config, seed=3) as first:
        traces = _count_steps(first)
        models.train(first, splits, batch_size=64, epochs=2, seed=3)
    with cache.model(models.ModelConfig(cell="GRU", units=4), seed=3) as other:  # another architecture between
        assert other is not first
    later = dataclasses.replace(config, learning_rate=0.02)
    with cache.model(later, seed=3) as kept:
        assert kept is first
        reused = models.train(kept, splits, batch_size=32, epochs=2, seed=3)  # another batch size too
    assert traces == {"train": 1, "test": 1}, "the kept model's steps were traced again"
    fresh = models.train(models.build_model(later, seed=3), splits, batch_size=32, epochs=2, seed=3)
    assert _figures(reused) == _figures(fresh)
    assert float(first.optimizer.learning_rate.numpy()) == np.float32(0.02)
    assert (cache.hits, cache.misses) == (1, 2)


def test_adversarial_training_on_a_kept_model_matches_a_fresh_one():
    splits = data.load(subset=300)
    config = models.ModelConfig(cell="GRU", units=4, adv_eps=0.1, adv_share=0.5)
    fit = {"batch_size": 64, "epochs": 1, "seed": 0, "adversarial": (0.1, 0.5)}
    cache = models.ModelCache()
    with cache.model(config, seed=0) as first:
        models.train(first, splits, **fit)  # the wrapper shares the kept model's optimizer and its slots
    later = dataclasses.replace(config, learning_rate=0.01)
    with cache.model(later, seed=0) as kept:
        assert kept is first
        reused = models.train(kept, splits, **fit)
    assert _figures(reused) == _figures(models.train(models.build_model(later, seed=0), splits, **fit))


def test_reseeding_with_the_same_seed_keeps_tensorflow_s_instantiated_functions(monkeypatch):
    import random

    import keras
    import tensorflow as tf

    def draws() -> tuple:
        return random.random(), np.random.random(), float(keras.random.uniform(()))  # the last: Keras's own seed

    models.seed_everything(5)
    first = draws()
    real, calls = tf.random.set_seed, []
    # tf.random.set_seed also empties TensorFlow's kernel cache: every traced step instantiated again
    monkeypatch.setattr(tf.random, "set_seed", lambda seed: (calls.append(seed), real(seed)))
    models.seed_everything(5)
    assert calls == [] and draws() == first
    from tensorflow.python.eager import context

    cleared = []  # what keras.backend.clear_session calls
    monkeypatch.setattr(context.Context, "clear_kernel_cache", lambda self: cleared.append(1))
    model = models.build_model(models.ModelConfig(units=2), seed=5)
    models.train(model, data.load(subset=200), batch_size=64, epochs=1, seed=5)
    assert calls == [] and cleared == [], "a build or a trial emptied the kernel cache of the worker's kept models"
    models.seed_everything(6)
    assert calls == [6] and tf.compat.v1.get_seed(0)[0] == 6 and draws() != first
    models.seed_everything(5)
    assert calls == [6, 5] and draws() == first


def test_the_cache_keeps_its_most_recent_architectures_and_lends_a_model_once():
    cache = models.ModelCache(size=2)
    a, b, c = (models.ModelConfig(units=units) for units in (2, 3, 4))
    with cache.model(a, seed=0) as model_a:
        with cache.model(a, seed=0) as busy:  # in use by a trial: another is built
            assert busy is not model_a
    with cache.model(b, seed=0), cache.model(a, seed=0) as again:
        assert again is model_a
    with cache.model(a, seed=1) as other_seed:  # the initial weights differ: built, not reset
        assert other_seed is not model_a
    with cache.model(c, seed=0):
        pass
    assert models.architecture(a) + (0,) not in cache._kept  # the least recently used went first
    with cache.model(a, seed=0) as rebuilt:
        assert rebuilt is not model_a
    assert len(cache._kept) == 2


def test_the_cache_frees_a_model_as_it_drops_it():
    import gc
    import weakref

    gc.disable()  # only the cache may collect here
    try:
        cache = models.ModelCache(size=1)
        with cache.model(models.ModelConfig(units=2), seed=0) as first:
            dropped = weakref.ref(first)
        del first
        with cache.model(models.ModelConfig(units=3), seed=0):
            assert dropped() is not None, "still kept while the next trial runs"
        assert dropped() is None, "a model holds cycles: the cache collects once it drops one"
    finally:
        gc.enable()


def test_a_worker_scores_a_trial_on_a_kept_model_as_on_a_fresh_one(monkeypatch):
    import optuna

    from tuner.objective import make_objective
    from tuner.spec import parse

    spec = parse({"study": {"kind": "grid"}, "model": {"units": 4}, "training": {"epochs": 1},
                  "grid": {"learning_rate": [0.01, 0.001]}})  # fmt: skip
    splits = data.load(subset=300)
    built = []
    build = models.build_model
    monkeypatch.setattr(models, "build_model", lambda *a, **k: built.append(1) or build(*a, **k))
    worker = make_objective(spec, splits)
    worker(optuna.trial.FixedTrial({"learning_rate": 0.01}))
    second = worker(optuna.trial.FixedTrial({"learning_rate": 0.001}))
    assert len(built) == 1  # both trials trained the one model
    alone = make_objective(spec, splits)(optuna.trial.FixedTrial({"learning_rate": 0.001}))
    assert second == alone


ALLOCATOR_PROBE = """
import os, sys
if sys.argv[1] == "tuner":
    import tuner.models
import tensorflow as tf
try:
    tf.ones([4096, 4096])  # 64 MiB, over the 16 MiB oneDNN's allocator is allowed here
except tf.errors.ResourceExhaustedError:
    print(os.environ.get("TF_ENABLE_ONEDNN_OPTS", "unset"), "oneDNN allocator")
else:
    print(os.environ.get("TF_ENABLE_ONEDNN_OPTS", "unset"), "default allocator")
"""


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="TensorFlow's oneDNN allocator: x86-64")
def test_training_through_tuner_uses_the_tensorflow_configuration_of_the_tuner_command():
    """Importing tuner before TensorFlow sets TF_ENABLE_ONEDNN_OPTS=1, as the `tuner` command always had it. Left
    unset, TensorFlow 2.21 decides by the CPU: on an AMD EPYC without AVX-512 it allocated through its default
    allocator, and the benchmarks, which did not set it, trained LSTM-100 1.4-1.5x slower than the command
    (BENCHMARKS.md, the tenth round); on an Intel Xeon with AMX it took oneDNN's allocator unasked (the eleventh).
    Which allocator serves a tensor shows under a 16 MiB cap that only oneDNN's allocator obeys. The variable set
    to 0 shows that the probe tells the two apart on any CPU, and that a value already set wins over tuner's."""
    env = {k: v for k, v in os.environ.items() if k != "TF_ENABLE_ONEDNN_OPTS"}
    env |= {"TF_MKL_ALLOC_MAX_BYTES": str(16 << 20), "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": ""}

    def probe(first: str, **setting: str) -> str:
        cmd = [sys.executable, "-c", ALLOCATOR_PROBE, first]
        return subprocess.run(cmd, env=env | setting, capture_output=True, text=True, check=True).stdout.strip()

    assert probe("tuner") == "1 oneDNN allocator"
    assert probe("tensorflow", TF_ENABLE_ONEDNN_OPTS="0") == "0 default allocator"  # the probe tells them apart
    assert probe("tuner", TF_ENABLE_ONEDNN_OPTS="0") == "0 default allocator"  # a value already set wins
