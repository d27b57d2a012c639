"""tuner's SimpleRNN, GRU and LSTM layers (tuner.recurrent) against Keras's own, epochs alternating in one
process.

    python bench/fused_rnn.py --json bench/results/fused_rnn.json    # about 15 minutes on 2 cores
    python bench/fused_rnn.py --quick

For bench/train_speed.py's goal configurations (SimpleRNN-128 at batch 256, LSTM-100 and GRU-128 at batch 128):
models built by `tuner.models.build_model` from the same seed, one with tuner's layers (as shipped), one with
Keras's (as tuner built them before: SimpleRNN unrolled, LSTM and GRU in Keras's `while_loop`), and for SimpleRNN one
with Keras's rolled loop, one with the recurrence run by numpy (`numpy_simple_rnn`) and one without the
recurrence's dependence between steps (`recurrence_bound.chainless_layer`, a bound), trained by
`tuner.models.train` in turns, one epoch each per round, so that the machine's drift (10-50% between runs on
these shared machines) hits all alike. Reported: each model's first call (tracing the train step plus a few
batches), the median epoch and its ratio to goal 1's floor, the per-round speed-up, and every epoch's loss and
accuracy: all but the bound compute the same function from the same weights and batches, so their figures
should agree to float rounding.

tuner's LSTM takes its layer only in a model whose trials loop over steps
(`tuner.models.choose_steps_per_execution`, here as for a 5-epoch trial on `--n` images:
`benchlib.as_in_a_trial`); at `--quick`'s 5,984 images it runs Keras's loop, so its two sides are the same layer.
Until the twentieth round tuner trained LSTM with Keras's layer, and this script measured tuner.recurrent's
treatment of it as a lever (`stepwise`: the `stepwise_*` figures of the files up to `fused_rnn_lstm_round20`).
"""

from __future__ import annotations

import functools
import statistics
import time

import benchlib

CONFIGS = [("SimpleRNN", 128, 256), ("LSTM", 100, 128), ("GRU", 128, 128)]


def build(cell: str, units: int, layer=None):
    """build_model's model, with `layer` (a Keras layer class) in place of tuner's (or Keras's) when given."""
    from tuner import models, recurrent

    config = models.ModelConfig(cell=cell, units=units)
    if layer is None:
        return models.build_model(config, seed=0)
    ours = getattr(recurrent, cell, None)  # build_model takes tuner's layer for the cell if there is one
    setattr(recurrent, cell, layer)
    try:
        return models.build_model(config, seed=0)
    finally:
        if ours is None:
            delattr(recurrent, cell)
        else:
            setattr(recurrent, cell, ours)


def keras_variants(cell: str) -> dict:
    """Keras's layer as tuner built it before tuner.recurrent (SimpleRNN unrolled), and SimpleRNN also rolled."""
    import keras

    layer = getattr(keras.layers, cell)
    if cell != "SimpleRNN":
        return {"keras": layer}
    return {"keras": functools.partial(layer, unroll=True), "keras_rolled": layer}


def numpy_simple_rnn():
    """tuner's SimpleRNN with its 28 steps run by numpy inside the train step (`tf.numpy_function`), forward and
    backward: the BLAS called once a step, no TensorFlow op per step. The input products, and the recurrent
    kernel's gradient as one product over all steps, stay TensorFlow's. A lever measured, not shipped (it holds
    Python's lock while it runs, and `return_sequences` is not covered): the nearest thing to a compiled
    kernel calling the BLAS per step that needs no compiler (BENCHMARKS.md, section 1)."""
    import numpy as np
    import tensorflow as tf
    from recurrence_bound import kernel_gradient, last_state_layer

    def forward(xw, u):  # -> every step's state
        hs = np.empty_like(xw)
        np.tanh(xw[0], out=hs[0])
        for t in range(1, len(xw)):
            np.matmul(hs[t - 1], u, out=hs[t])
            hs[t] += xw[t]
            np.tanh(hs[t], out=hs[t])
        return hs

    def backward(dy, hs, u):  # dy: the last state's gradient; -> the gradient of every step's pre-activation
        ut = np.ascontiguousarray(u.T)
        dz, dh, tanh_grad = np.empty_like(hs), dy.copy(), np.empty_like(dy)
        for t in range(len(hs) - 1, -1, -1):
            np.multiply(hs[t], hs[t], out=tanh_grad)
            np.subtract(1.0, tanh_grad, out=tanh_grad)
            np.multiply(dh, tanh_grad, out=dz[t])
            if t:
                np.matmul(dz[t], ut, out=dh)
        return dz

    @tf.custom_gradient
    def run(xw, kernel, rbias):  # SimpleRNN has no recurrent bias: rbias is zeros, and its gradient is unused
        hs = tf.ensure_shape(tf.numpy_function(forward, [xw, kernel], tf.float32, stateful=False), xw.shape)

        def grad(dy):
            dz = tf.numpy_function(backward, [dy, hs, kernel], tf.float32, stateful=False)
            dz = tf.ensure_shape(dz, xw.shape)
            return dz, kernel_gradient(hs, dz), tf.zeros_like(rbias)

        return hs[-1], grad

    return last_state_layer("SimpleRNN", run)


def alternating_epochs(variants: dict, *, n: int, batch_size: int, rounds: int) -> tuple[dict, dict]:
    """Each model's first call (a warm-up fit on a few batches and the partial last one: tracing), then `rounds`
    rounds of one epoch on the first `n` training images per model, in turns, the order reversed every other
    round. Returns the first calls' seconds and every epoch's seconds, loss and accuracy, by variant."""
    from tuner import data, models

    full = data.load()
    warm_n = 4 * batch_size + n % batch_size
    warm = data.Splits(full.x_train[:warm_n], full.y_train[:warm_n], None, None, None, None, full.source)
    train = data.Splits(full.x_train[:n], full.y_train[:n], None, None, None, None, full.source)
    first_s, epochs = {}, {name: [] for name in variants}
    for name, model in variants.items():
        benchlib.as_in_a_trial(model, n, batch_size)
        t = time.perf_counter()
        models.train(model, warm, batch_size=batch_size, epochs=1, seed=0, evaluate_test=False)
        first_s[name] = time.perf_counter() - t
    for r in range(rounds):
        for name in list(variants) if r % 2 == 0 else list(reversed(variants)):
            result = models.train(variants[name], train, batch_size=batch_size, epochs=1, seed=r, evaluate_test=False)
            e = result.epochs[0]
            epochs[name].append({"round": r, "seconds": e.seconds, "loss": e.loss, "accuracy": e.accuracy})
    return first_s, epochs


def measure(cell: str, units: int, batch_size: int, *, n: int, rounds: int) -> dict:
    from recurrence_bound import chainless_layer
    from train_speed import flops_per_sample

    rate = benchlib.matmul_rate()["gflops"]
    variants = {name: build(cell, units, layer) for name, layer in keras_variants(cell).items()}
    variants["tuner"] = build(cell, units)
    if cell == "SimpleRNN":
        variants["numpy"] = build(cell, units, numpy_simple_rnn())
        variants["no_chain"] = build(cell, units, chainless_layer(cell))
    first_s, epochs = alternating_epochs(variants, n=n, batch_size=batch_size, rounds=rounds)
    ratios = [k["seconds"] / t["seconds"] for k, t in zip(epochs["keras"], epochs["tuner"], strict=True)]
    median = {name: statistics.median(e["seconds"] for e in rows) for name, rows in epochs.items()}
    rate = max(rate, benchlib.matmul_rate()["gflops"])
    floor = flops_per_sample(cell, units) * n / (rate * 1e9)  # goal 1's floor (bench/train_speed.py)
    return {
        "config": f"{cell}-{units} batch {batch_size}",
        "n_train": n,
        "rounds": rounds,
        "first_call_s": first_s,
        "median_epoch_s": median,
        "matmul_gflops": rate,
        "floor_s": floor,
        "ratio_to_floor": {name: seconds / floor for name, seconds in median.items()},
        "speedup_median": median["keras"] / median["tuner"],
        "speedup_per_round": ratios,
        "speedup_vs_rolled": median["keras_rolled"] / median["tuner"] if "keras_rolled" in median else None,
        "max_loss_difference": max(
            abs(k["loss"] - t["loss"]) for k, t in zip(epochs["keras"], epochs["tuner"], strict=True)
        ),
        "numpy_speedup": median["tuner"] / median["numpy"] if "numpy" in median else None,
        "numpy_max_loss_difference": max(
            (abs(k["loss"] - t["loss"]) for k, t in zip(epochs.get("numpy", []), epochs["tuner"], strict=False)),
            default=None,
        ),
        "epochs": epochs,
    }


def main() -> None:
    p = benchlib.parser(__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=60_000, help="training images per epoch (60000)")
    p.add_argument("--rounds", type=int, default=5, help="epochs per model, alternating (5)")
    p.add_argument("--configs", default="SimpleRNN,LSTM,GRU", help="cells to measure")
    args = p.parse_args()
    if args.quick:
        args.n, args.rounds = 5_984, 2
    machine, configs = benchlib.start_training(CONFIGS, args.configs)
    rows = []
    for cell, units, bs in configs:
        row = measure(cell, units, bs, n=args.n, rounds=args.rounds)
        rows.append(row)
        per_round = " ".join(f"{r:.2f}" for r in row["speedup_per_round"])
        rolled = ""
        if row["speedup_vs_rolled"] is not None:
            epoch, first = row["median_epoch_s"]["keras_rolled"], row["first_call_s"]["keras_rolled"]
            rolled = f"Keras's rolled {epoch:.2f} s ({row['speedup_vs_rolled']:.2f}x), first call {first:.2f} s; "
        numpy = ""
        if row["numpy_speedup"] is not None:
            epoch, first = row["median_epoch_s"]["numpy"], row["first_call_s"]["numpy"]
            bound, ratio = row["median_epoch_s"]["no_chain"], row["ratio_to_floor"]
            numpy = (f"numpy's recurrence {epoch:.2f} s ({row['numpy_speedup']:.2f}x tuner's speed), first call "
                     f"{first:.2f} s, loss within {row['numpy_max_loss_difference']:.1e} of tuner's; without the "
                     f"dependent products (a bound) {bound:.2f} s; against the floor ({row['floor_s']:.2f} s): "
                     f"tuner's {ratio['tuner']:.2f}x, numpy's {ratio['numpy']:.2f}x, without the dependent products "
                     f"{ratio['no_chain']:.2f}x; ")  # fmt: skip
        print(f"{row['config']:24} n {args.n}: Keras's layers {row['median_epoch_s']['keras']:6.2f} s an epoch, "
              f"tuner's {row['median_epoch_s']['tuner']:6.2f} s (median of {args.rounds}): "
              f"{row['speedup_median']:.2f}x faster (per round {per_round}); first call "
              f"{row['first_call_s']['keras']:.2f} s against {row['first_call_s']['tuner']:.2f} s; "
              f"{rolled}{numpy}"
              f"largest loss difference {row['max_loss_difference']:.1e}", flush=True)  # fmt: skip
        benchlib.write_json(args.json, {"machine": machine, "rows": rows})


if __name__ == "__main__":
    main()
