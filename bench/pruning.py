"""What the default pruner saves: the same search with and without it, same seed.

    python bench/pruning.py --json bench/results/pruning.json      # about 30 minutes on 2 idle cores
    python bench/pruning.py --pruners hyperband,successive-halving --json bench/results/pruning.json
    python bench/pruning.py --quick

The search space is studies/search.toml's, made smaller: one recurrent layer of 16..96 units (the three cells),
adam/rmsprop/sgd, learning rate 1e-4..1e-1, batch 64/128/256; the search's own 12 epochs and validation, on 6,000
training images (1,000 held out: one image is 0.1 points of accuracy). Every run goes through
`tuner.runner.run_study` (what `tuner search` runs): TPE with seed 0 (`--seed`), once with each pruner of
`--pruners` (the default pruner unless told) and once with `--pruner none`, side by side in one process each so
that all see the same machine load. Figures: epochs trained (the trials' own `epochs_run`), wall time, best
validation accuracy. The picture (bench/pruning.png) is the best validation accuracy so far against epochs spent.
`--trials N` sets the trials per run (100 by default), `--subset N` the training images, `--seed N` the search's
seed (the same for both runs). `--baseline FILE` takes the unpruned run from an earlier result of the same
seed instead of running it again (its epochs and best do not depend on the machine's speed; its wall time does).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import benchlib

from tuner.spec import DEFAULT_SEARCH_PRUNER

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


# Pruner settings that are not (yet) tuner options, measured here before one becomes the default: `--pruners`
# takes these names beside tuner's own.
EXPERIMENTS = {
    "successive-halving-rf4": {"cls": "SuccessiveHalvingPruner", "min_resource": 1, "reduction_factor": 4},
    "successive-halving-min2": {"cls": "SuccessiveHalvingPruner", "min_resource": 2, "reduction_factor": 3},
    "successive-halving-rf2": {"cls": "SuccessiveHalvingPruner", "min_resource": 1, "reduction_factor": 2},
    # keeps the top third of the trials at each epoch (the median pruner keeps the top half)
    "percentile-33": {"cls": "PercentilePruner", "percentile": 33.0, "n_startup_trials": 5, "n_warmup_steps": 1},
}


def run(tmp: Path, pruner: str, *, trials: int, epochs: int, subset: int, seed: int = 0) -> dict:

    from tuner import runner

    name = f"pruning-{pruner}"
    if pruner in EXPERIMENTS:  # the study is made with this pruner in place of tuner's successive halving
        import optuna

        from tuner import study as studies

        settings = dict(EXPERIMENTS[pruner])
        cls = getattr(optuna.pruners, settings.pop("cls"))
        studies.make_pruner = lambda spec: cls(**settings)
        pruner = "successive-halving"

    study_file = tmp / "space.toml"
    study_file.write_text(SPACE.format(epochs=epochs, subset=subset))
    url = f"sqlite:///{tmp}/pruning.db"
    t0 = time.perf_counter()
    runner.run_study(str(study_file), kind="search", storage=url, n_trials=trials, pruner=pruner, seed=seed,
                     study_name=name)  # fmt: skip
    wall = time.perf_counter() - t0
    return summarize(url, name, name.removeprefix("pruning-"), epochs=epochs, wall=wall)


def summarize(url: str, name: str, pruner: str, *, epochs: int, wall: float | None = None, limit=None) -> dict:
    """A run's figures from its database; with `limit`, over its first `limit` finished trials only (to compare
    two runs cut short at the same number of trials). Wall time is then the first `limit` trials' own."""
    import optuna
    from optuna.trial import TrialState

    study = optuna.load_study(study_name=name, storage=url)
    finished = sorted((t for t in study.trials if t.state.is_finished()), key=lambda t: t.number)[:limit]
    spent, curve, best, best_params = 0, [], float("-inf"), None
    for t in sorted(finished, key=lambda t: t.datetime_complete):
        spent += t.user_attrs.get("epochs_run", 0)
        if t.state == TrialState.COMPLETE and t.value is not None and t.value > best:
            best, best_params = t.value, t.params
        curve.append((spent, best if best > float("-inf") else None))
    if wall is None or limit is not None:
        wall = (max(t.datetime_complete for t in finished) - min(t.datetime_start for t in finished)).total_seconds()
    states = {s.name.lower(): sum(t.state == s for t in finished) for s in TrialState}
    return {
        "pruner": pruner,
        "trials": len(finished),
        "states": {k: v for k, v in states.items() if v},
        "epochs_spent": spent,
        "epochs_max": len(finished) * epochs,
        "wall_s": wall,
        "best_val_accuracy": best,
        "best_params": best_params,
        "curve": curve,
        "trial_curves": [_trial_curve(t) for t in finished],
    }


def _trial_curve(trial) -> dict:
    """A trial's validation accuracy per epoch, to replay other pruners on an unpruned run's curves."""
    values = [trial.intermediate_values[k] for k in sorted(trial.intermediate_values)]
    return {"number": trial.number, "state": trial.state.name.lower(), "params": trial.params, "values": values}


def plot(runs: list[dict], path: Path, seed: int = 0) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for r in runs:
        xs = [x for x, y in r["curve"] if y is not None]
        ys = [100 * y for x, y in r["curve"] if y is not None]
        wall = f"{r['wall_s']:.0f}s" + (" in an earlier run" if r.get("baseline") else "")
        ax.step(xs, ys, where="post", label=f"pruner {r['pruner']}: {r['epochs_spent']} epochs, {wall}")
    ax.set_xlabel("epochs spent (all trials)")
    ax.set_ylabel("best validation accuracy so far (%)")
    ax.set_title(f"tuner search, {runs[0]['trials']} trials, TPE seed {seed}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def main() -> None:
    p = benchlib.parser(__doc__.split("\n\n")[0])
    p.add_argument("--plot", default=str(Path(__file__).with_name("pruning.png")), help="PNG to write")
    p.add_argument("--trials", type=int, help="trials per run (default 100; --quick 8)")
    p.add_argument("--subset", type=int, help="training images, a sixth held out (default 6,000; --quick 1,200)")
    p.add_argument(
        "--pruners",
        default=DEFAULT_SEARCH_PRUNER,
        help="pruners to compare with none, comma-separated (default: tuner search's default)",
    )
    p.add_argument("--seed", type=int, default=0, help="the search's seed, the same for both runs (default 0)")
    p.add_argument("--baseline", metavar="JSON",
                   help="take the unpruned run from this earlier result of the same seed and size instead of "
                        "running it again")  # fmt: skip
    p.add_argument("--run", help=argparse_hidden())
    p.add_argument("--from-dbs", nargs=2, metavar=("HYPERBAND_DB", "NONE_DB"),
                   help="summarise two runs that were cut short, over the trials both finished")  # fmt: skip
    args = p.parse_args()
    size = {"trials": 8, "epochs": 4, "subset": 1_200} if args.quick else {"trials": 100, "epochs": 12, "subset": 6_000}
    size["seed"] = args.seed
    if args.trials:
        size["trials"] = args.trials
    if args.subset:
        size["subset"] = args.subset
    if args.run:  # one run, in its own process
        pruner, folder = json.loads(args.run)
        print(json.dumps(run(Path(folder), pruner, **size)), flush=True)
        return
    machine = benchlib.machine()
    print(f"machine: {machine}")
    if args.from_dbs:
        import optuna

        urls = [f"sqlite:///{db}" for db in args.from_dbs]
        names = ["pruning-hyperband", "pruning-none"]
        counts = [sum(t.state.is_finished() for t in optuna.load_study(study_name=n, storage=u).trials)
                  for n, u in zip(names, urls)]  # fmt: skip
        size["trials"] = min(counts)
        runs = [summarize(u, n, n.split("-")[1], epochs=size["epochs"], limit=min(counts)) for n, u in zip(names, urls)]
        return report(runs, size, machine, args)
    with tempfile.TemporaryDirectory() as tmp:
        # Both runs side by side, in two processes: they share the machine's load alike, and the pair takes
        # the time of the slower one.
        procs = {}
        baseline = _baseline(args.baseline, size) if args.baseline else None
        for pruner in [*args.pruners.split(","), *([] if baseline else ["none"])]:
            folder = Path(tmp) / pruner
            folder.mkdir()
            cmd = [sys.executable, __file__, "--run", json.dumps([pruner, str(folder)])]
            if args.quick:
                cmd.append("--quick")
            if args.trials:
                cmd += ["--trials", str(args.trials)]
            if args.subset:
                cmd += ["--subset", str(args.subset)]
            cmd += ["--seed", str(args.seed)]
            procs[pruner] = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
        runs = []
        for pruner, proc in procs.items():
            out, _ = proc.communicate()
            lines = [line for line in out.splitlines() if line.startswith("{")]
            if proc.returncode or not lines:
                raise SystemExit(f"the {pruner} run failed (exit {proc.returncode})")
            runs.append(json.loads(lines[-1]))
    report([*runs, baseline] if baseline else runs, size, machine, args)


def _baseline(path: str, size: dict) -> dict:
    """The unpruned run of an earlier result file (or a single run's JSON), checked to be the same search."""
    saved = json.loads(Path(path).read_text())
    run = next((r for r in saved.get("runs", []) if r["pruner"] == "none"), saved)
    summary = saved.get("summary", {})
    if run.get("pruner") != "none" or run["trials"] != size["trials"] or summary.get("seed", 0) != size["seed"]:
        raise SystemExit(f"{path}: no unpruned run of {size['trials']} trials with seed {size['seed']}")
    return {**run, "baseline": path}


def report(runs: list[dict], size: dict, machine: dict, args) -> None:
    for r in runs:
        print(f"pruner {r['pruner']}: {r['trials']} trials {r['states']}, {r['epochs_spent']} of {r['epochs_max']} "
              f"epochs, {r['wall_s']:.0f}s, best validation accuracy {100 * r['best_val_accuracy']:.2f}%")  # fmt: skip
    *pruned_runs, full = runs
    summaries = []
    for pruned in pruned_runs:
        saved = 1 - pruned["epochs_spent"] / full["epochs_spent"]
        # an unpruned run taken from an earlier result ran on another day's machine: its wall time is not compared
        wall_saved = None if getattr(args, "baseline", None) else 1 - pruned["wall_s"] / full["wall_s"]
        walls = "not compared" if wall_saved is None else f"{100 * wall_saved:.1f}%"
        gap = 100 * (full["best_val_accuracy"] - pruned["best_val_accuracy"])
        print(f"{pruned['pruner']}: epochs saved {100 * saved:.1f}% (goal >= 60%), wall time saved "
              f"{walls}, best {gap:+.2f} points behind the unpruned search (goal <= 0.2)")  # fmt: skip
        summaries.append({"pruner": pruned["pruner"], "epochs_saved": saved, "wall_saved": wall_saved,
                          "best_gap_points": gap, **size})  # fmt: skip
    benchlib.write_json(args.json, {"machine": machine, "summary": summaries[0], "summaries": summaries,
                                    "runs": runs})  # fmt: skip
    if not args.quick:
        plot(runs, Path(args.plot), args.seed)


def argparse_hidden():
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    main()
