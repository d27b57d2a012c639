"""What the default pruner (Hyperband) saves: the same search with and without it, same seed.

    python bench/pruning.py --json bench/results/pruning.json      # about 20 minutes on 2 cores
    python bench/pruning.py --quick

The search space is studies/search.toml's, made smaller so that 60 trials fit twice in the time: one recurrent
layer of 16..96 units (the three cells), adam/rmsprop/sgd, learning rate 1e-4..1e-1, batch 64/128/256; the
search's own 12 epochs and validation on 5,000 training images (833 held out). Both runs go through
`tuner.runner.run_study` (what `tuner search` runs): TPE with seed 0, once with `--pruner hyperband` (the
default) and once with `--pruner none`. Figures: epochs trained (the trials' own `epochs_run`), wall time, best
validation accuracy. The picture (bench/pruning.png) is the best validation accuracy so far against epochs spent.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import benchlib

SPACE = """
[study]
kind = "search"
description = "pruning benchmark: search.toml's space, smaller"
[training]
epochs = {epochs}
validation = true
[data]
subset = {subset}
[search.learning_rate]
type = "float"
low = 1e-4
high = 1e-1
log = true
[search.batch_size]
choices = [64, 128, 256]
[search.units]
type = "int"
low = 16
high = 96
log = true
[search.cell]
choices = ["SimpleRNN", "LSTM", "GRU"]
[search.optimizer]
choices = ["adam", "rmsprop", "sgd"]
[sampler]
name = "tpe"
"""


def run(tmp: Path, pruner: str, *, trials: int, epochs: int, subset: int) -> dict:
    import optuna
    from optuna.trial import TrialState

    from tuner import runner

    study_file = tmp / "space.toml"
    study_file.write_text(SPACE.format(epochs=epochs, subset=subset))
    url = f"sqlite:///{tmp}/pruning.db"
    name = f"pruning-{pruner}"
    t0 = time.perf_counter()
    runner.run_study(str(study_file), kind="search", storage=url, n_trials=trials, pruner=pruner, seed=0,
                     study_name=name)  # fmt: skip
    wall = time.perf_counter() - t0
    study = optuna.load_study(study_name=name, storage=url)
    finished = [t for t in study.trials if t.state.is_finished()]
    spent, curve, best = 0, [], float("-inf")
    for t in sorted(finished, key=lambda t: t.datetime_complete):
        spent += t.user_attrs.get("epochs_run", 0)
        if t.state == TrialState.COMPLETE and t.value is not None and t.value > best:
            best = t.value
        curve.append((spent, best if best > float("-inf") else None))
    states = {s.name.lower(): sum(t.state == s for t in finished) for s in TrialState}
    return {
        "pruner": pruner,
        "trials": len(finished),
        "states": {k: v for k, v in states.items() if v},
        "epochs_spent": spent,
        "epochs_max": len(finished) * epochs,
        "wall_s": wall,
        "best_val_accuracy": study.best_value,
        "best_params": study.best_params,
        "curve": curve,
    }


def plot(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for r in runs:
        xs = [x for x, y in r["curve"] if y is not None]
        ys = [100 * y for x, y in r["curve"] if y is not None]
        ax.step(xs, ys, where="post", label=f"pruner {r['pruner']}: {r['epochs_spent']} epochs, {r['wall_s']:.0f}s")
    ax.set_xlabel("epochs spent (all trials)")
    ax.set_ylabel("best validation accuracy so far (%)")
    ax.set_title(f"tuner search, {runs[0]['trials']} trials, TPE seed 0")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def main() -> None:
    p = benchlib.parser(__doc__.split("\n\n")[0])
    p.add_argument("--plot", default=str(Path(__file__).with_name("pruning.png")), help="PNG to write")
    args = p.parse_args()
    benchlib.quiet_tf()
    machine = benchlib.machine()
    print(f"machine: {machine}")
    size = {"trials": 8, "epochs": 4, "subset": 1_200} if args.quick else {"trials": 60, "epochs": 12, "subset": 5_000}
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for pruner in ("hyperband", "none"):
            r = run(Path(tmp), pruner, **size)
            runs.append(r)
            print(f"pruner {pruner}: {r['trials']} trials {r['states']}, {r['epochs_spent']} of {r['epochs_max']} "
                  f"epochs, {r['wall_s']:.0f}s, best validation accuracy {100 * r['best_val_accuracy']:.2f}%",
                  flush=True)  # fmt: skip
    pruned, full = runs
    saved = 1 - pruned["epochs_spent"] / full["epochs_spent"]
    wall_saved = 1 - pruned["wall_s"] / full["wall_s"]
    gap = 100 * (full["best_val_accuracy"] - pruned["best_val_accuracy"])
    print(f"epochs saved {100 * saved:.1f}% (goal >= 60%), wall time saved {100 * wall_saved:.1f}%, best "
          f"{gap:+.2f} points behind the unpruned search (goal <= 0.2)")  # fmt: skip
    summary = {"epochs_saved": saved, "wall_saved": wall_saved, "best_gap_points": gap, **size}
    benchlib.write_json(args.json, {"machine": machine, "summary": summary, "runs": runs})
    if not args.quick:
        plot(runs, Path(args.plot))


if __name__ == "__main__":
    main()
