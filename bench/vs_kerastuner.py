"""tuner search against KerasTuner's Hyperband and BayesianOptimization: same space, data and epoch budget.

    pip install -e '.[bench]'                                            # keras-tuner, for this benchmark only
    python bench/vs_kerastuner.py --json bench/results/vs_kerastuner.json    # about 30 minutes on 2 cores
    python bench/vs_kerastuner.py --quick

Space: cell (SimpleRNN/LSTM/GRU), units 16..96 (log), learning rate 1e-4..1e-1 (log), optimizer adam/rmsprop/sgd;
batch 128; at most 9 epochs a trial. Data: for seed s, the 1,000 training and 166 validation images that
`tuner search --subset 1000 --seed s` trains on (tuner.data.load), handed to KerasTuner as arrays. Models:
every method builds them with `tuner.models.build_model`, so only the search differs.

Budget: one Hyperband iteration of KerasTuner (max_epochs 9, factor 3: about 70 epochs); BayesianOptimization
gets 8 trials of 9 epochs (72); tuner search (TPE + its default pruner, through
`tuner.runner.run_study`) gets trials until it has spent 70 epochs. Epochs are counted from each tool's own
records (KerasTuner: `tuner/epochs - tuner/initial_epoch` of each Hyperband trial; tuner: `epochs_run`).
Accuracy is what each tool reports as a trial's score: KerasTuner the best epoch's val_accuracy, tuner the last
epoch's (pruned trials count their epochs but no score). The target is the lowest of all runs' best scores, so
that every run reaches it; "epochs to target" is the epochs spent when a run's best score first reached it.
A second reading (`*_measured`) uses one definition for every tool: the best validation accuracy measured at any
epoch of any trial so far. KerasTuner's score already is that (Hyperband's trials stopped after 1 or 3 epochs
score too); for tuner it adds the epochs of pruned trials, which its own score leaves out.
"""

from __future__ import annotations

import json
import math
import statistics
import tempfile
import time
from pathlib import Path

import benchlib

from tuner.spec import DEFAULT_SEARCH_PRUNER as PRUNER  # tuner search's default pruner

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
"""


def run_tuner(tmp: Path, seed: int, *, budget: int, epochs: int, subset: int) -> dict:
    import optuna
    from optuna.trial import TrialState

    from tuner import runner

    study_file = tmp / "space.toml"
    study_file.write_text(SPACE.format(epochs=epochs, subset=subset, pruner=PRUNER))
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
        measured = max(t.intermediate_values.values(), default=None)  # pruned trials' epochs too, as KerasTuner
        timeline.append((t.user_attrs.get("epochs_run", 0), score, measured))
    return _summary(f"tuner search (TPE + {PRUNER})", seed, timeline, wall)


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
    t0 = time.perf_counter()
    tuner.search(splits.x_train, splits.y_train, epochs=epochs, batch_size=128, verbose=0,
                 validation_data=(splits.x_val, splits.y_val))  # fmt: skip
    wall = time.perf_counter() - t0
    timeline = []
    for trial in sorted(tuner.oracle.trials.values(), key=lambda t: int(t.trial_id)):
        values = trial.hyperparameters.values
        trained = values.get("tuner/epochs", epochs) - values.get("tuner/initial_epoch", 0)
        timeline.append((trained, trial.score, trial.score))  # a trial's score: its best epoch's val_accuracy
    label = {"hyperband": "KerasTuner Hyperband", "bayes": "KerasTuner BayesianOptimization"}[method]
    return _summary(label, seed, timeline, wall)


def _summary(method: str, seed: int, timeline: list, wall: float) -> dict:
    """`timeline`: (epochs trained, the trial's score as the tool reports it, the best validation accuracy measured
    at any of its epochs) per trial, in order. Two curves of the best so far against epochs spent."""
    spent, best, measured_best, curve, measured_curve = 0, None, None, [], []
    for epochs, score, measured in timeline:
        spent += epochs
        if score is not None and (best is None or score > best):
            best = score
        if measured is not None and (measured_best is None or measured > measured_best):
            measured_best = measured
        curve.append((spent, best))
        measured_curve.append((spent, measured_best))
    return {"method": method, "seed": seed, "trials": len(timeline), "epochs_spent": spent, "wall_s": wall,
            "best_val_accuracy": best, "curve": curve, "best_measured": measured_best,
            "curve_measured": measured_curve}  # fmt: skip


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
    p.add_argument("--from-json", metavar="PATH", help="finish a run that was cut short, from its partial JSON")
    args = p.parse_args()
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
    benchlib.quiet_tf()
    machine = benchlib.machine()
    print(f"machine: {machine}")
    from tuner import data

    if args.quick:
        seeds, subset, epochs, budget, bayes_trials = [0], 600, 3, 12, 4
    else:
        seeds, subset, epochs, budget, bayes_trials = [0, 1, 2], 1_000, 9, 70, 8
    runs = []
    meta = {"budget_epochs": budget, "max_epochs": epochs, "subset": subset, "seeds": seeds}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in seeds:
            splits = data.load(subset=subset, validation=True, seed=seed)
            for method in ("tuner", "hyperband", "bayes"):
                where = Path(tmp) / f"{method}-{seed}"
                where.mkdir()
                if method == "tuner":
                    r = run_tuner(where, seed, budget=budget, epochs=epochs, subset=subset)
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
    methods = list(dict.fromkeys(r["method"] for r in runs))
    table = {}
    print(f"\ntargets: {100 * low:.2f}% (the lowest best of all runs), {100 * high:.2f}% (the median best)")
    for m in methods:
        mine = [r for r in runs if r["method"] == m]
        table[m] = {
            "seeds": [r["seed"] for r in mine],
            "epochs_to_target": [r["epochs_to_target"] for r in mine],
            "median_epochs_to_target": _median([r["epochs_to_target"] for r in mine]),
            "epochs_to_high_target": [r["epochs_to_high_target"] for r in mine],
            "median_epochs_to_high_target": _median([r["epochs_to_high_target"] for r in mine]),
            "epochs_to_target_measured": [r["epochs_to_target_measured"] for r in mine],
            "median_epochs_to_target_measured": _median([r["epochs_to_target_measured"] for r in mine]),
            "epochs_to_high_target_measured": [r["epochs_to_high_target_measured"] for r in mine],
            "median_epochs_to_high_target_measured": _median([r["epochs_to_high_target_measured"] for r in mine]),
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
    ours = table[methods[0]]
    for m in methods[1:]:
        for key in (
            "median_epochs_to_target",
            "median_epochs_to_high_target",
            "median_epochs_to_target_measured",
            "median_epochs_to_high_target_measured",
        ):
            if math.isinf(table[m][key]):
                print(f"{m} did not reach it in most seeds ({key}: median not reached); tuner: {ours[key]}")
            else:
                print(f"tuner needs {ours[key] / table[m][key]:.2f}x the epochs of {m} ({key}; goal <= 0.5)")
    payload = {"machine": machine, "target": low, "high_target": high, **meta, "table": table, "runs": runs}
    benchlib.write_json(args.json, payload)
    if not args.quick:
        plot(runs, Path(args.plot))


if __name__ == "__main__":
    main()
