"""Build and train one Keras recurrent classifier. Knows nothing of Optuna: the objective wires the two.

Every row of a 28x28 image is one time step of 28 features; one or more recurrent layers feed Dense(10).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import math
import os
import random
import sys
import time
import types
import weakref
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from tuner.data import Splits

CELLS = ("SimpleRNN", "LSTM", "GRU")
# Train steps run per call from Python: Keras loops over them inside one traced function, so the Python, callback
# and executor work between steps is paid once per call. Executions end at each epoch's end (`batches`), so a
# model computes exactly what it computes one step per call (tests/test_models.py). On the nineteenth benchmark
# machine that saved 0.4-1.4 ms a step (epochs 1.06-1.11x faster on full data), and tracing the loop cost a new
# model 0.1-0.35 s more (its train and test steps): small searches (1,000 images, 8 steps an epoch) ran 0.80-0.90x
# as fast. So a model takes the loop only when its first trial trains at least LOOP_FROM_STEPS steps.
STEPS_PER_EXECUTION = 8
LOOP_FROM_STEPS = 400
OPTIMIZERS = ("adam", "rmsprop", "sgd", "nadam", "adamw")


@dataclass(frozen=True)
class ModelConfig:
    """What defines a model; every field is recorded with the trial."""

    cell: str = "SimpleRNN"
    units: int = 128
    layers: int = 1
    dropout: float = 0.0
    optimizer: str = "adam"
    learning_rate: float = 0.001
    momentum: float = 0.9  # used by sgd only
    adv_eps: float = 0.1  # adversarial training: FGSM step on pixels in [0, 1] ...
    adv_share: float = 0.0  # ... replacing this share of every batch (0: plain training)

    def __post_init__(self) -> None:
        problems = []
        if self.cell not in CELLS:
            problems.append(f"cell {self.cell!r} is not one of {', '.join(CELLS)}")
        if self.optimizer not in OPTIMIZERS:
            problems.append(f"optimizer {self.optimizer!r} is not one of {', '.join(OPTIMIZERS)}")
        if not self.units >= 1:
            problems.append(f"units must be >= 1, got {self.units}")
        if not self.layers >= 1:
            problems.append(f"layers must be >= 1, got {self.layers}")
        if not 0.0 <= self.dropout < 1.0:
            problems.append(f"dropout must be in [0, 1), got {self.dropout}")
        if not self.learning_rate > 0:
            problems.append(f"learning_rate must be > 0, got {self.learning_rate}")
        if not 0.0 <= self.momentum < 1.0:
            problems.append(f"momentum must be in [0, 1), got {self.momentum}")
        if not 0.0 < self.adv_eps <= 1.0:
            problems.append(f"adv_eps must be in (0, 1], got {self.adv_eps}")
        if not 0.0 <= self.adv_share <= 1.0:
            problems.append(f"adv_share must be in [0, 1], got {self.adv_share}")
        if problems:
            raise ValueError("; ".join(problems))


@dataclass
class EpochRecord:
    epoch: int  # 1-based, as in the document's "Train 1 .. Train 5"
    loss: float
    accuracy: float  # mean over the epoch's batches (the sound figure)
    last_batch_accuracy: float  # accuracy on the epoch's last mini-batch (the document's SimpleRNN figure)
    seconds: float
    val_loss: float | None = None
    val_accuracy: float | None = None


@dataclass
class FitResult:
    epochs: list[EpochRecord] = field(default_factory=list)
    diverged: bool = False
    test_loss: float | None = None
    test_accuracy: float | None = None
    fit_seconds: float = 0.0
    eval_seconds: float = 0.0

    def history(self) -> list[dict]:
        return [asdict(e) for e in self.epochs]


def build_model(config: ModelConfig, *, seed: int, input_shape: tuple[int, int] = (28, 28), n_classes: int = 10):
    """A fresh compiled model, the same for the same `config` and `seed` whatever was built before.

    It does not clear the Keras session: that empties TensorFlow's kernel cache, and the worker's kept models
    (`ModelCache`) would instantiate their traced steps again on next use (0.4-0.6 s for SimpleRNN-128's train
    step). `ModelCache` clears it when it drops a model, which frees that model's memory.
    """
    import keras

    from tuner import recurrent

    seed_everything(seed)
    # Every cell trains with tuner.recurrent's layer: Keras's, with a hand-written gradient of the recurrence (the
    # same weights and function; on the benchmark machines GRU epochs 1.16-1.27x faster, SimpleRNN's 0.86-1.11x the
    # speed of Keras's unrolled layer with its train step traced 0.3-1.2 s faster; LSTM since the twentieth round,
    # BENCHMARKS.md section 1).
    layer_cls = getattr(recurrent, config.cell)
    model = keras.Sequential(name=f"{config.cell.lower()}_{config.units}")
    model.add(keras.Input(shape=input_shape))
    for i in range(config.layers):
        model.add(layer_cls(config.units, return_sequences=i < config.layers - 1, dropout=config.dropout))
    model.add(keras.layers.Dense(n_classes, activation="softmax"))
    from tuner.metrics import LastBatchCorrect

    model.compile(
        optimizer=_optimizer(config),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy", LastBatchCorrect()],
    )  # one step a call until `train` chooses (`steps_per_execution`)
    build_training_state(model, input_shape)
    return model


def build_training_state(model, input_shape: tuple[int, ...] = (28, 28)) -> None:
    """Create a compiled model's optimizer slots and metric variables now, outside any tf.function.

    Keras on TensorFlow without a distribution strategy leaves them to the first trace of the train step, and a
    tf.function that creates variables while tracing is traced a second time: every trial traced its train step
    twice (0.3 s of SimpleRNN-128's 0.8 s of tracing, 0.3 s of LSTM-128's 0.65 s). This is what Keras runs
    itself under a distribution strategy (`_symbolic_build`, on shapes only: no arithmetic, no state change).

    Keras's build first traces the model's forward pass into a scratch graph, only to learn the prediction's
    shape (about 80% of a SimpleRNN-128's 0.22 s build, profiled on the seventh benchmark machine). The model
    knows that shape without tracing (`compute_output_spec` of a model built from an `Input`), so the loss and
    metrics are built from it here the way Keras builds them, and Keras's build is left only the optimizer.
    """
    build = getattr(model, "_symbolic_build", None)
    if build is None:  # a Keras without it traces twice, as before
        return
    try:
        _build_loss_and_metrics(model, input_shape)
        build(data_batch=(np.zeros((1, *input_shape), np.float32), np.zeros((1,), np.int32), None))
    except (TypeError, ValueError, AttributeError, ImportError):
        # a Keras whose private parts differ: fit builds what is left, tracing the train step twice
        pass


def _build_loss_and_metrics(model, input_shape: tuple[int, ...]) -> None:
    """What `_symbolic_build` does for the loss and metrics, with the prediction's shape from the model."""
    import keras
    from keras.src.backend import compute_output_spec

    x = keras.KerasTensor((None, *input_shape), "float32")
    y = keras.KerasTensor((None,), "int32")
    y_pred = model.compute_output_spec(x, training=False)
    if model._compile_metrics is not None and not model._compile_metrics.built:
        compute_output_spec(model.compute_metrics, x, y, y_pred, sample_weight=None)
    if model._compile_loss is not None and not model._compile_loss.built:
        compute_output_spec(model._compute_loss, x, y, y_pred, sample_weight=None, training=False)


class ModelCache:
    """A worker's compiled models, kept between trials and handed out again reset to a fresh model's state.

    Trials that differ only in learning rate (or batch size, epochs, adversarial settings) build the same graph:
    `tuner grid lr-batch` trains one architecture 16 times. A fresh model per trial traces its train and test
    steps again (SimpleRNN-128: about 0.6 s and 0.2 s, and 0.1 s to build, against 1.25 s epochs). A kept model
    has its traced steps; it gets back the weights, the dropout seed state and the optimizer state (step count,
    moments) that `build_model` gave it, and the trial's learning rate, so a trial trains exactly as it would
    on a fresh model (tests/test_models.py compares the two to the last digit). The `size` most recently used
    architectures are kept; a model is out of the cache while a trial uses it.
    """

    def __init__(self, size: int = 5) -> None:
        self.size = size
        self._kept: dict[tuple, _Kept] = {}  # insertion order is use order: the first is the least recent
        self.hits = self.misses = 0

    @contextlib.contextmanager
    def model(self, config: ModelConfig, *, seed: int):
        key = (*architecture(config), seed)
        kept = self._kept.pop(key, None)
        if kept is None:
            self.misses += 1
            kept = _Kept(build_model(config, seed=seed))
        else:
            self.hits += 1
            kept.reset(config.learning_rate)
        try:
            yield kept.model
        finally:
            self._kept[key] = kept
            if len(self._kept) > self.size:  # a trial gives back one model at most: one goes
                del self._kept[next(iter(self._kept))]
                # Free what it held: TensorFlow's kernels of its traced steps (the whole kernel cache goes, so kept
                # models instantiate theirs again on next use) and, by collecting, its objects, which hold one
                # another. Keras's clear_session does both.
                import keras

                keras.backend.clear_session()


def architecture(config: ModelConfig) -> tuple:
    """What fixes a model's graph: every field but the learning rate (a variable) and the adversarial settings
    (`train` wraps the model per trial)."""
    return (config.cell, config.units, config.layers, config.dropout, config.optimizer, config.momentum)


class _Kept:
    """A compiled model and the values its variables (and its optimizer's) had when it was built."""

    def __init__(self, model) -> None:
        self.model = model
        self.variables = [*model.variables, *model.optimizer.variables]
        self.initial = [v.numpy() for v in self.variables]

    def reset(self, learning_rate: float) -> None:
        for variable, value in zip(self.variables, self.initial):
            variable.assign(value)
        self.model.optimizer.learning_rate = learning_rate


def _optimizer(config: ModelConfig):
    import keras

    lr = config.learning_rate
    if config.optimizer == "sgd":
        return keras.optimizers.SGD(learning_rate=lr, momentum=config.momentum)
    return {
        "adam": keras.optimizers.Adam,
        "rmsprop": keras.optimizers.RMSprop,
        "nadam": keras.optimizers.Nadam,
        "adamw": keras.optimizers.AdamW,
    }[config.optimizer](learning_rate=lr)


def train(
    model,
    splits: Splits,
    *,
    batch_size: int,
    epochs: int,
    seed: int,
    callbacks: Sequence = (),
    stop_on_divergence: bool = False,
    evaluate_test: bool = True,
    result: FitResult | None = None,
    adversarial: tuple[float, float] | None = None,
) -> FitResult:
    """Fit for `epochs`, recording both per-epoch train figures, then (optionally) test accuracy.

    `callbacks` run after the recorder, so a pruning callback sees the epoch's figures in `logs`.
    With `stop_on_divergence`, a NaN or infinite loss stops training at the end of that call of the train step
    (at most `STEPS_PER_EXECUTION` batches on: `choose_steps_per_execution`) and marks the result diverged
    instead of running to the last epoch.
    Pass `result` to keep the epochs recorded so far when a callback (a pruner) stops training by raising.
    `adversarial=(eps, share)` replaces that share of every batch with FGSM examples made against the current
    weights (tuner.adversarial).
    """
    seed_everything(seed)  # the batches' order comes from `seed` in `batches`, dropout masks from the model's seeds
    result = FitResult() if result is None else result
    n_train = len(splits.y_train)
    steps = math.ceil(n_train / batch_size)  # an epoch's, the last batch partial
    choose_steps_per_execution(model, epochs * steps)
    made = _callback_classes()
    data = batches(splits.x_train, splits.y_train, batch_size=batch_size, epochs=epochs, seed=seed)
    watch = [made.Recorder(result, stop=stop_on_divergence, last_size=n_train - (steps - 1) * batch_size)]
    if stop_on_divergence:
        watch.append(made.StopOnDivergence(result))
    validation = None if splits.x_val is None else eval_batches(splits.x_val, splits.y_val)
    start = time.perf_counter()
    fitted = model
    if adversarial is not None and adversarial[1] > 0:
        from tuner.adversarial import make_adversarial_model

        fitted = make_adversarial_model(model, *adversarial)
    try:
        with forget_traced_gradients():
            fitted.fit(
                data.dataset,  # no steps_per_epoch: a pass is an epoch, made after `SelectEpoch` chose it
                epochs=epochs,
                validation_data=validation,
                shuffle=False,  # `batches` shuffled already
                verbose=0,
                callbacks=[made.SelectEpoch(data), *watch, *callbacks],
            )
    finally:
        result.fit_seconds = time.perf_counter() - start
    if evaluate_test and not result.diverged:
        start = time.perf_counter()
        scores = model.evaluate(eval_batches(splits.x_test, splits.y_test), verbose=0, return_dict=True)
        result.eval_seconds = time.perf_counter() - start
        result.test_loss, result.test_accuracy = float(scores["loss"]), float(scores["accuracy"])
    return result


def choose_steps_per_execution(model, steps: int) -> None:
    """Give a model whose train and test steps are not traced yet `STEPS_PER_EXECUTION` steps a call if its trial
    trains at least `LOOP_FROM_STEPS` steps, else one; such a model's LSTM layers also train with the fused
    recurrence (tuner.recurrent.LSTM), which likewise costs tracing time that only long trials repay. Once either
    step is traced the choice stays: Keras reads `steps_per_execution` both when tracing a step and when it counts
    the steps of each call."""
    from tuner import recurrent

    if getattr(model, "train_function", None) is None and getattr(model, "test_function", None) is None:
        loop = steps >= LOOP_FROM_STEPS
        model.steps_per_execution = STEPS_PER_EXECUTION if loop else 1
        for layer in model.layers:
            if isinstance(layer, recurrent.LSTM):
                layer.fused = loop


def seed_everything(seed: int) -> None:
    """`keras.utils.set_random_seed(seed)`, but TensorFlow's global seed is left alone when it is `seed` already.

    `tf.random.set_seed` also empties TensorFlow's kernel cache (to restart stateful random kernels, which these
    models have none of: Keras draws dropout masks and initial weights statelessly, from seeds that Python's
    `random` gives), so every traced function is instantiated again on its next call. Reseeded every trial, a kept
    SimpleRNN-128 paid 0.36 s before its first train step and 0.15-0.2 s before its first test step (LSTM-128:
    0.35-0.6 s and about the same), against steps of 7 and 35 ms.
    """
    import keras
    import tensorflow as tf

    try:
        from keras.src.backend.common import global_state
        from keras.src.random import seed_generator
        from keras.src.utils.rng_utils import GLOBAL_RANDOM_SEED
    except ImportError:  # a Keras laid out otherwise: its own function, and the functions instantiated again
        global_state = None
    if global_state is None or tf.compat.v1.get_seed(0)[0] != seed:  # (global seed, the op seed given): draws nothing
        keras.utils.set_random_seed(seed)
        return
    global_state.set_global_attribute(GLOBAL_RANDOM_SEED, seed)  # the rest of keras.utils.set_random_seed
    global_state.set_global_attribute(seed_generator.GLOBAL_SEED_GENERATOR, None)
    random.seed(seed)
    np.random.seed(seed)


# Validation and test batches: no weights change, so only speed and memory depend on the size. Scoring the 10,000
# test images (median of 5, one run): SimpleRNN-128 0.16 s in batches of 1,024, 0.11 s of 2,048, 0.12 s of 5,000;
# LSTM-128 0.53, 0.44, 0.49 s; GRU-128 0.43, 0.36, 0.38 s. Batches of 5,000 raised LSTM's peak memory by 150 MiB.
VAL_BATCH = 2048
_EVAL_BATCHES: dict[tuple[int, int], object] = {}


def eval_batches(x: np.ndarray, y: np.ndarray):
    """`batches(x, y, batch_size=VAL_BATCH).dataset`, made once per pair of arrays and kept while both live.

    Every trial of a worker scores the same validation and test arrays; building their pipeline took 0.02 s a call.
    """
    return _while_alive(_EVAL_BATCHES, (id(x), id(y)), (x, y), lambda: batches(x, y, batch_size=VAL_BATCH).dataset)


@dataclass(frozen=True)
class EpochBatches:
    """A tf.data pipeline whose every pass is one epoch of (x, y) batches: the epoch that `epoch` holds when the
    pass starts (`select`). The last batch of an epoch is partial, as in Keras."""

    dataset: object  # tf.data.Dataset
    epoch: object  # tf.Variable, int64

    def select(self, epoch: int) -> None:
        self.epoch.assign(epoch)


def batches(x: np.ndarray, y: np.ndarray, *, batch_size: int, epochs: int = 1, seed: int | None = None):
    """The (x, y) batches of `epochs` epochs as `EpochBatches`: each pass over `.dataset` is the selected epoch.

    With `seed`, every epoch is a new permutation drawn by numpy's `default_rng(seed)`: the same batches
    every run, different ones every epoch. (Keras's own `fit(shuffle=True)` on arrays, under
    `keras.utils.set_random_seed`, draws one permutation and repeats it every epoch: tf.data restarts a seeded
    random op with each new iterator.) Without `seed`, the arrays' order (validation, test).

    A pass ends with its epoch, so Keras's loop of several train steps per call (`STEPS_PER_EXECUTION`) stops
    there: one stream of all epochs let a call run on into the next epoch's batches, which changed the epoch's
    figures. tf.data's autotuning is off: Keras's array pipeline makes an iterator per epoch whose autotuning
    thread the previous one's destructor waits for, 1 to 4 s at the start of about one epoch in three
    (LSTM-128, full data; found with py-spy), a sixth of the epoch's time.
    """
    import tensorflow as tf

    n = len(y)
    rng = None if seed is None else np.random.default_rng(seed)
    order = np.concatenate([np.arange(n) if rng is None else rng.permutation(n) for _ in range(epochs)])
    starts = np.arange(0, n, batch_size, dtype=np.int64)
    sizes = np.minimum(batch_size, n - starts)
    order = tf.constant(order, dtype=tf.int64)
    epoch = tf.Variable(0, dtype=tf.int64, trainable=False)

    def grab(start_size, data):
        start, size = start_size
        rows = tf.slice(order, [epoch * n + start], [size])
        return tf.gather(data[0], rows), tf.gather(data[1], rows)

    # The arrays enter as one element repeated (not captured by the map function), as Keras's own pipeline does.
    arrays = tf.data.Dataset.from_tensors((_constant(x), _constant(y))).repeat()
    dataset = tf.data.Dataset.zip(tf.data.Dataset.from_tensor_slices((starts, sizes)), arrays).map(grab)
    options = tf.data.Options()
    options.autotune.enabled = False
    options.experimental_optimization.apply_default_optimizations = False
    return EpochBatches(dataset.prefetch(2).with_options(options), epoch)


_CONSTANTS: dict[int, object] = {}


def _constant(array: np.ndarray):
    """`array` as a TensorFlow constant, made once and kept while the array lives (the arrays are never changed).

    A worker trains every trial on the same arrays; copying 60,000 training images (188 MB) into a new constant
    took 0.04 to 0.5 s a trial.
    """
    import tensorflow as tf

    return _while_alive(_CONSTANTS, id(array), (array,), lambda: tf.constant(array))


def _while_alive(cache: dict, key, arrays: tuple, make):
    """`cache[key]`, made by `make()` on first use and dropped as soon as one of `arrays` is (`key` is made of
    their ids, which Python may give to a new array once they are gone)."""
    if key not in cache:
        cache[key] = make()
        for array in arrays:
            weakref.finalize(array, cache.pop, key, None)
    return cache[key]


def hold_constants(splits: Splits) -> None:
    """Make the splits' constants now (a worker's set-up) rather than in its first trial."""
    for array in (splits.x_train, splits.y_train, splits.x_val, splits.y_val, splits.x_test, splits.y_test):
        if array is not None:
            _constant(array)


@contextlib.contextmanager
def forget_traced_gradients():
    """Drop the gradient functions that tracing a train step registered globally, once the step is traced.

    Keras's TensorFlow optimizer sums gradients with `all_reduce`, a `tf.custom_gradient`; traced in graph mode,
    every custom gradient registers a function in TensorFlow's global gradient registry, never removed, whose
    closure holds the whole traced train step. So every model trained kept its train-step graphs alive: about
    10 MiB a trial (LSTM-32), 36 graphs, found with objgraph. Those functions are only called while the same
    graph is differentiated again, which never happens once `fit` has traced it.
    """
    registry = _gradient_registry()
    before = set(registry) if registry is not None else set()
    try:
        yield
    finally:
        if registry is not None:
            for name in [k for k in list(registry) if k not in before and k.startswith("CustomGradient-")]:
                registry.pop(name, None)


def _gradient_registry() -> dict | None:
    """TensorFlow's registry of graph-mode gradient functions (a private dict; None if that ever changes)."""
    try:
        from tensorflow.python.framework import ops
    except ImportError:
        return None
    registry = getattr(getattr(ops, "_gradient_registry", None), "_registry", None)
    return registry if isinstance(registry, dict) else None


M_ARENA_MAX = -8  # glibc's mallopt parameter number


def limit_malloc_arenas(arenas: int = 2) -> bool:
    """Cap glibc's malloc arenas for this process, unless MALLOC_ARENA_MAX says otherwise. Returns whether set.

    TensorFlow frees and allocates from many threads; with glibc's default (8 arenas per core) a worker's
    resident memory crept up trial after trial even with nothing left alive (about 8 MiB a trial, LSTM-32 on
    1,200 images); with 2 arenas it stayed flat over 16 trials (bench/trial_overhead.py measures it). Takes
    effect for arenas made after the call, so it may run after TensorFlow is imported.
    """
    if "MALLOC_ARENA_MAX" in os.environ or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (musl, say)
        return False
    return bool(libc.mallopt(M_ARENA_MAX, arenas))


def evaluate(model, x: np.ndarray, y: np.ndarray) -> float:
    """Accuracy of `model` on (x, y), read by metric name."""
    return float(model.evaluate(eval_batches(x, y), verbose=0, return_dict=True)["accuracy"])


@functools.cache
def _callback_classes():
    """`train`'s callbacks, defined on first use so that importing this module does not start TensorFlow."""
    import keras

    class SelectEpoch(keras.callbacks.Callback):
        """Points the training pipeline at the epoch about to start, before Keras opens its pass."""

        def __init__(self, data: EpochBatches) -> None:
            super().__init__()
            self.data = data

        def on_epoch_begin(self, epoch, logs=None):
            self.data.select(epoch)

    class Recorder(keras.callbacks.Callback):
        """Records each epoch: both train figures, validation figures, wall time; flags divergence. It has no
        batch hook, so Keras hands it nothing until the epoch ends."""

        def __init__(self, result: FitResult, *, stop: bool, last_size: int = 0) -> None:
            super().__init__()
            self.result, self.stop, self.last_size = result, stop, last_size  # the size of an epoch's last batch

        def on_epoch_begin(self, epoch, logs=None):
            self.t0 = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            figures = {k: float(v) for k, v in (logs or {}).items()}
            self.result.epochs.append(
                EpochRecord(
                    epoch=epoch + 1,
                    loss=figures.get("loss", float("nan")),
                    accuracy=figures.get("accuracy", float("nan")),
                    last_batch_accuracy=self._last_batch_accuracy(figures.get("last_batch_correct")),
                    seconds=time.perf_counter() - self.t0,
                    val_loss=figures.get("val_loss"),
                    val_accuracy=figures.get("val_accuracy"),
                )
            )
            if self.stop and not math.isfinite(figures.get("loss", 0.0)):
                self.result.diverged = True
                self.model.stop_training = True

        def _last_batch_accuracy(self, correct: float | None) -> float:
            if correct is None or not self.last_size or not math.isfinite(correct):
                return float("nan")
            return round(correct) / self.last_size

    class StopOnDivergence(keras.callbacks.Callback):
        """Stops training once the loss is NaN or infinite, checked after every call of the train step. (Keras's
        `TerminateOnNaN` does the same but prints to the terminal, under the search's progress display.)"""

        def __init__(self, result: FitResult) -> None:
            super().__init__()
            self.result = result

        def on_train_batch_end(self, batch, logs=None):
            loss = (logs or {}).get("loss")
            if loss is not None and not math.isfinite(float(loss)):
                self.result.diverged = True
                self.model.stop_training = True

    return types.SimpleNamespace(SelectEpoch=SelectEpoch, Recorder=Recorder, StopOnDivergence=StopOnDivergence)
