"""Two checkouts of tuner's shipped training path, epochs alternating: what a change to the path does to epoch
time, and whether the figures it computes stay the same to the last digit.

    python bench/ab_paths.py --base REV --steps 1 --steps 32 --json bench/results/ab_paths.json   # ~9 min, 2 cores
    python bench/ab_paths.py --base REV --quick

Each side is a process that imports tuner from its own checkout: `base` from a clone of commit REV in a temporary
directory, `head` from this working tree, and `head@K` (one per `--steps K`) from this tree with its models
running K train steps per call (`steps_per_execution`). Every side builds the goal-1 models with `build_model`
(seed 0, as `bench/train_speed.py`), warms each up, then trains one epoch of `models.train` on command. The
parent asks every side for the same epoch (same config, same seed) in turn, the order reversed every other round,
so the sides share the machine's load; one side's epoch runs while the others wait. Per config: each side's
median epoch seconds, base's epoch over each side's per round and their median, and whether each side's loss,
mean accuracy and last-batch accuracy equal base's in every round.

`--search-seeds N` then runs, on each side in turn, `bench/vs_kerastuner.py`'s search with the document's start
(TPE and the default pruner on 1,000 images, 70 epochs, a model built for most trials) for seeds 0..N-1: small
searches, where a model's tracing weighs most against its epochs. `--rounds 0` runs only the searches.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CONFIGS = [("SimpleRNN", 128, 256), ("LSTM", 100, 128), ("GRU", 128, 128)]  # bench/train_speed.py's goal 1
N_FULL, N_QUICK = 60_000, 5_984
FIGURES = ("loss", "accuracy", "last_batch_accuracy")
REPLY = "AB "  # the prefix of a child's answers on its stdout


def child(root: str, steps: int | None) -> None:
    """A side: tuner from `root`; reads one JSON request a line, answers each on stdout after REPLY."""
    sys.path.insert(0, root)
    from tuner import data, models

    if not str(Path(models.__file__).resolve()).startswith(str(Path(root).resolve())):
        raise SystemExit(f"tuner came from {models.__file__}, not from {root}")
    models.limit_malloc_arenas()  # as every worker does
    full = data.load()
    built: dict = {}
    for line in sys.stdin:
        job = json.loads(line)
        if job.get("search"):
            print(REPLY + json.dumps(search(job["seed"])), flush=True)
            continue
        key = (job["cell"], job["units"], job["batch_size"])
        n, bs = job["n"], job["batch_size"]
        if key not in built:
            model = models.build_model(models.ModelConfig(cell=job["cell"], units=job["units"]), seed=0)
            if steps is not None:
                model.steps_per_execution = steps  # read when `fit` first traces the train step ...
                model.make_train_function()  # ... and kept: tuner's `train` chooses only for untraced models
            else:
                import benchlib  # tuner is this side's already

                benchlib.as_in_a_trial(model, n, bs)
            warm_n = 4 * bs + n % bs  # a few batches and the partial last one: the steps are traced here
            warm = data.Splits(full.x_train[:warm_n], full.y_train[:warm_n], None, None, None, None, full.source)
            t = time.perf_counter()
            models.train(model, warm, batch_size=bs, epochs=1, seed=0, evaluate_test=False)
            train = data.Splits(full.x_train[:n], full.y_train[:n], None, None, None, None, full.source)
            built[key] = (model, train, time.perf_counter() - t)
        model, train, first_s = built[key]
        t = time.perf_counter()
        result = models.train(model, train, batch_size=bs, epochs=1, seed=job["seed"], evaluate_test=False)
        call_s = time.perf_counter() - t
        epoch = result.epochs[0]
        reply = {"seconds": epoch.seconds, "train_call_s": call_s, "first_call_s": first_s,
                 "steps_per_execution": getattr(model, "steps_per_execution", 1),
                 **{k: getattr(epoch, k) for k in FIGURES}}  # fmt: skip
        print(REPLY + json.dumps(reply), flush=True)


def search(seed: int) -> dict:
    """bench/vs_kerastuner.py's tuner arm with the document's start, in this side's process."""
    import tempfile

    from vs_kerastuner import run_tuner  # this script's folder; tuner is already this side's

    with tempfile.TemporaryDirectory() as tmp:
        r = run_tuner(Path(tmp), seed, budget=70, epochs=9, subset=1_000, start=True)
    return {k: r[k] for k in ("wall_s", "trials", "epochs_spent", "curve_per_epoch")}


def searches(sides: list[Side], seeds: int) -> dict:
    runs = {s.name: [] for s in sides}
    for seed in range(seeds):
        for side in sides if seed % 2 == 0 else list(reversed(sides)):
            got = side.epoch({"search": True, "seed": seed})
            runs[side.name].append({"seed": seed, **got})
            print(f"  search seed {seed} {side.name:>9}: {got['wall_s']:.1f} s, {got['trials']} trials, "
                  f"{got['epochs_spent']} epochs", flush=True)  # fmt: skip
    base = runs[sides[0].name]
    out = {}
    for name, rows in runs.items():
        ratios = [b["wall_s"] / r["wall_s"] for b, r in zip(base, rows, strict=True)]
        out[name] = {"wall_s": [r["wall_s"] for r in rows], "speedup": statistics.median(ratios),
                     "per_seed": ratios, "total_s": sum(r["wall_s"] for r in rows),
                     "same_trials_as_base": all(b["curve_per_epoch"] == r["curve_per_epoch"]
                                                for b, r in zip(base, rows, strict=True)),
                     "runs": rows}  # fmt: skip
    return out


class Side:
    def __init__(self, name: str, root: str, steps: int | None) -> None:
        self.name = name
        argv = [sys.executable, __file__, "--child", root] + ([] if steps is None else ["--child-steps", str(steps)])
        env = {**os.environ, "PYTHONPATH": root, "TF_CPP_MIN_LOG_LEVEL": "2"}
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd=root)

    def epoch(self, job: dict) -> dict:
        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()
        for line in self.proc.stdout:
            if line.startswith(REPLY):
                return json.loads(line[len(REPLY) :])
        raise SystemExit(f"side {self.name} ended (exit code {self.proc.wait()})")

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


def checkout(rev: str, into: str) -> str:
    """A clone of this repository at `rev` in `into`."""
    root = Path(__file__).resolve().parent.parent
    subprocess.run(["git", "clone", "-q", "--no-checkout", str(root), into], check=True)
    subprocess.run(["git", "-C", into, "checkout", "-q", rev], check=True)
    return subprocess.run(["git", "-C", into, "rev-parse", "--short", "HEAD"], check=True, capture_output=True,
                          text=True).stdout.strip()  # fmt: skip


def measure(sides: list[Side], *, n: int, rounds: int) -> list[dict]:
    rows = {cfg: {s.name: [] for s in sides} for cfg in CONFIGS}
    for r in range(-1, rounds):  # round -1: every side builds and warms up every model, untimed
        for cell, units, bs in CONFIGS:
            for side in sides if r % 2 == 0 else list(reversed(sides)):
                got = side.epoch({"cell": cell, "units": units, "batch_size": bs, "n": n, "seed": max(r, 0)})
                if r >= 0:
                    rows[(cell, units, bs)][side.name].append({"round": r, **got})
                    print(f"  round {r} {cell}-{units} {side.name:>9}: {got['seconds']:.3f} s "
                          f"loss {got['loss']:.6f}", flush=True)  # fmt: skip
    out = []
    for (cell, units, bs), by_side in rows.items():
        base = by_side[sides[0].name]
        entry = {"config": f"{cell}-{units} batch {bs}", "n_train": n, "sides": {}}
        for name, epochs in by_side.items():
            ratios = [b["seconds"] / e["seconds"] for b, e in zip(base, epochs, strict=True)]
            same = all(all(b[k] == e[k] for k in FIGURES) for b, e in zip(base, epochs, strict=True))
            entry["sides"][name] = {
                "median_s": statistics.median(e["seconds"] for e in epochs),
                "speedup": statistics.median(ratios),
                "per_round": ratios,
                "same_figures_as_base": same,
                "first_call_s": epochs[0]["first_call_s"],
                "steps_per_execution": epochs[0]["steps_per_execution"],
                "epochs": epochs,
            }
        out.append(entry)
    return out


def main() -> None:
    args = sys.argv[1:]
    if args[:1] == ["--child"]:  # before benchlib, which imports this tree's tuner
        steps = int(args[3]) if args[2:3] == ["--child-steps"] else None
        return child(args[1], steps)
    import benchlib

    parser = benchlib.parser(__doc__)
    parser.add_argument("--base", required=True, help="the commit to compare this working tree with")
    parser.add_argument("--steps", type=int, action="append", default=[],
                        help="also a head side whose models run K train steps per call (repeatable)")  # fmt: skip
    parser.add_argument("--rounds", type=int, default=7, help="rounds of epochs (0: none)")
    parser.add_argument("--search-seeds", type=int, default=0, help="also small searches, seeds 0..N-1")
    opts = parser.parse_args()
    n, rounds = (N_QUICK, 2) if opts.quick else (N_FULL, opts.rounds)
    info = benchlib.machine()  # its load average before the sides start
    with tempfile.TemporaryDirectory() as tmp:
        base = checkout(opts.base, tmp)
        sides = [Side("base", tmp, None), Side("head", str(benchlib.ROOT), None)]
        sides += [Side(f"head@{k}", str(benchlib.ROOT), k) for k in opts.steps]
        try:
            configs = measure(sides, n=n, rounds=rounds) if rounds else []
            found = searches(sides, opts.search_seeds) if opts.search_seeds else {}
        finally:
            for side in sides:
                side.close()
    print(f"\nbase {base} against this tree")
    if configs:
        print(f"epochs of {n:,} images, medians of {rounds} rounds")
        print(f"{'config':<24}{'side':>10}{'epoch s':>10}{'base/side':>11}{'per round':>16}  same figures")
    for entry in configs:
        for name, s in entry["sides"].items():
            print(f"{entry['config']:<24}{name:>10}{s['median_s']:>10.3f}{s['speedup']:>10.2f}x"
                  f"{min(s['per_round']):>8.2f}-{max(s['per_round']):.2f}x  {s['same_figures_as_base']}")  # fmt: skip
    if found:
        print(f"\nsearches (seeds 0-{opts.search_seeds - 1}): wall seconds a search")
        for name, f in found.items():
            walls = ", ".join(f"{w:.1f}" for w in f["wall_s"])
            print(f"{name:>10}: {walls}; total {f['total_s']:.1f} s; base/side {f['speedup']:.2f}x "
                  f"(median of seeds); the same trials as base: {f['same_trials_as_base']}")  # fmt: skip
    benchlib.write_json(opts.json, {"machine": info, "base": base, "rounds": rounds, "configs": configs,
                                    "searches": found})  # fmt: skip


if __name__ == "__main__":
    main()
