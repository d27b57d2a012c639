"""Seconds per training epoch against the arithmetic floor, and what each speed lever does to them.

    python bench/train_speed.py --json bench/results/train_speed.json    # about 15 minutes on 2 cores
    python bench/train_speed.py --quick

For SimpleRNN-128 at batch 256, LSTM-100 and GRU-128 at batch 128, on the 60,000 training images: one epoch
after a warm-up epoch on a few batches (so tracing is done and the last, partial batch has been seen), timed by
tuner's own recorder inside `tuner.models.train`. The floor is the matrix-product FLOPs of forward + backward
(counted below), divided by the best float32 2048x2048 matrix-product rate measured in the same process.

Every measurement runs in a fresh process, so that thread settings and oneDNN (read when TensorFlow starts)
can be varied. `shipped` is `tuner.models.build_model` + `train` as they are (tuner's input pipeline,
`tuner.models.batches`); `original` is the model as `build_model` made it before any speed lever (a rolled
`while_loop`, no XLA, one step per call), fitted by Keras's own `fit` on the arrays (`keras_fit` below). The
two draw different permutations (numpy's against TensorFlow's), so their figures agree within noise, not to
the digit; the lever rows, all on Keras's path, agree to the digit. Both are
measured on all 60,000 images (the goal's figures). Each other variant adds one lever (or two) to `original`
and is measured on 7,520 images (the same last partial batch) to keep the run short, beside `original` on the
same 7,520. Every variant also reports the recorded figures of
its epoch (loss, epoch-mean accuracy, last-batch accuracy), so a lever that changes them shows.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import benchlib

CONFIGS = [("SimpleRNN", 128, 256), ("LSTM", 100, 128), ("GRU", 128, 128)]
GATES = {"SimpleRNN": 1, "GRU": 3, "LSTM": 4}
N_FULL = 60_000
N_LEVERS = 7_520  # the lever table's subset: the same last partial batch (96 images) as 60,000 at 128 and 256
N_QUICK = 5_984  # likewise
GOAL = ["original", "shipped"]  # measured on the full 60,000

LEVERS: dict[str, dict] = {
    "original": {},
    "shipped": {"shipped": True},
    "unroll": {"unroll": True},
    "xla": {"jit": True},
    "unroll+xla": {"unroll": True, "jit": True},
    "spe8": {"spe": 8},
    "intra2-inter1": {"threads": [2, 1]},
    "onednn-off": {"env": {"TF_ENABLE_ONEDNN_OPTS": "0"}},
    "shipped-onednn-off": {"shipped": True, "env": {"TF_ENABLE_ONEDNN_OPTS": "0"}},
    "tf-tensors": {"tensors": True},  # a per-fit lever (no copy of the arrays per trial): shows in fit_s, not epoch_s
    "fused-lstm": {"fused": True},  # LSTM only: TensorFlow's fused whole-sequence kernel (see fused_lstm_layer)
    # Keras's mixed precision: bfloat16 products (AMX or AVX-512 BF16 where the CPU has them), float32 weights and
    # softmax. Not the same arithmetic as the floor's float32 products: its loss and accuracy show what it changes.
    "mixed-bf16": {"policy": "mixed_bfloat16"},
    # oneDNN's floating-point math mode: float32 weights and activations, products computed in bfloat16 (AMX or
    # AVX-512 BF16) where oneDNN runs them. Likewise not the floor's arithmetic: the loss shows the difference.
    "fpmath-bf16": {"env": {"ONEDNN_DEFAULT_FPMATH_MODE": "BF16"}},
    "shipped-fpmath-bf16": {"shipped": True, "env": {"ONEDNN_DEFAULT_FPMATH_MODE": "BF16"}},
}
ONLY = {"fused-lstm": "LSTM"}  # levers that apply to one cell
QUICK_LEVERS = ["original", "shipped"]


def flops_per_sample(cell: str, units: int, *, steps: int = 28, features: int = 28, classes: int = 10) -> int:
    """Matrix-product FLOPs (2 per multiply-add) of one image, forward + backward, one recurrent layer.

    Per time step the forward pass multiplies the input (features x g*units) and the state (units x g*units),
    g gates. Backward: the state product costs two more (gradient of the weights and of the state), the input
    product one (gradient of the weights: the input needs none). Dense(10): forward + weights + state gradient.
    Element-wise work (activations, gates, the optimizer) is not counted: it is the floor of matrix products.
    """
    g = GATES[cell]
    macs = steps * (2 * features * g * units + 3 * units * g * units) + 3 * units * classes
    return 2 * macs


def child(job: dict) -> dict:
    """One measurement, in this (fresh) process."""
    if job.get("threads"):
        import tensorflow as tf

        tf.config.threading.set_intra_op_parallelism_threads(job["threads"][0])
        tf.config.threading.set_inter_op_parallelism_threads(job["threads"][1])
    import keras

    from tuner import data, models

    rate = benchlib.matmul_rate()
    full = data.load()
    n, bs = job["n"], job["batch_size"]
    x, y = full.x_train[:n], full.y_train[:n]
    if job.get("tensors"):
        import tensorflow as tf

        x, y = tf.constant(x), tf.constant(y)
    warm_n = 4 * bs + n % bs
    warm = data.Splits(x[:warm_n], y[:warm_n], None, None, full.x_test, full.y_test, full.source)
    train = data.Splits(x, y, None, None, full.x_test, full.y_test, full.source)
    config = models.ModelConfig(cell=job["cell"], units=job["units"])
    if job.get("shipped"):
        models.limit_malloc_arenas()  # as the objective does for every worker
        model = models.build_model(config, seed=0)
    else:  # build_model as it was before any speed lever, plus this variant's levers
        keras.backend.clear_session()
        keras.utils.set_random_seed(0)
        keras.mixed_precision.set_global_policy(job.get("policy", "float32"))
        layer_cls = fused_lstm_layer() if job.get("fused") else getattr(keras.layers, config.cell)
        layer = layer_cls(config.units, unroll=bool(job.get("unroll")))
        head = keras.layers.Dense(10, activation="softmax", dtype="float32")  # float32 under any policy
        model = keras.Sequential([keras.Input((28, 28)), layer, head])
        model.compile(optimizer=keras.optimizers.Adam(learning_rate=0.001), loss="sparse_categorical_crossentropy",
                      metrics=["accuracy"], jit_compile=bool(job.get("jit")),
                      steps_per_execution=job.get("spe", 1))  # fmt: skip
    fit = models.train if job.get("shipped") else keras_fit
    if job.get("shipped"):
        benchlib.as_in_a_trial(model, n, bs)
    t = time.perf_counter()
    fit(model, warm, batch_size=bs, epochs=1, seed=0, evaluate_test=False)
    warm_s = time.perf_counter() - t
    result = fit(model, train, batch_size=bs, epochs=1, seed=0, evaluate_test=False)
    rate_after = benchlib.matmul_rate()
    if rate_after["gflops"] > rate["gflops"]:
        rate = rate_after
    epoch = result.epochs[0]
    floor = flops_per_sample(job["cell"], job["units"]) * n / (rate["gflops"] * 1e9)
    return {
        "config": f"{job['cell']}-{job['units']} batch {bs}",
        "variant": job["variant"],
        "n_train": n,
        "epoch_s": epoch.seconds,
        "fit_s": result.fit_seconds,
        "warmup_s": warm_s,
        "floor_s": floor,
        "ratio": epoch.seconds / floor,
        "gflop_per_epoch": flops_per_sample(job["cell"], job["units"]) * n / 1e9,
        "matmul_gflops": rate["gflops"],
        "matmul": rate["which"],
        "matmul_all": rate["all"],
        "loss": epoch.loss,
        "accuracy": epoch.accuracy,
        "last_batch_accuracy": epoch.last_batch_accuracy,
        "jit_compile": bool(model.jit_compile),
        "dtype_policy": keras.mixed_precision.global_policy().name,
        "steps_per_execution": model.steps_per_execution,
        "threads": [_threads("intra"), _threads("inter")],
        "onednn": os.environ.get("TF_ENABLE_ONEDNN_OPTS", "unset"),
        "fpmath": os.environ.get("ONEDNN_DEFAULT_FPMATH_MODE", "unset"),
        "contended": benchlib.contended(),
        "load_average_1min": os.getloadavg()[0],
    }


def fused_lstm_layer():
    """Keras's LSTM whose 28 steps run as one op: TensorFlow's `BlockLSTM`, the fused CPU kernel (forward and
    backward over the whole sequence) behind the old `tf.contrib.rnn.LSTMBlockFusedCell`. Same weights, same
    arithmetic: `BlockLSTM` takes the gates in the order i, c, f, o where Keras keeps i, f, c, o, so the columns
    are reordered on the way in; no forget bias of its own, no peepholes, no cell clipping. (`BlockLSTMV2` takes
    Keras's order, but the gradient TensorFlow 2.21 registers for it is `BlockLSTM`'s, in the other order: its
    weight gradients come out wrong, checked against Keras's LSTM.)"""
    import keras
    import tensorflow as tf

    def reorder(t):
        i, f, c, o = tf.split(t, 4, axis=-1)
        return tf.concat([i, c, f, o], axis=-1)

    class FusedLSTM(keras.layers.LSTM):
        def inner_loop(self, sequences, initial_state, mask, training=False):
            cell = self.cell
            w = reorder(tf.concat([cell.kernel.value, cell.recurrent_kernel.value], axis=0))
            x = tf.transpose(sequences, [1, 0, 2])  # time-major
            steps, batch = tf.shape(x)[0], tf.shape(x)[1]
            zeros, none = tf.zeros(tf.stack([batch, cell.units])), tf.zeros([cell.units])
            _, c, _, _, _, _, h = tf.raw_ops.BlockLSTM(
                seq_len_max=tf.cast(steps, tf.int64), x=x, cs_prev=zeros, h_prev=zeros, w=w, wci=none, wcf=none,
                wco=none, b=reorder(cell.bias.value), forget_bias=0.0, cell_clip=-1.0, use_peephole=False,
            )  # fmt: skip
            outputs = tf.transpose(h, [1, 0, 2]) if self.return_sequences else tf.expand_dims(h[-1], 1)
            return h[-1], outputs, [h[-1], c[-1]]

    return FusedLSTM


def keras_fit(model, splits, *, batch_size: int, epochs: int, seed: int, evaluate_test: bool):
    """Keras's own `fit` on the arrays (its array pipeline, `shuffle=True`), timed by tuner's recorder: the path
    before tuner's input pipeline (`tuner.models.batches`)."""
    import keras

    from tuner import models

    keras.utils.set_random_seed(seed)
    result = models.FitResult()
    recorder = last_batch_from_running_means()(result, batch_size=batch_size, n_train=len(splits.y_train))
    start = time.perf_counter()
    model.fit(splits.x_train, splits.y_train, batch_size=batch_size, epochs=epochs, shuffle=True, verbose=0,
              callbacks=[recorder])  # fmt: skip
    result.fit_seconds = time.perf_counter() - start
    return result


def last_batch_from_running_means():
    """tuner's recorder for models compiled with Keras's `accuracy` only (the levers'): the last batch's accuracy
    is recovered after every call from Keras's running mean, weighted by samples, as tuner did before it ran
    several steps a call: the batch's count of correct answers is the difference of two running totals. Right
    at one step a call only (at 8, the `spe8` lever's figure is off)."""
    from tuner import models

    class Recorder(models._callback_classes().Recorder):
        def __init__(self, result, *, batch_size: int, n_train: int) -> None:
            super().__init__(result, stop=False)
            self.batch_size, self.n_train = batch_size, n_train

        def on_epoch_begin(self, epoch, logs=None):
            super().on_epoch_begin(epoch, logs)
            self.seen, self.correct, self.last = 0, 0.0, float("nan")

        def on_train_batch_end(self, batch, logs=None):
            size = min(self.batch_size, self.n_train - batch * self.batch_size)
            seen = self.seen + size
            correct = float((logs or {}).get("accuracy", 0.0)) * seen
            self.last = round(correct - self.correct) / size
            self.seen, self.correct = seen, correct

        def on_epoch_end(self, epoch, logs=None):
            super().on_epoch_end(epoch, logs)
            self.result.epochs[-1].last_batch_accuracy = self.last

    return Recorder


def _threads(kind: str) -> int:
    import tensorflow as tf

    return getattr(tf.config.threading, f"get_{kind}_op_parallelism_threads")()


def run(job: dict) -> dict:
    env = {**os.environ, **job.get("env", {})}
    out = subprocess.run([sys.executable, __file__, "--child", json.dumps(job)], capture_output=True, text=True,
                         env=env, check=False)  # fmt: skip
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if out.returncode or not lines:
        raise RuntimeError(f"{job['variant']} {job['cell']} failed:\n{out.stderr[-3000:]}")
    return json.loads(lines[-1])


def main() -> None:
    p = benchlib.parser(__doc__.split("\n\n")[0])
    p.add_argument("--child", help=argparse_hidden())
    p.add_argument("--levers", default=None, help="comma-separated variants (default: all; --quick: a few)")
    p.add_argument("--lever-configs", default="SimpleRNN,LSTM,GRU", help="cells whose lever table is measured")
    p.add_argument("--lever-n", type=int, default=N_LEVERS, help=f"training images of the lever table ({N_LEVERS})")
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))), flush=True)
        return
    cells = args.lever_configs.split(",")
    if args.quick:
        plan = [
            (c, name, N_QUICK) for c in CONFIGS for name in (args.levers.split(",") if args.levers else QUICK_LEVERS)
        ]
    else:
        levers = args.levers.split(",") if args.levers else [n for n in LEVERS if n != "shipped"]
        plan = [(c, name, N_FULL) for c in CONFIGS for name in GOAL]
        plan += [
            (c, name, args.lever_n) for c in CONFIGS if c[0] in cells for name in levers if ONLY.get(name, c[0]) == c[0]
        ]
    machine = benchlib.machine()
    print(f"machine: {machine}")
    rows = []
    for (cell, units, bs), name, n in plan:
        job = {"variant": name, "cell": cell, "units": units, "batch_size": bs, "n": n, **LEVERS[name]}
        row = run(job)
        rows.append(row)
        best = max(r["matmul_gflops"] for r in rows)  # the best rate seen in this run: a floor less hit by load
        for r in rows:
            r["floor_best_s"] = r["gflop_per_epoch"] / best
            r["ratio_best"] = r["epoch_s"] / r["floor_best_s"]
        print(f"{row['config']:24} {name:14} n {n:6} epoch {row['epoch_s']:6.2f}s floor {row['floor_s']:5.2f}s "
              f"ratio {row['ratio']:5.2f} warm-up {row['warmup_s']:5.1f}s matmul {row['matmul_gflops']:4.0f} "
              f"GF/s load {row['load_average_1min']:4.1f} | loss {row['loss']:.6f} acc {row['accuracy']:.6f} last "
              f"{row['last_batch_accuracy']:.6f}", flush=True)  # fmt: skip
        benchlib.write_json(args.json, rows)
    print("\nshipped path (tuner.models as it is):")
    for row in rows:
        if row["variant"] == "shipped":
            verdict = "met" if row["ratio"] <= 1.5 else f"missed by {row['ratio'] / 1.5:.1f}x"
            print(f"  {row['config']:24} {row['epoch_s']:6.2f}s / floor {row['floor_s']:.2f}s = {row['ratio']:.2f} "
                  f"(goal <= 1.5: {verdict}); against the run's best matmul rate {row['ratio_best']:.2f}")  # fmt: skip
    if args.json:
        meta = args.json.rsplit(".", 1)[0] + ".machine.json"
        benchlib.write_json(meta, machine)


def argparse_hidden():
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    main()
