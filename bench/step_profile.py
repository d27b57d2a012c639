"""Where a train step's time goes: TensorFlow's profiler over an epoch of goal 1's configurations as shipped.

    python bench/step_profile.py --json bench/results/step_profile.json    # about 5 minutes on 2 cores
    python bench/step_profile.py --quick

Goal 1 (`bench/train_speed.py`) asks for an epoch within 1.5x of its floor, and `bench/recurrence_bound.py` shows
that on most machines the train step without the recurrence's dependence between steps already takes most of
that. This says what the time goes to. For each of goal 1's configurations the model as `tuner grid` builds it
is trained by `tuner.models.train` on the full training set (`--n`): one epoch on a few batches to trace,
one timed, then one under TensorFlow's profiler (`tf.profiler.experimental`, host events, no Python tracer).
From the profile's own events (its XSpace, read with the protobuf TensorFlow ships):

- `function_s`: the train function's calls (Keras's `multi_step_on_iterator`, one a step); the rest of the epoch
  is Keras's loop in Python, tuner's recorder and the input pipeline's hand-over;
- `ops_busy_s`: inside those calls, when at least one op ran on one of TensorFlow's inter-op threads (a product may
  use both cores through the intra-op pool meanwhile); `ops_both_s` when two ran at once; the rest of the calls
  is the executor between ops (scheduling, allocation, waiting);
- each op type's time (its events' durations, summed over both threads, so the sum can exceed `ops_busy_s`), in
  groups (`GROUPS`), and the ops that took longest, by name, a step.

The profiler slows the epoch (`profiled_epoch_s` beside `epoch_s`): read the shares, not the seconds.
`--keras-lstm` also profiles LSTM with Keras's layer, which tuner trained LSTM with until the twentieth round (the
files up to `step_profile_lstm_round20` profiled that as shipped; their "(stepwise lever)" rows, tuner's layer).
"""

from __future__ import annotations

import collections
import glob
import tempfile
import time

import benchlib
from fused_rnn import build
from train_speed import CONFIGS, N_FULL, N_QUICK, flops_per_sample

MATMUL = ("MatMul", "_MklMatMul", "_MklNativeMatMul", "_MklNativeFusedMatMul", "_MklFusedMatMul", "BatchMatMulV2",
          "BatchMatMulV3", "_MklBatchMatMulV2")  # fmt: skip
MOVES = ("Transpose", "_MklTranspose", "Pack", "Unpack", "ConcatV2", "Split", "SplitV", "Slice", "StridedSlice",
         "StridedSliceGrad", "Pad", "PadV2", "Tile", "BroadcastTo", "Reshape", "Identity", "GatherV2", "Fill",
         "ZerosLike", "Cast", "Bitcast")  # fmt: skip
REDUCTIONS = ("Sum", "Mean", "Max", "Min", "Prod", "ArgMax", "BiasAddGrad", "SparseSoftmaxCrossEntropyWithLogits")
OPTIMIZER = ("ReadVariableOp", "AssignVariableOp", "AssignAddVariableOp", "AssignSubVariableOp")
# op types by group, the first that matches; the rest are elementwise (Tanh, TanhGrad, AddV2, Mul, Softmax, ...)
GROUPS = (
    ("matrix products", lambda t: t in MATMUL),
    ("stacks, slices, transposes, copies", lambda t: t in MOVES),
    ("reductions and the loss", lambda t: t in REDUCTIONS),
    ("variable reads and writes", lambda t: t in OPTIMIZER or t.startswith("ResourceApply")),
    ("input pipeline", lambda t: "Dataset" in t or t.startswith(("Iterator", "Optional"))),
    ("elementwise and the rest", lambda t: True),
)


TRAIN_FUNCTIONS = ("multi_step_on_iterator", "one_step_on_iterator")  # Keras's train function, called once a step


def group_of(op_type: str) -> str:
    return next(name for name, test in GROUPS if test(op_type))


def _intervals_union(intervals: list[tuple[int, int]]) -> tuple[int, int]:
    """Total length covered by at least one interval, and by at least two (picoseconds)."""
    points = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals])
    one = two = 0
    depth, last = 0, None
    for at, delta in points:
        if last is not None:
            one += (at - last) if depth >= 1 else 0
            two += (at - last) if depth >= 2 else 0
        depth += delta
        last = at
    return one, two


def _clip(intervals, windows):
    """The parts of `intervals` inside any of `windows` (both sorted lists of (start, end); windows disjoint)."""
    out, first = [], 0
    for start, end in intervals:
        while first < len(windows) and windows[first][1] <= start:  # ended before this interval and every later one
            first += 1
        for w_start, w_end in windows[first:]:
            if w_start >= end:
                break
            out.append((max(start, w_start), min(end, w_end)))
    return out


def read_profile(path: str) -> dict:
    """The figures above from one XSpace file (all in seconds, op figures summed over the profiled epoch)."""
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    space = xplane_pb2.XSpace()
    with open(path, "rb") as f:
        space.ParseFromString(f.read())
    plane = next(p for p in space.planes if p.name == "/host:CPU")
    meta = plane.event_metadata

    def events(line):
        base = line.timestamp_ns * 1000
        for e in line.events:
            yield meta[e.metadata_id], base + e.offset_ps, base + e.offset_ps + e.duration_ps

    python = next(line for line in plane.lines if line.name == "python")
    calls = sorted((start, end) for m, start, end in events(python) if m.name in TRAIN_FUNCTIONS)
    ops, by_type, by_name = [], collections.Counter(), collections.Counter()
    count_type, count_name = collections.Counter(), collections.Counter()
    for line in plane.lines:
        if not line.name.startswith("tf_Compute"):
            continue
        for m, start, end in events(line):
            if m.display_name and m.name.endswith(":" + m.display_name):  # an op's kernel: "name:Type"
                ops.append((start, end))
                by_type[m.display_name] += end - start
                count_type[m.display_name] += 1
                name = m.name.rsplit(":", 1)[0]
                by_name[(name, m.display_name)] += end - start
                count_name[(name, m.display_name)] += 1
    ops.sort()
    busy, both = _intervals_union(_clip(ops, calls))
    groups = collections.Counter()
    for op_type, ps in by_type.items():
        groups[group_of(op_type)] += ps
    steps = len(calls)
    return {
        "steps": steps,
        "function_s": sum(end - start for start, end in calls) / 1e12,
        "ops_busy_s": busy / 1e12,
        "ops_both_s": both / 1e12,
        "groups_s": {name: groups[name] / 1e12 for name, _ in GROUPS},
        "types": [{"type": t, "s": ps / 1e12, "per_step": count_type[t] / steps} for t, ps in by_type.most_common()],
        "top_ops": [
            {"name": n, "type": t, "s": ps / 1e12, "per_step": count_name[(n, t)] / steps}
            for (n, t), ps in by_name.most_common(15)
        ],
    }


def measure(cell: str, units: int, batch: int, *, n: int, layer=None) -> dict:
    import tensorflow as tf

    from tuner import data, models

    full = data.load()
    splits = data.Splits(full.x_train[:n], full.y_train[:n], None, None, None, None, full.source)
    warm_n = 4 * batch + n % batch  # the same last partial batch: both train functions traced
    warm = data.Splits(full.x_train[:warm_n], full.y_train[:warm_n], None, None, None, None, full.source)
    model = build(cell, units, layer)
    benchlib.as_in_a_trial(model, n, batch)
    models.train(model, warm, batch_size=batch, epochs=1, seed=0, evaluate_test=False)
    rate = benchlib.matmul_rate()["gflops"]
    epoch_s = models.train(model, splits, batch_size=batch, epochs=1, seed=1, evaluate_test=False).epochs[0].seconds
    with tempfile.TemporaryDirectory() as logdir:
        options = tf.profiler.experimental.ProfilerOptions(host_tracer_level=2, python_tracer_level=0)
        tf.profiler.experimental.start(logdir, options=options)
        try:
            profiled = models.train(model, splits, batch_size=batch, epochs=1, seed=2, evaluate_test=False)
        finally:
            tf.profiler.experimental.stop()
        figures = read_profile(glob.glob(f"{logdir}/plugins/profile/*/*.xplane.pb")[0])
    floor = flops_per_sample(cell, units) * n / (max(rate, benchlib.matmul_rate()["gflops"]) * 1e9)
    return {
        "config": f"{cell}-{units} batch {batch}" + (" (Keras's layer)" if layer is not None else ""),
        "n_train": n,
        "epoch_s": epoch_s,
        "floor_s": floor,
        "ratio": epoch_s / floor,
        "profiled_epoch_s": profiled.epochs[0].seconds,
        **figures,
    }


def report(row: dict) -> str:
    wall, steps = row["profiled_epoch_s"], row["steps"]

    def ms(seconds: float) -> str:
        return f"{1e3 * seconds / steps:6.2f} ms"

    lines = [
        f"{row['config']}, {row['n_train']} images: epoch {row['epoch_s']:.2f} s = {row['ratio']:.2f}x its floor "
        f"({row['floor_s']:.2f} s); profiled {wall:.2f} s, {steps} steps of {ms(wall).strip()}:",
        f"  in the train function      {ms(row['function_s'])}  {100 * row['function_s'] / wall:5.1f}% of the epoch",
        f"    some op running          {ms(row['ops_busy_s'])}  {100 * row['ops_busy_s'] / wall:5.1f}%"
        f"   (two at once {ms(row['ops_both_s']).strip()})",
        f"    no op running            {ms(row['function_s'] - row['ops_busy_s'])}"
        f"  {100 * (row['function_s'] - row['ops_busy_s']) / wall:5.1f}%",
        f"  outside it (Keras's loop)  {ms(wall - row['function_s'])}  {100 * (wall - row['function_s']) / wall:5.1f}%",
        "  ops' time by group (both threads summed):",
    ]
    ops_total = sum(row["groups_s"].values())
    for name, seconds in row["groups_s"].items():
        lines.append(f"    {name:34} {ms(seconds)}  {100 * seconds / ops_total:5.1f}% of the ops' time")
    lines.append("  longest ops a step:")
    for op in row["top_ops"][:10]:
        lines.append(f"    {ms(op['s'])}  x{op['per_step']:<4.0f} {op['type']:22} {op['name']}")
    return "\n".join(lines)


def main() -> None:
    p = benchlib.parser(__doc__.split("\n\n")[0])
    p.add_argument("--configs", default="SimpleRNN,LSTM,GRU", help="cells to measure")
    p.add_argument("--n", type=int, default=N_FULL, help=f"training images an epoch ({N_FULL})")
    p.add_argument("--keras-lstm", action="store_true", help="LSTM with Keras's layer too")
    args = p.parse_args()
    machine, configs = benchlib.start_training(CONFIGS, args.configs)
    jobs = [(c, None) for c in configs]
    if args.keras_lstm:
        import keras

        jobs += [(c, keras.layers.LSTM) for c in configs if c[0] == "LSTM"]
    rows = []
    for (cell, units, batch), layer in jobs:
        t = time.perf_counter()
        rows.append(measure(cell, units, batch, n=N_QUICK if args.quick else args.n, layer=layer))
        print(report(rows[-1]), f"\n  ({time.perf_counter() - t:.0f} s)", flush=True)
        benchlib.write_json(args.json, {"machine": machine, "rows": rows})


if __name__ == "__main__":
    main()
