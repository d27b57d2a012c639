"""The Optuna objective: a trial's parameters -> a Keras model trained on data loaded once -> metrics in the DB.

Per-epoch validation (or, for the document's grids, training) accuracy is reported as the trial's intermediate
values, through optuna-integration's Keras pruning callback; everything a report needs (both train figures per
epoch, test accuracy, times, settings, versions, worker) goes into the trial's user attributes. The search
selects on validation accuracy; test accuracy is recorded to report, never returned to the sampler.
"""

from __future__ import annotations

import math
import platform
from collections.abc import Callable

import keras
import optuna
from optuna_integration.keras import KerasPruningCallback

from tuner import artifacts, models
from tuner.data import Splits
from tuner.spec import StudySpec
from tuner.study import worker_id


def suggest(trial: optuna.Trial, spec: StudySpec) -> dict:
    """The trial's parameters: a grid cell (GridSampler) or a point of the search space."""
    if spec.kind == "grid":
        return {name: trial.suggest_categorical(name, values) for name, values in spec.grid.items()}
    params = {}
    for p in spec.space:
        if p.type == "categorical":
            params[p.name] = trial.suggest_categorical(p.name, list(p.choices))
        elif p.type == "int":
            params[p.name] = trial.suggest_int(p.name, int(p.low), int(p.high), log=p.log)
        else:
            params[p.name] = trial.suggest_float(p.name, p.low, p.high, log=p.log)
    return params


def versions() -> dict:
    import numpy
    import tensorflow as tf

    return {"python": platform.python_version(), "optuna": optuna.__version__, "keras": keras.__version__,
            "tensorflow": tf.__version__, "numpy": numpy.__version__}  # fmt: skip


def make_objective(spec: StudySpec, splits: Splits, *, on_epoch: Callable | None = None, artifact_store=None):
    """The objective for `spec`, closing over data already in memory (never reloaded per trial).

    With an artifact store, a trial among the study's five best so far saves its model there. The worker keeps
    the compiled models of its last few architectures (`models.ModelCache`): a trial that differs from an
    earlier one only in learning rate or batch size trains the kept model, reset to its initial state.
    """
    models.limit_malloc_arenas()  # a worker's memory stays flat over many trials
    models.hold_constants(splits)  # the data enters TensorFlow once per worker, not once per trial
    monitor = "val_accuracy" if splits.x_val is not None else "accuracy"
    fixed = {"epochs": spec.epochs, "seed": spec.seed, "monitor": monitor, "worker": worker_id(),
             "versions": versions(), **splits.describe()}  # fmt: skip

    robust = spec.objective == "robust"
    kept = models.ModelCache()  # trials of one architecture reuse its traced train and test steps

    def objective(trial: optuna.Trial) -> float | tuple[float, float]:
        for key, value in fixed.items():
            trial.set_user_attr(key, value)
        params = suggest(trial, spec)
        config = spec.model_config(params)
        batch_size = int(params.get("batch_size", spec.batch_size))
        trial.set_user_attr("model", {**config.__dict__, "batch_size": batch_size})
        with kept.model(config, seed=spec.seed) as model:  # a fresh model, or a kept one reset to match it
            return train_and_score(trial, model, params, config, batch_size)

    def train_and_score(trial, model, params: dict, config: models.ModelConfig, batch_size: int):
        # Optuna prunes single-objective studies only; the robust search runs every trial to its last epoch.
        callbacks = [] if robust else [_EpochPruning(trial, monitor)]
        if on_epoch is not None:
            callbacks.append(_EpochHook(trial.number, params, spec.epochs, on_epoch))
        result = models.FitResult()
        try:
            models.train(model, splits, batch_size=batch_size, epochs=spec.epochs, seed=spec.seed,
                         callbacks=callbacks, stop_on_divergence=spec.kind == "search", result=result,
                         adversarial=(config.adv_eps, config.adv_share) if config.adv_share > 0 else None)  # fmt: skip
        finally:  # a pruned trial keeps the epochs it ran
            _record(trial, result)
        if result.diverged:
            raise optuna.TrialPruned(f"diverged: loss became NaN or infinite in epoch {len(result.epochs)}")
        if spec.kind == "grid":
            value = float(result.test_accuracy)  # the document's "Test" column
        else:
            value = float(result.epochs[-1].val_accuracy)
            if not math.isfinite(value):
                raise optuna.TrialPruned("validation accuracy is not a number")
        if robust:
            value = (value, _robust_accuracy(trial, model, splits, spec.robust_eps))
        if artifact_store is not None and _beats_best(trial, value):
            artifacts.save_model(trial, model, artifact_store)
        return value

    return objective


def _record(trial: optuna.Trial, result: models.FitResult) -> None:
    trial.set_user_attr("history", result.history())
    trial.set_user_attr("epochs_run", len(result.epochs))
    trial.set_user_attr("fit_seconds", result.fit_seconds)
    trial.set_user_attr("eval_seconds", result.eval_seconds)
    trial.set_user_attr("test_accuracy", result.test_accuracy)
    trial.set_user_attr("test_loss", result.test_loss)
    trial.set_user_attr("diverged", result.diverged)


def _robust_accuracy(trial: optuna.Trial, model, splits: Splits, eps: float) -> float:
    """Accuracy under FGSM at `eps` on the validation split (the second objective); test figure recorded too."""
    from tuner import adversarial

    val = models.evaluate(model, adversarial.fgsm(model, splits.x_val, splits.y_val, eps), splits.y_val)
    test = models.evaluate(model, adversarial.fgsm(model, splits.x_test, splits.y_test, eps), splits.y_test)
    trial.set_user_attr("robust_eps", eps)
    trial.set_user_attr("robust_val_accuracy", val)
    trial.set_user_attr("robust_test_accuracy", test)
    return val


KEEP_MODELS = 5  # a study keeps the models of its five best trials so far (confusions compare the top k)


def _beats_best(trial: optuna.Trial, value: float | tuple) -> bool:
    """Worth saving: among the best KEEP_MODELS so far, or (two objectives) dominated by no finished trial."""
    done = trial.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if isinstance(value, tuple):
        return not any(all(a >= b for a, b in zip(t.values, value)) and tuple(t.values) != value for t in done)
    return sum(t.value > value for t in done) < KEEP_MODELS


class _EpochPruning(KerasPruningCallback):
    """Optuna's Keras pruning callback, with the number of epochs trained (1, 2, ...) as the step, and no pruning
    after the last epoch.

    Keras numbers epochs from 0, so Optuna's callback reports the first epoch as step 0, and successive halving's
    `min_resource=1` then first compares trials after their second epoch. Counted in epochs trained, the rungs
    fall after epochs 1, 3 and 9 (reduction factor 3), as the pruners' papers count resources. A trial at its
    last epoch is only reported: pruning it then would save nothing and lose its result.
    """

    def __init__(self, trial: optuna.Trial, monitor: str) -> None:
        super().__init__(trial, monitor)
        self.trial, self.monitor = trial, monitor

    def on_epoch_end(self, epoch, logs=None):
        if epoch + 1 < (self.params or {}).get("epochs", epoch + 2):
            super().on_epoch_end(epoch + 1, logs)  # interval is 1: every epoch is checked
        elif (value := (logs or {}).get(self.monitor)) is not None:
            self.trial.report(float(value), step=epoch + 1)


class _EpochHook(keras.callbacks.Callback):
    """Tells the progress display that an epoch ended."""

    def __init__(self, number: int, params: dict, epochs: int, hook: Callable) -> None:
        super().__init__()
        self.number, self.trial_params, self.epochs, self.hook = number, params, epochs, hook

    def on_epoch_end(self, epoch, logs=None):
        self.hook(self.number, self.trial_params, epoch + 1, self.epochs, logs or {})
