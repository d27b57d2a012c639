"""tuner's SimpleRNN and GRU layers (tuner.recurrent) against Keras's own, epochs alternating in one process.

    python bench/fused_rnn.py --json bench/results/fused_rnn.json    # about 15 minutes on 2 cores
    python bench/fused_rnn.py --quick

For SimpleRNN-128 at batch 256 and GRU-128 at batch 128 (two of bench/train_speed.py's goal configurations):
models built by `tuner.models.build_model` from the same seed, one with tuner's layers (as shipped), one with
Keras's (as tuner built them before: SimpleRNN unrolled, GRU in Keras's `while_loop`), and for SimpleRNN one
with Keras's rolled loop, trained by `tuner.models.train` in turns, one epoch each per round, so that the
machine's drift (10-50% between runs on these shared machines) hits all alike. Reported: each model's first
call (tracing the train step plus a few batches), the median epoch, the per-round speed-up, and every epoch's
loss and accuracy: they compute the same function from the same weights and batches, so their figures should
agree to float rounding.
"""

from __future__ import annotations

import functools
import statistics
import time

import benchlib

CONFIGS = [("SimpleRNN", 128, 256), ("GRU", 128, 128)]  # LSTM: Keras's layer in both (see tuner.recurrent)


def build(cell: str, units: int, layer=None):
    """build_model's model, with `layer` (a Keras layer class) in place of tuner's when given."""
    from tuner import models, recurrent

    config = models.ModelConfig(cell=cell, units=units)
    if layer is None:
        return models.build_model(config, seed=0)
    ours = getattr(recurrent, cell)
    setattr(recurrent, cell, layer)
    try:
        return models.build_model(config, seed=0)
    finally:
        setattr(recurrent, cell, ours)


def keras_variants(cell: str) -> dict:
    """Keras's layer as tuner built it before tuner.recurrent (SimpleRNN unrolled), and SimpleRNN also rolled."""
    import keras

    layer = getattr(keras.layers, cell)
    if cell != "SimpleRNN":
        return {"keras": layer}
    return {"keras": functools.partial(layer, unroll=True), "keras_rolled": layer}


def measure(cell: str, units: int, batch_size: int, *, n: int, rounds: int) -> dict:
    from tuner import data, models

    full = data.load()
    warm_n = 4 * batch_size + n % batch_size
    warm = data.Splits(full.x_train[:warm_n], full.y_train[:warm_n], None, None, None, None, full.source)
    train = data.Splits(full.x_train[:n], full.y_train[:n], None, None, None, None, full.source)
    variants = {name: build(cell, units, layer) for name, layer in keras_variants(cell).items()}
    variants["tuner"] = build(cell, units)
    first_s, epochs = {}, {name: [] for name in variants}
    for name, model in variants.items():
        t = time.perf_counter()
        models.train(model, warm, batch_size=batch_size, epochs=1, seed=0, evaluate_test=False)
        first_s[name] = time.perf_counter() - t
    for r in range(rounds):
        order = list(variants) if r % 2 == 0 else list(reversed(variants))
        for name in order:
            result = models.train(variants[name], train, batch_size=batch_size, epochs=1, seed=r, evaluate_test=False)
            e = result.epochs[0]
            epochs[name].append({"round": r, "seconds": e.seconds, "loss": e.loss, "accuracy": e.accuracy})
    ratios = [k["seconds"] / t["seconds"] for k, t in zip(epochs["keras"], epochs["tuner"], strict=True)]
    median = {name: statistics.median(e["seconds"] for e in rows) for name, rows in epochs.items()}
    return {
        "config": f"{cell}-{units} batch {batch_size}",
        "n_train": n,
        "rounds": rounds,
        "first_call_s": first_s,
        "median_epoch_s": median,
        "speedup_median": median["keras"] / median["tuner"],
        "speedup_per_round": ratios,
        "speedup_vs_rolled": median["keras_rolled"] / median["tuner"] if "keras_rolled" in median else None,
        "max_loss_difference": max(
            abs(k["loss"] - t["loss"]) for k, t in zip(epochs["keras"], epochs["tuner"], strict=True)
        ),
        "epochs": epochs,
    }


def main() -> None:
    p = benchlib.parser(__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=60_000, help="training images per epoch (60000)")
    p.add_argument("--rounds", type=int, default=5, help="epochs per model, alternating (5)")
    p.add_argument("--configs", default="SimpleRNN,GRU", help="cells to measure")
    args = p.parse_args()
    if args.quick:
        args.n, args.rounds = 5_984, 2
    from tuner import models

    models.limit_malloc_arenas()  # as the objective does for every worker
    machine = benchlib.machine()
    print(f"machine: {machine}")
    rows = []
    for cell, units, bs in CONFIGS:
        if cell not in args.configs.split(","):
            continue
        row = measure(cell, units, bs, n=args.n, rounds=args.rounds)
        rows.append(row)
        per_round = " ".join(f"{r:.2f}" for r in row["speedup_per_round"])
        rolled = ""
        if row["speedup_vs_rolled"] is not None:
            epoch, first = row["median_epoch_s"]["keras_rolled"], row["first_call_s"]["keras_rolled"]
            rolled = f"Keras's rolled {epoch:.2f} s ({row['speedup_vs_rolled']:.2f}x), first call {first:.2f} s; "
        print(f"{row['config']:24} n {args.n}: Keras's layers {row['median_epoch_s']['keras']:6.2f} s an epoch, "
              f"tuner's {row['median_epoch_s']['tuner']:6.2f} s (median of {args.rounds}): "
              f"{row['speedup_median']:.2f}x faster (per round {per_round}); first call "
              f"{row['first_call_s']['keras']:.2f} s against {row['first_call_s']['tuner']:.2f} s; "
              f"{rolled}"
              f"largest loss difference {row['max_loss_difference']:.1e}", flush=True)  # fmt: skip
        benchlib.write_json(args.json, {"machine": machine, "rows": rows})


if __name__ == "__main__":
    main()
