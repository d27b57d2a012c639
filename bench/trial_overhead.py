"""Trial overhead (what a trial spends outside its training epochs) and a worker's memory over 20 trials.

    python bench/trial_overhead.py --json bench/results/trial_overhead.json    # about 5 minutes on 2 cores
    python bench/trial_overhead.py --quick

Overhead: a grid study file of two cells and two learning rates (SimpleRNN and LSTM at 128 units, learning rate
0.001 and 0.002, batch 128, 5 epochs, the 60,000 training images, test evaluation: how `tuner grid` runs the
document's grids, where most trials share their architecture with an earlier one) is run by
`tuner.runner.run_study` on a SQLite database, the product's path from the study file to the database. Each
architecture's first trial builds its model; its second trains the worker's kept model
(`tuner.models.ModelCache`), reset. A trial's wall time is the database's own (`datetime_start` when the worker
takes it, `datetime_complete` when its result is stored); the training epochs are the recorder's per-epoch
seconds. Build (`models.build_model`) is timed by wrapping it; test evaluation and fit set-up come from the
trial's attributes; the rest (resetting a kept model, the best model's upload, parameters, attributes, database
writes) is what remains. The first epoch includes tracing the train step (on a built model): its excess over the
mean of the later epochs is reported as tracing, and counted as overhead in the strict share.

Memory: 20 consecutive trials of a small search (random sampler, no pruner, SimpleRNN/LSTM/GRU of different
sizes, 1,200 images, 2 epochs) in one worker, again through `run_study`, then the same 20 models again in the
same order (queued into the study when the 20th ends), so that the second pass's peaks compare with the first's
model for model: a trial's peak depends on its model, and a random sequence draws its largest ones anywhere.
The worker's resident set (VmRSS) and its peak (VmHWM) are read after every trial. The kernel's peak is reset
(`/proc/self/clear_refs`) before the first trial and after each reading, so each trial's peak is its own: not
the 5-epoch trials' that ran before in the same process, nor an earlier trial's. Beside them, where it holds:
glibc's heap (`mallinfo2`: bytes in use, bytes free but kept, bytes in chunks of their own mapping) and
TensorFlow's CPU allocator (`tf.config.experimental.get_memory_info`: in use after the trial, and the trial's
own peak), which say where a growth sits. `--model-cache N` sets how many compiled models the worker keeps
(`tuner.models.ModelCache`, 5 as shipped; 0 keeps none), to measure what the kept models hold.
"""

from __future__ import annotations

import ctypes
import statistics
import tempfile
import time
from pathlib import Path

import benchlib

GRID = """
[study]
kind = "grid"
description = "trial overhead benchmark: {epochs} epochs"
[model]
units = {units}
optimizer = "adam"
learning_rate = 0.001
[training]
batch_size = {batch_size}
epochs = {epochs}
[grid]
cell = {cells}
learning_rate = {rates}
"""

SEARCH = """
[study]
kind = "search"
description = "memory benchmark: varied models, small subset"
[training]
epochs = {epochs}
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
[search.layers]
type = "int"
low = 1
high = 2
[search.batch_size]
choices = [64, 128]
[sampler]
name = "random"
[pruner]
name = "none"
"""


def _status(key: str) -> float:
    """A /proc/self/status figure in MiB."""
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


class _Timed:
    """Wrap `module.name` to record when it was called (`time.time()`) and the seconds spent in it."""

    def __init__(self, module, name: str) -> None:
        self.module, self.name, self.original, self.calls = module, name, getattr(module, name), []

        def timed(*args, **kwargs):
            start, t = time.time(), time.perf_counter()
            try:
                return self.original(*args, **kwargs)
            finally:
                self.calls.append((start, time.perf_counter() - t))

        setattr(module, name, timed)

    def restore(self) -> None:
        setattr(self.module, self.name, self.original)

    def during(self, trial) -> list[float]:
        """The seconds of the calls made while `trial` ran."""
        start, end = trial.datetime_start.timestamp(), trial.datetime_complete.timestamp()
        return [seconds for t, seconds in self.calls if start <= t <= end]


RATES = [0.001, 0.002]  # two trials per architecture: the second trains the worker's kept model


def overhead(tmp: Path, cells: list[str], units: int, batch_size: int, epochs: int, subset: int | None,
             rates: list[float]) -> list:  # fmt: skip
    import optuna

    from tuner import artifacts, models, runner

    study_file = tmp / "overhead.toml"
    study_file.write_text(GRID.format(cells=cells, units=units, batch_size=batch_size, epochs=epochs, rates=rates))
    url = f"sqlite:///{tmp}/overhead.db"
    build, save = _Timed(models, "build_model"), _Timed(artifacts, "save_model")
    t0 = time.perf_counter()
    try:
        runner.run_study(str(study_file), kind="grid", storage=url, subset=subset, study_name="overhead")
    finally:
        build.restore()
        save.restore()
    run_s = time.perf_counter() - t0
    study = optuna.load_study(study_name="overhead", storage=url)
    rows = []
    for trial in study.trials:
        builds = build.during(trial)  # none: the worker's kept model of this architecture, reset (in "other")
        wall = (trial.datetime_complete - trial.datetime_start).total_seconds()
        epochs_s = [e["seconds"] for e in trial.user_attrs["history"]]
        later = statistics.mean(epochs_s[1:]) if len(epochs_s) > 1 else epochs_s[0]
        tracing = max(0.0, epochs_s[0] - later)
        parts = {
            "build_compile_s": sum(builds),
            "fit_setup_s": trial.user_attrs["fit_seconds"] - sum(epochs_s),
            "test_evaluation_s": trial.user_attrs["eval_seconds"],
        }
        parts["other_s"] = wall - sum(epochs_s) - sum(parts.values())  # model upload, attributes, database
        model = trial.user_attrs["model"]
        rows.append({
            "config": f"{model['cell']}-{model['units']} batch {model['batch_size']}, {epochs} epochs, "
                      f"{trial.user_attrs['n_train']} images",
            "trial": trial.number,
            "learning_rate": model["learning_rate"],
            "model": "built" if builds else "kept",
            "trial_wall_s": wall,
            "epochs_s": epochs_s,
            "training_s": sum(epochs_s),
            "overhead_s": wall - sum(epochs_s),
            "overhead_share": (wall - sum(epochs_s)) / wall,
            "first_epoch_tracing_s": tracing,
            "overhead_share_strict": (wall - sum(epochs_s) + tracing) / wall,
            **parts,
            "test_accuracy": trial.user_attrs["test_accuracy"],
        })  # fmt: skip
    for trial, row in zip(study.trials, rows):
        row["model_upload_s"] = sum(save.during(trial))  # a trial among the best so far saves its model
    wall_sum = sum(r["trial_wall_s"] for r in rows)
    for r in rows:
        r["worker_setup_s"] = run_s - wall_sum  # once per worker: data, TensorFlow import, study creation
    return rows


def _reset_peak() -> bool:
    """Reset this process's VmHWM to its current RSS (Linux 4.0 and later). Returns whether it could."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        return True
    except OSError:
        return False


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]  # fmt: skip


def _heap() -> dict:
    """glibc's heap (2.33 and later) and TensorFlow's CPU allocator, in MiB; the allocator's peak is reset."""
    out = {}
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = _MallInfo2
        info = libc.mallinfo2()
        out = {"malloc_in_use_mib": info.uordblks / 2**20, "malloc_free_kept_mib": info.fordblks / 2**20,
               "malloc_mapped_mib": info.hblkhd / 2**20}  # fmt: skip
    except (OSError, AttributeError):  # not glibc, or older than 2.33
        pass
    import tensorflow as tf

    try:
        stats = tf.config.experimental.get_memory_info("CPU:0")
        tf.config.experimental.reset_memory_stats("CPU:0")
        out |= {"tf_allocator_in_use_mib": stats["current"] / 2**20, "tf_allocator_peak_mib": stats["peak"] / 2**20}
    except (ValueError, RuntimeError):  # an allocator without statistics
        pass
    return out


def _slope(values: list[float]) -> float:
    """Least-squares slope of the second half of `values`, per step."""
    half = len(values) // 2
    xs = list(range(half, len(values)))
    return statistics.linear_regression(xs, values[half:]).slope if len(xs) >= 2 else float("nan")


def memory(tmp: Path, trials: int, subset: int, epochs: int, repeat: bool = True) -> dict:
    import optuna

    from tuner import runner

    study_file = tmp / "memory.toml"
    study_file.write_text(SEARCH.format(subset=subset, epochs=epochs))
    url = f"sqlite:///{tmp}/memory.db"
    rows = []
    original_end = runner._Display.end
    per_trial = _reset_peak()  # else VmHWM is the process's peak so far, which may predate this run

    def end(self, frozen) -> None:  # the display's end-of-trial hook: read this worker's memory there
        original_end(self, frozen)
        peak = _status("VmHWM")
        running = max([peak, *(r["peak_rss_mib"] for r in rows)])
        rows.append({"trial": frozen.number, "state": frozen.state.name, "params": frozen.params,
                     "rss_mib": _status("VmRSS"), "trial_peak_rss_mib": peak if per_trial else None,
                     "peak_rss_mib": running, **_heap()})  # fmt: skip
        if repeat and len(rows) == trials:  # the second pass: the same models, in the same order
            study = optuna.load_study(study_name="memory", storage=url)
            for r in rows:
                study.enqueue_trial(r["params"])
        _reset_peak()

    runner._Display.end = end
    try:
        runner.run_study(str(study_file), kind="search", storage=url, n_trials=2 * trials if repeat else trials,
                         study_name="memory")  # fmt: skip
    finally:
        runner._Display.end = original_end
    rss = [r["rss_mib"] for r in rows]
    half = len(rss) // 2
    out = {
        "trials": rows,
        "peak_per_trial": per_trial,
        "rss_first_mib": rss[0],
        "rss_last_mib": rss[-1],
        "peak_first_half_mib": max(r["peak_rss_mib"] for r in rows[:half]),
        "peak_last_mib": rows[-1]["peak_rss_mib"],
        "rss_slope_second_half_mib_per_trial": _slope(rss),
    }
    if per_trial:
        peaks = [r["trial_peak_rss_mib"] for r in rows]
        out["trial_peak_slope_second_half_mib_per_trial"] = _slope(peaks)
        out["trial_peak_second_half_max_mib"] = max(peaks[half:])
    if repeat and len(rows) == 2 * trials and all(a["params"] == b["params"] for a, b in zip(rows, rows[trials:])):
        key = "trial_peak_rss_mib" if per_trial else "rss_mib"
        growth = [b[key] - a[key] for a, b in zip(rows, rows[trials:])]
        out["repeat"] = {"measure": key, "growth_mib": growth, "mean_growth_mib": statistics.mean(growth),
                         "max_growth_mib": max(growth), "peak_first_pass_mib": max(r[key] for r in rows[:trials]),
                         "peak_second_pass_mib": max(r[key] for r in rows[trials:])}  # fmt: skip
    return out


HEAP = {"malloc_in_use_mib": "glibc heap in use after each trial", "malloc_free_kept_mib": "glibc heap free but kept",
        "malloc_mapped_mib": "glibc chunks in their own mapping", "tf_allocator_peak_mib": "TensorFlow allocator, each "
        "trial's peak", "tf_allocator_in_use_mib": "TensorFlow allocator in use after each trial"}  # fmt: skip


def _env() -> dict:
    """Allocator settings that change how much freed memory goes back to the system, and which allocator
    TensorFlow uses (oneDNN's with TF_ENABLE_ONEDNN_OPTS=1, capped by TF_MKL_ALLOC_MAX_BYTES)."""
    import os

    keys = ("MALLOC_ARENA_MAX", "LD_PRELOAD", "MALLOC_TRIM_THRESHOLD_")
    keys += ("TF_ENABLE_ONEDNN_OPTS", "TF_MKL_ALLOC_MAX_BYTES")
    return {k: os.environ[k] for k in keys if k in os.environ}


def main() -> None:
    p = benchlib.parser(__doc__.split("\n\n")[0])
    p.add_argument("--memory-only", action="store_true", help="only the memory run (20 trials, then them again)")
    p.add_argument("--overhead-only", action="store_true", help="only the four 5-epoch trials")
    p.add_argument("--memory-trials", type=int, default=20, help="trials of the memory run's first pass (20)")
    p.add_argument("--model-cache", type=int, default=None, help="compiled models a worker keeps (5 as shipped)")
    args = p.parse_args()
    if args.model_cache is not None:
        from tuner import models

        models.ModelCache.__init__.__defaults__ = (args.model_cache,)  # the objective makes it with the default
    machine = benchlib.machine()
    print(f"machine: {machine}")
    subset = 6_000 if args.quick else None
    epochs = 2 if args.quick else 5
    out: dict = {"machine": machine, "overhead": [], "memory": None, "env": _env(), "model_cache": args.model_cache}
    with tempfile.TemporaryDirectory() as tmp:
        for row in (
            [] if args.memory_only else overhead(Path(tmp), ["SimpleRNN", "LSTM"], 128, 128, epochs, subset, RATES)
        ):
            out["overhead"].append(row)
            verdict = "met" if row["overhead_share"] <= 0.02 else "missed"
            print(f"trial {row['trial']} {row['config']}, learning rate {row['learning_rate']}, model "
                  f"{row['model']}: trial {row['trial_wall_s']:.1f}s, epochs {row['training_s']:.1f}s "
                  f"({', '.join(f'{s:.1f}' for s in row['epochs_s'])}); overhead {row['overhead_s']:.2f}s = "
                  f"{100 * row['overhead_share']:.1f}% (goal <= 2%: {verdict}); with first-epoch tracing "
                  f"{row['first_epoch_tracing_s']:.2f}s: {100 * row['overhead_share_strict']:.1f}%; build+compile "
                  f"{row['build_compile_s']:.2f}s, fit set-up {row['fit_setup_s']:.2f}s, test evaluation "
                  f"{row['test_evaluation_s']:.2f}s, other (model upload, database) "
                  f"{row['other_s']:.2f}s; worker set-up (once) {row['worker_setup_s']:.1f}s", flush=True)  # fmt: skip
        if args.overhead_only:
            return benchlib.write_json(args.json, out)
        mem = memory(Path(tmp), trials=5 if args.quick else args.memory_trials, subset=600 if args.quick else 1_200,
                     epochs=1 if args.quick else 2)  # fmt: skip
    mem["heap_labels"] = {key: label for key, label in HEAP.items() if all(key in r for r in mem["trials"])}
    out["memory"] = mem
    print("RSS after each trial (MiB): " + " ".join(f"{r['rss_mib']:.0f}" for r in mem["trials"]))
    print("peak RSS after each trial, since the run began (MiB): "
          + " ".join(f"{r['peak_rss_mib']:.0f}" for r in mem["trials"]))  # fmt: skip
    if mem["peak_per_trial"]:
        print("peak RSS during each trial (MiB): " + " ".join(f"{r['trial_peak_rss_mib']:.0f}" for r in mem["trials"]))
    for key, label in mem["heap_labels"].items():
        print(f"{label} (MiB): " + " ".join(f"{r[key]:.0f}" for r in mem["trials"]))
    print(
        f"RSS slope over the second half: {mem['rss_slope_second_half_mib_per_trial']:+.1f} MiB/trial; peak "
        f"{mem['peak_first_half_mib']:.0f} MiB after the first half, {mem['peak_last_mib']:.0f} MiB at the end"
    )
    if mem["peak_per_trial"]:
        print(f"each trial's own peak, slope over the second half: "
              f"{mem['trial_peak_slope_second_half_mib_per_trial']:+.1f} MiB/trial")  # fmt: skip
    if rep := mem.get("repeat"):
        print(f"the same models again ({rep['measure']}): growth over the first pass, model for model (MiB): "
              + " ".join(f"{g:+.0f}" for g in rep["growth_mib"])
              + f"; mean {rep['mean_growth_mib']:+.1f}, largest {rep['max_growth_mib']:+.0f}; highest "
              f"{rep['peak_first_pass_mib']:.0f} MiB in the first pass, "
              f"{rep['peak_second_pass_mib']:.0f} in the second")  # fmt: skip
    benchlib.write_json(args.json, out)


if __name__ == "__main__":
    main()
