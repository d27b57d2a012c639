"""What the rest of a train step costs: goal 1's epochs with the recurrence's dependence between steps taken out.

    python bench/recurrence_bound.py --json bench/results/recurrence_bound.json    # about 5 minutes on 2 cores
    python bench/recurrence_bound.py --quick

Goal 1 (`bench/train_speed.py`) asks for an epoch within 1.5x of its floor (the epoch's matrix-product FLOPs at the
2048x2048 rate). `bench/step_products.py` bounds the recurrence's 56 dependent products; this bounds the rest.
For each of goal 1's configurations two models are built by `tuner.models.build_model` from the same seed and
trained by `tuner.models.train` in turns, one full-data epoch each per round, so that the machine's drift hits
both alike:
- `shipped`: the model as `tuner grid` and `tuner search` train it;
- `chainless`: the same model with its recurrence replaced by a stand-in without the dependence between steps
  (`chainless_layer`): every step's state is tanh of the first `units` columns of its own input product, and
  backward the last state's gradient reaches every step through that tanh alone. Everything else of the train
  step stays: the input products of all gates and their gradients, the recurrent kernel's gradient (one product
  of the same size as the real one), the dense layer, the loss, Adam's updates of the same variables, Keras's
  loop and tuner's pipeline. It drops the 56 dependent products and the gates' per-step elementwise work.

So the chainless epoch is what the rest of the step costs. A kernel for the recurrence, however it is made, adds
its own time to it: at best the dependent products at the rate numpy's BLAS runs them (timed here as
`bench/step_products.py` does), with the gates' elementwise work free. `best_kernel_s` is that sum, and
`best_kernel_ratio` its ratio to the floor: if it is above 1.5, no implementation of the recurrence alone can
meet goal 1 on this machine. The stand-in computes another function: its loss is not comparable. Beside it, what
the step's whole-sequence tensors (steps x batch x g*units floats) cost: one elementwise pass over one, and the
input product of all steps (inner dimension 28), which the floor counts at the 2048x2048 rate.
"""

from __future__ import annotations

import math
import statistics

import benchlib
import numpy as np
from fused_rnn import alternating_epochs, build
from step_products import _state, numpy_chain
from train_speed import CONFIGS, GATES, N_FULL, N_QUICK, flops_per_sample


def kernel_gradient(hs, dxw):
    """The recurrent kernel's gradient as one TensorFlow product over all steps: the states of steps 0..T-2
    against the gradients of the input products of steps 1..T-1."""
    import tensorflow as tf

    units, width = hs.shape[-1], dxw.shape[-1]
    return tf.matmul(tf.reshape(hs[:-1], (-1, units)), tf.reshape(dxw[1:], (-1, width)), transpose_a=True)


def _chainless_run():
    """The stand-in recurrence, as a `tf.custom_gradient` of (xw, recurrent_kernel, recurrent_bias):
    xw is every step's input product with its bias, (steps, batch, g*units). Returns the last state."""
    import tensorflow as tf

    @tf.custom_gradient
    def run(xw, kernel, rbias):
        units = kernel.shape[0]
        hs = tf.tanh(xw[..., :units] + rbias[:units])

        def grad(dy):
            dz = tf.raw_ops.TanhGrad(y=hs, dy=tf.broadcast_to(dy, tf.shape(hs)))
            dxw = tf.pad(dz, [[0, 0], [0, 0], [0, kernel.shape[1] - units]])  # the other gates' columns: zero
            return dxw, kernel_gradient(hs, dxw), tf.reduce_sum(dxw, (0, 1))

        return hs[-1], grad

    return run


def last_state_layer(cell: str, run):
    """tuner's layer for `cell` (Keras's for LSTM, with tuner's training path around it), returning the last
    state only, whose recurrence is `run(xw, recurrent_kernel, recurrent_bias)`: xw is every step's input
    product with its bias, (steps, batch, g*units), made by TensorFlow as one product."""
    import keras
    import tensorflow as tf

    from tuner import recurrent

    base = getattr(recurrent, cell, None) or type(cell, (recurrent._Fused, getattr(keras.layers, cell)), {})

    class LastState(base):
        def _recurrence(self, x, cell):
            if self.return_sequences:
                raise NotImplementedError("this recurrence returns the last state only")
            bias = cell.bias
            input_bias, rbias = (bias[0], bias[1]) if len(bias.shape) == 2 else (bias, tf.zeros_like(bias))
            steps, width = x.shape[1], cell.kernel.shape[1]
            flat = tf.reshape(tf.transpose(x, (1, 0, 2)), (-1, x.shape[-1]))
            xw = tf.reshape(tf.matmul(flat, cell.kernel) + input_bias, (steps, -1, width))
            last = run(xw, tf.convert_to_tensor(cell.recurrent_kernel), tf.convert_to_tensor(rbias))
            return last, [last] if isinstance(cell.state_size, list | tuple) and len(cell.state_size) == 2 else []

    return LastState


def chainless_layer(cell: str):
    """The layer for `cell` with the stand-in recurrence: same weights, same input products, no dependence
    between steps."""
    return last_state_layer(cell, _chainless_run())


def numpy_chain_seconds(cell: str, units: int, batch: int, repeats: int) -> float:
    """Best time of one batch's 56 dependent products with numpy (bench/step_products.py's chain)."""
    h0, u = _state(np.random.default_rng(0), batch, units, GATES[cell])
    chain = numpy_chain(h0, u)
    return min(benchlib._timed(chain) for _ in range(repeats))


PASSES = 20  # passes a loop runs to time one (large_tensor_costs)


def large_tensor_costs(cell: str, units: int, batch: int, repeats: int) -> dict:
    """What the step's whole-sequence tensors cost inside a graph, best of `repeats`: one elementwise pass over
    a (steps, batch, g*units) float32 tensor (`x + 1`: it reads and writes it all), and the input product of all
    steps, (steps*batch) x 28 by 28 x g*units, with its bias, as the layers make it. Each is timed as the
    difference between a tf.function that runs it PASSES times in a loop (each pass on the last one's result)
    and the same function run 0 times, so that the call (0.3-0.5 ms on some machines) and the copy of the result
    are not counted. (Before the fifteenth round's second run each was one call of its own, copy included.)"""
    import tensorflow as tf

    rng = np.random.default_rng(0)
    width = GATES[cell] * units
    big = tf.constant(rng.standard_normal((28, batch, width), dtype=np.float32))
    x = tf.constant(rng.standard_normal((28 * batch, 28), dtype=np.float32))
    kernel = tf.constant(rng.standard_normal((28, width), dtype=np.float32))
    bias = tf.constant(rng.standard_normal((width,), dtype=np.float32))

    @tf.function
    def elementwise(a, k):
        return tf.while_loop(lambda i, a: i < k, lambda i, a: (i + 1, a + 1.0), (tf.constant(0), a))[1][0, 0, 0]

    @tf.function
    def product(x, w, b, k):
        def body(i, w):  # the next product depends on this one (a 28-row slice of it added to the kernel)
            return i + 1, w + 1e-9 * (tf.matmul(x, w) + b)[:28]

        return tf.while_loop(lambda i, w: i < k, body, (tf.constant(0), w))[1][0, 0]

    def per_pass(fn, *args) -> float:
        def best(passes: int) -> float:
            count = tf.constant(passes)
            fn(*args, count).numpy()
            return min(benchlib._timed(lambda: fn(*args, count).numpy()) for _ in range(repeats))

        return (best(PASSES) - best(0)) / PASSES

    pass_s, product_s = per_pass(elementwise, big), per_pass(product, x, kernel, bias)
    return {
        "tensor_mib": big.numpy().nbytes / 2**20,
        "elementwise_pass_us": 1e6 * pass_s,
        "elementwise_gbytes_per_s": 2 * big.numpy().nbytes / pass_s / 1e9,  # read and write
        "input_product_us": 1e6 * product_s,
        "input_product_gflops": 2 * 28 * batch * 28 * width / product_s / 1e9,
        "in_graph": True,
    }


def measure(cell: str, units: int, batch: int, *, n: int, rounds: int, repeats: int) -> dict:
    rate = benchlib.matmul_rate()["gflops"]
    variants = {"shipped": build(cell, units), "chainless": build(cell, units, chainless_layer(cell))}
    first_s, epochs = alternating_epochs(variants, n=n, batch_size=batch, rounds=rounds)
    chain_batch_s = numpy_chain_seconds(cell, units, batch, repeats)
    tensors = large_tensor_costs(cell, units, batch, repeats)
    rate = max(rate, benchlib.matmul_rate()["gflops"])
    floor = flops_per_sample(cell, units) * n / (rate * 1e9)
    median = {name: statistics.median(e["seconds"] for e in rows) for name, rows in epochs.items()}
    chain_s = math.ceil(n / batch) * chain_batch_s
    best = median["chainless"] + chain_s
    return {
        "config": f"{cell}-{units} batch {batch}",
        "n_train": n,
        "rounds": rounds,
        "matmul_gflops": rate,
        "floor_s": floor,
        "first_call_s": first_s,
        "median_epoch_s": median,
        "ratio": {name: seconds / floor for name, seconds in median.items()},
        "numpy_chain_batch_s": chain_batch_s,
        "numpy_chain_epoch_s": chain_s,
        "best_kernel_s": best,
        "best_kernel_ratio": best / floor,
        **tensors,
        "epochs": epochs,
    }


def main() -> None:
    p = benchlib.parser(__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=5, help="epochs per model, alternating (5)")
    p.add_argument("--configs", default="SimpleRNN,LSTM,GRU", help="cells to measure")
    args = p.parse_args()
    n, rounds, repeats = (N_QUICK, 2, 5) if args.quick else (N_FULL, args.rounds, 20)
    machine, configs = benchlib.start_training(CONFIGS, args.configs)
    rows = []
    for cell, units, batch in configs:
        row = measure(cell, units, batch, n=n, rounds=rounds, repeats=repeats)
        rows.append(row)
        m, ratio = row["median_epoch_s"], row["ratio"]
        print(f"{row['config']:24} n {n}: shipped {m['shipped']:.2f} s an epoch = {ratio['shipped']:.2f}x the floor "
              f"({row['floor_s']:.2f} s), without the dependence between steps {m['chainless']:.2f} s = "
              f"{ratio['chainless']:.2f}x (median of {rounds}); the dependent products at numpy's rate add "
              f"{row['numpy_chain_epoch_s']:.2f} s: a recurrence kernel could at best reach "
              f"{row['best_kernel_s']:.2f} s = {row['best_kernel_ratio']:.2f}x (goal <= 1.5). One elementwise pass "
              f"over a whole-sequence tensor ({row['tensor_mib']:.1f} MiB) {row['elementwise_pass_us']:.0f} us "
              f"({row['elementwise_gbytes_per_s']:.1f} GB/s), the input product of all steps "
              f"{row['input_product_us']:.0f} us ({row['input_product_gflops']:.0f} GFLOP/s)", flush=True)  # fmt: skip
        benchlib.write_json(args.json, {"machine": machine, "rows": rows})


if __name__ == "__main__":
    main()
