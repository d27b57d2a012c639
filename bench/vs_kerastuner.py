"""tuner search against KerasTuner's Hyperband and BayesianOptimization: same space, data and epoch budget.

    pip install -e '.[bench]'                                            # keras-tuner, for this benchmark only
    python bench/vs_kerastuner.py --json bench/results/vs_kerastuner.json    # about 20 minutes on 2 cores
    python bench/vs_kerastuner.py --quick

Space: cell (SimpleRNN/LSTM/GRU), units 16..96 (log), learning rate 1e-4..1e-1 (log), optimizer adam/rmsprop/sgd;
batch 128; at most 9 epochs a trial. Data: for seed s, the 1,000 training and 166 validation images that
`tuner search --subset 1000 --seed s` trains on (tuner.data.load), handed to KerasTuner as arrays. Models:
every method builds them with `tuner.models.build_model`, so only the search differs.

Budget: one Hyperband iteration of KerasTuner (max_epochs 9, factor 3: about 70 epochs); BayesianOptimization
gets 8 trials of 9 epochs (72); tuner search (TPE + its default pruner, through
`tuner.runner.run_study`) gets trials until it has spent 70 epochs. Two tuner arms: the space alone, and the
space with the document's best configuration queued first (LSTM, adam, learning rate 0.001, its 200 units
clipped to the space's 96), as studies/search.toml queues it: what `tuner search` does with what the hand tuning
found. KerasTuner has no such start: its first trials are random. Epochs are counted from each tool's own
records (KerasTuner: `tuner/epochs - tuner/initial_epoch` of each Hyperband trial; tuner: `epochs_run`).

Three readings of "epochs to reach a target", on the same targets (the lowest and the median of all runs' best
scores, so that every run reaches the low one):
- by score: what each tool reports as a trial's score, counted when the trial ends (KerasTuner: the best
  epoch's val_accuracy; tuner: the last epoch's; pruned trials count their epochs but no score);
- measured (`*_measured`): the best validation accuracy measured at any epoch of a trial, counted when the
  trial ends (pruned trials' epochs count for tuner, as stopped trials' do for KerasTuner);
- per epoch (`*_per_epoch`): the epochs trained until the first epoch, of any trial, whose validation
  accuracy reached the target (a callback records every tool's every epoch).
"""

from __future__ import annotations

import json
import math
import statistics
import tempfile
import time
from pathlib import Path

import benchlib

from tuner.spec import DEFAULT_SEARCH_PRUNER

PRUNER = DEFAULT_SEARCH_PRUNER  # tuner search's pruner: its default unless --pruner says otherwise

SPACE = """
[study]
kind = "search"
description = "vs KerasTuner: cell, units, learning rate, optimizer"
[training]
epochs = {epochs}
batch_size = 128
validation = true
[data]
subset = {subset}
[search.cell]
choices = ["SimpleRNN", "LSTM", "GRU"]
[search.units]
type = "int"
low = 16
high = 96
log = true
[search.learning_rate]
type = "float"
low = 1e-4
high = 1e-1
log = true
[search.optimizer]
choices = ["adam", "rmsprop", "sgd"]
[sampler]
name = "tpe"
[pruner]
name = "{pruner}"
{enqueue}"""

# The document's best configuration (studies/search.toml's first [[enqueue]]), its units clipped to this space.
START = """
[[enqueue]]
cell = "LSTM"
units = 96
optimizer = "adam"
learning_rate = 0.001
"""


def run_tuner(tmp: Path, seed: int, *, budget: int, epochs: int, subset: int, start: bool = False) -> dict:
    import optuna
    from optuna.trial import TrialState

    from tuner import runner

    study_file = tmp / "space.toml"
    study_file.write_text(SPACE.format(epochs=epochs, subset=subset, pruner=PRUNER, enqueue=START if start else ""))
    url, name = f"sqlite:///{tmp}/tuner-{seed}.db", f"vs-kt-{seed}"
    t0, n, spent = time.perf_counter(), 0, 0
    while spent < budget:  # resumable: each call adds trials to the same study
        n += 4
        runner.run_study(str(study_file), kind="search", storage=url, n_trials=n, seed=seed, study_name=name)
        study = optuna.load_study(study_name=name, storage=url)
        spent = sum(t.user_attrs.get("epochs_run", 0) for t in study.trials if t.state.is_finished())
    wall = time.perf_counter() - t0
    timeline = []
    for t in sorted((t for t in study.trials if t.state.is_finished()), key=lambda t: t.number):
        score = t.value if t.state == TrialState.COMPLETE else None
        per_epoch = [t.intermediate_values[k] for k in sorted(t.intermediate_values)]
        measured = max(per_epoch, default=None)  # pruned trials' epochs too, as KerasTuner
        timeline.append((t.user_attrs.get("epochs_run", 0), score, measured, per_epoch))
    label = f"tuner search (TPE + {PRUNER}{', document start' if start else ''})"
    return _summary(label, seed, timeline, wall)


def run_kerastuner(tmp: Path, seed: int, method: str, *, splits, epochs: int, bayes_trials: int) -> dict:
    import keras_tuner as kt

    from tuner import models

    def build(hp):
        config = models.ModelConfig(
            cell=hp.Choice("cell", ["SimpleRNN", "LSTM", "GRU"]),
            units=hp.Int("units", 16, 96, sampling="log"),
            learning_rate=hp.Float("learning_rate", 1e-4, 1e-1, sampling="log"),
            optimizer=hp.Choice("optimizer", ["adam", "rmsprop", "sgd"]),
        )
        return models.build_model(config, seed=seed)

    common = {"objective": "val_accuracy", "seed": seed, "directory": str(tmp), "overwrite": True,
              "project_name": f"{method}-{seed}"}  # fmt: skip
    if method == "hyperband":
        tuner = kt.Hyperband(build, max_epochs=epochs, factor=3, hyperband_iterations=1, **common)
    else:
        tuner = kt.BayesianOptimization(build, max_trials=bayes_trials, **common)
    recorder = _EpochRecorder()
    t0 = time.perf_counter()
    tuner.search(splits.x_train, splits.y_train, epochs=epochs, batch_size=128, verbose=0,
                 validation_data=(splits.x_val, splits.y_val), callbacks=[recorder])  # fmt: skip
    wall = time.perf_counter() - t0
    timeline = []
    trials = sorted(tuner.oracle.trials.values(), key=lambda t: int(t.trial_id))
    if len(recorder.fits) != len(trials):  # one fit a trial, run one after another in trial order
        raise RuntimeError(f"{len(recorder.fits)} fits recorded for {len(trials)} trials")
    for trial, per_epoch in zip(trials, recorder.fits):
        values = trial.hyperparameters.values
        trained = values.get("tuner/epochs", epochs) - values.get("tuner/initial_epoch", 0)
        if len(per_epoch) != trained:
            raise RuntimeError(f"trial {trial.trial_id}: {len(per_epoch)} epochs recorded, {trained} trained")
        # a trial's score: its best epoch's val_accuracy
        timeline.append((trained, trial.score, trial.score, per_epoch))
    label = {"hyperband": "KerasTuner Hyperband", "bayes": "KerasTuner BayesianOptimization"}[method]
    return _summary(label, seed, timeline, wall)


def _epoch_recorder_class():
    import keras

    class EpochRecorder(keras.callbacks.Callback):
        """Every epoch's val_accuracy, a list per `fit` (KerasTuner runs one fit a trial, in trial order). KerasTuner
        deep-copies the callbacks for each trial: every copy is this one object."""

        def __init__(self) -> None:
            super().__init__()
            self.fits: list[list[float]] = []

        def __deepcopy__(self, memo):
            return self

        def on_train_begin(self, logs=None):
            self.fits.append([])

        def on_epoch_end(self, epoch, logs=None):
            self.fits[-1].append(float(logs["val_accuracy"]))

    return EpochRecorder


def _EpochRecorder():  # noqa: N802 - a factory standing in for the class, defined once keras is imported
    return _epoch_recorder_class()()


def _summary(method: str, seed: int, timeline: list, wall: float) -> dict:
    """`timeline`: (epochs trained, the trial's score as the tool reports it, the best validation accuracy measured
    at any of its epochs, every epoch's validation accuracy) per trial, in order. Three curves of the best so far
    against epochs spent: by score and measured (a point per trial), per epoch (a point per epoch)."""
    spent, best, measured_best, curve, measured_curve = 0, None, None, [], []
    epoch_best, epoch_curve = None, []
    for epochs, score, measured, per_epoch in timeline:
        for i in range(epochs):
            if i < len(per_epoch) and (epoch_best is None or per_epoch[i] > epoch_best):
                epoch_best = per_epoch[i]
            epoch_curve.append((spent + i + 1, epoch_best))
        spent += epochs
        if score is not None and (best is None or score > best):
            best = score
        if measured is not None and (measured_best is None or measured > measured_best):
            measured_best = measured
        curve.append((spent, best))
        measured_curve.append((spent, measured_best))
    return {"method": method, "seed": seed, "trials": len(timeline), "epochs_spent": spent, "wall_s": wall,
            "best_val_accuracy": best, "curve": curve, "best_measured": measured_best,
            "curve_measured": measured_curve, "curve_per_epoch": epoch_curve}  # fmt: skip


READINGS = (
    "epochs_to_target",
    "epochs_to_high_target",
    "epochs_to_target_measured",
    "epochs_to_high_target_measured",
    "epochs_to_target_per_epoch",
    "epochs_to_high_target_per_epoch",
)


def epochs_to(curve: list, target: float) -> int | None:
    return next((spent for spent, best in curve if best is not None and best >= target - 1e-12), None)


def plot(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {}
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for r in runs:
        color = colors.setdefault(r["method"], f"C{len(colors)}")
        xs = [x for x, y in r["curve"] if y is not None]
        ys = [100 * y for x, y in r["curve"] if y is not None]
        label = r["method"] if r["seed"] == runs[0]["seed"] else None
        ax.step(xs, ys, where="post", color=color, alpha=0.8, label=label)
    ax.set_xlabel("epochs spent")
    ax.set_ylabel("best validation accuracy so far (%)")
    ax.set_title("tuner search vs KerasTuner (one line per seed)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def main() -> None:
    p = benchlib.parser(__doc__.split("\n\n")[0])
    p.add_argument("--plot", default=str(Path(__file__).with_name("vs_kerastuner.png")), help="PNG to write")
    p.add_argument("--seeds", type=int, default=5, help="seeds 0..N-1 (default 5)")
    p.add_argument("--from-json", metavar="PATH", help="finish a run that was cut short, from its partial JSON")
    p.add_argument("--pruner", help=f"tuner search's pruner (default: its default, {DEFAULT_SEARCH_PRUNER})")
    args = p.parse_args()
    global PRUNER
    PRUNER = args.pruner or DEFAULT_SEARCH_PRUNER
    if args.from_json:
        partial = json.loads(Path(args.from_json).read_text())
        defaults = {"budget_epochs": 70, "max_epochs": 9, "subset": 1_000}  # a partial file written before the meta
        meta = {k: partial.get(k, v) for k, v in defaults.items()}
        methods = {r["method"] for r in partial["runs"]}
        whole = sorted(s for s in {r["seed"] for r in partial["runs"]}
                       if {r["method"] for r in partial["runs"] if r["seed"] == s} == methods)  # fmt: skip
        meta["seeds"] = whole  # only seeds that every method finished are compared
        meta["dropped_runs"] = [{k: r[k] for k in ("method", "seed", "epochs_spent", "best_val_accuracy", "wall_s")}
                                for r in partial["runs"] if r["seed"] not in whole]  # fmt: skip
        return finish([r for r in partial["runs"] if r["seed"] in whole], partial["machine"], meta, args)
    machine = benchlib.machine()
    print(f"machine: {machine}")
    from tuner import data

    if args.quick:
        seeds, subset, epochs, budget, bayes_trials = [0], 600, 3, 12, 4
    else:
        seeds, subset, epochs, budget, bayes_trials = list(range(args.seeds)), 1_000, 9, 70, 8
    runs = []
    meta = {"budget_epochs": budget, "max_epochs": epochs, "subset": subset, "seeds": seeds}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in seeds:
            splits = data.load(subset=subset, validation=True, seed=seed)
            for method in ("tuner", "tuner-start", "hyperband", "bayes"):
                where = Path(tmp) / f"{method}-{seed}"
                where.mkdir()
                if method.startswith("tuner"):
                    r = run_tuner(where, seed, budget=budget, epochs=epochs, subset=subset, start=method != "tuner")
                else:
                    r = run_kerastuner(where, seed, method, splits=splits, epochs=epochs, bayes_trials=bayes_trials)
                runs.append(r)
                print(f"seed {seed} {r['method']}: {r['trials']} trials, {r['epochs_spent']} epochs, "
                      f"{r['wall_s']:.0f}s, best {100 * r['best_val_accuracy']:.2f}%", flush=True)  # fmt: skip
                benchlib.write_json(args.json, {"machine": machine, "partial": True, "runs": runs, **meta})
    finish(runs, machine, meta, args)


def _median(values: list) -> float:
    """Median, an unreached target counting as infinitely many epochs."""
    return statistics.median(float("inf") if v is None else v for v in values)


def finish(runs: list[dict], machine: dict, meta: dict, args) -> None:
    """Targets, epochs to reach them, the table and the picture, from the runs (complete or cut short)."""
    low = min(r["best_val_accuracy"] for r in runs)
    high = statistics.median(r["best_val_accuracy"] for r in runs)
    for r in runs:
        r["epochs_to_target"] = epochs_to(r["curve"], low)
        r["epochs_to_high_target"] = epochs_to(r["curve"], high)
        # The same targets, on the best validation accuracy measured at any epoch of any trial (KerasTuner's own
        # score is that already; for tuner it counts pruned trials' epochs, as KerasTuner's stopped trials count).
        measured = r.get("curve_measured", r["curve"])
        r["epochs_to_target_measured"] = epochs_to(measured, low)
        r["epochs_to_high_target_measured"] = epochs_to(measured, high)
        per_epoch = r.get("curve_per_epoch")
        r["epochs_to_target_per_epoch"] = epochs_to(per_epoch, low) if per_epoch else None
        r["epochs_to_high_target_per_epoch"] = epochs_to(per_epoch, high) if per_epoch else None
    methods = list(dict.fromkeys(r["method"] for r in runs))
    table = {}
    print(f"\ntargets: {100 * low:.2f}% (the lowest best of all runs), {100 * high:.2f}% (the median best)")
    for m in methods:
        mine = [r for r in runs if r["method"] == m]
        table[m] = {"seeds": [r["seed"] for r in mine]}
        for key in READINGS:
            table[m][key] = [r.get(key) for r in mine]
            table[m][f"median_{key}"] = _median(table[m][key])
        table[m] |= {
            "best": [r["best_val_accuracy"] for r in mine],
            "mean_best": statistics.mean(r["best_val_accuracy"] for r in mine),
            "epochs_spent": [r["epochs_spent"] for r in mine],
            "wall_s": [r["wall_s"] for r in mine],
        }
        t = table[m]
        best = ", ".join(f"{100 * b:.2f}" for b in t["best"])
        print(f"{m:34} seeds {t['seeds']}: epochs to {100 * low:.2f}%: {t['epochs_to_target']}, to "
              f"{100 * high:.2f}%: {t['epochs_to_high_target']}; best {best}% "
              f"(mean {100 * t['mean_best']:.2f}); {t['epochs_spent']} epochs, "
              f"{', '.join(f'{w:.0f}' for w in t['wall_s'])}s")  # fmt: skip
    ratios = {}
    for ours in (m for m in methods if m.startswith("tuner")):
        for m in (m for m in methods if not m.startswith("tuner")):
            print(f"\n{ours} against {m} (median epochs; goal: a ratio <= 0.5)")
            for key in READINGS:
                mine, theirs = table[ours][f"median_{key}"], table[m][f"median_{key}"]
                ratio = None if math.isinf(theirs) else mine / theirs
                ratios[f"{ours} / {m} / {key}"] = ratio
                shown = "KerasTuner did not reach it in most seeds" if ratio is None else f"ratio {ratio:.2f}"
                print(f"  {key:36} tuner {mine:>5} {m.split()[-1]} {theirs:>5}: {shown}")
    payload = {"machine": machine, "target": low, "high_target": high, **meta, "table": table, "ratios": ratios,
               "runs": runs}  # fmt: skip
    benchlib.write_json(args.json, payload)
    if not args.quick:
        plot(runs, Path(args.plot))


if __name__ == "__main__":
    main()
