"""The recurrence's dependent matrix products: how fast TensorFlow runs them, against goal 1's floor.

    python bench/step_products.py --json bench/results/step_products.json    # under a minute on 2 cores
    python bench/step_products.py --quick

Goal 1 (`bench/train_speed.py`) divides an epoch's matrix-product FLOPs by the float32 2048x2048 rate. Two of
each time step's products cannot be batched across the 28 steps, because each needs the previous step's
result: the state product forward (batch x units by units x g*units, g gates) and the state gradient backward
(batch x g*units by g*units x units). This runs them as training does, one after the other: a chain of 28
forward and 28 backward products in one tf.function (graph mode, as `fit` runs its train step), and the same
chain with numpy (the BLAS alone, about a microsecond of Python per product), best of several runs. Per
configuration of goal 1:
- the rate TensorFlow reaches on those products, against numpy's on the same chain and the 2048x2048 rate;
- `chain_s`: an epoch's time in those products alone (batches x 56 products at TensorFlow's measured rate);
- `bound_s`: `chain_s` plus the epoch's other matrix-product FLOPs at the 2048x2048 rate: no implementation
  that runs the recurrence as TensorFlow ops, however it fuses or batches the rest, trains an epoch faster on
  this machine; `bound_ratio` is that bound over goal 1's floor (the goal asks for <= 1.5);
- `bound_numpy_s`: the same with numpy's chain: roughly what one fused kernel calling this machine's BLAS for
  each step could reach at best.
"""

from __future__ import annotations

import math

import benchlib
import numpy as np
from train_speed import CONFIGS, GATES, N_FULL, flops_per_sample

STEPS = 28


def _state(rng, batch: int, units: int, g: int):
    """A state and a units x g*units matrix with orthonormal rows, so the chain neither grows nor vanishes."""
    q, _ = np.linalg.qr(rng.standard_normal((g * units, g * units)))
    return rng.standard_normal((batch, units)).astype(np.float32), q[:units].astype(np.float32)


def tf_chain(h0: np.ndarray, u: np.ndarray):
    """28 forward (h @ U) and 28 backward (z @ U^T) dependent products in one tf.function, traced."""
    import tensorflow as tf

    h, w = tf.constant(h0), tf.constant(u)

    @tf.function
    def chain(h):
        for _ in range(STEPS):  # unrolled at trace time: 56 MatMul nodes, each waiting for the last
            h = tf.matmul(tf.matmul(h, w), w, transpose_b=True)
        return h

    chain(h).numpy()
    return lambda: chain(h).numpy()


def numpy_chain(h0: np.ndarray, u: np.ndarray):
    ut = np.ascontiguousarray(u.T)

    def chain():
        h = h0
        for _ in range(STEPS):
            h = (h @ u) @ ut
        return h

    chain()
    return chain


def measure(cell: str, units: int, batch: int, rounds: int, repeats: int) -> dict:
    """Best of `rounds` rounds, each timing both chains `repeats` times and the 2048x2048 rate: this machine's
    speed drifts by up to 2x within minutes, so the three are measured interleaved, not one after another."""
    g = GATES[cell]
    h0, u = _state(np.random.default_rng(0), batch, units, g)
    products = 2 * STEPS
    flops = products * 2 * batch * units * g * units  # one chain: 56 products of batch x units x g*units MACs
    tf_run, np_run = tf_chain(h0, u), numpy_chain(h0, u)
    tf_s = np_s = float("inf")
    rate = 0.0
    for _ in range(rounds):
        tf_s = min(tf_s, *(benchlib._timed(tf_run) for _ in range(repeats)))
        np_s = min(np_s, *(benchlib._timed(np_run) for _ in range(repeats)))
        rate = max(rate, benchlib.matmul_rate(repeats=3)["gflops"])
    batches = math.ceil(N_FULL / batch)
    floor = N_FULL * flops_per_sample(cell, units) / (rate * 1e9)
    rest_flops = N_FULL * flops_per_sample(cell, units) - batches * flops
    chain_s = batches * tf_s
    bound = chain_s + rest_flops / (rate * 1e9)
    bound_numpy = batches * np_s + rest_flops / (rate * 1e9)
    return {
        "config": f"{cell}-{units} batch {batch}",
        "product": f"{batch}x{units} by {units}x{g * units}, and back",
        "tf_us_per_product": 1e6 * tf_s / products,
        "numpy_us_per_product": 1e6 * np_s / products,
        "tf_gflops": flops / tf_s / 1e9,
        "numpy_gflops": flops / np_s / 1e9,
        "matmul_2048_gflops": rate,
        "chain_share_of_flops": batches * flops / (N_FULL * flops_per_sample(cell, units)),
        "floor_s": floor,
        "chain_s": chain_s,
        "bound_s": bound,
        "bound_ratio": bound / floor,
        "bound_numpy_s": bound_numpy,
        "bound_numpy_ratio": bound_numpy / floor,
    }


def main() -> None:
    p = benchlib.parser(__doc__.split("\n\n")[0])
    args = p.parse_args()
    machine = benchlib.machine()
    print(f"machine: {machine}")
    rounds, repeats = (2, 5) if args.quick else (8, 20)
    rows = []
    for cell, units, batch in CONFIGS:
        row = measure(cell, units, batch, rounds, repeats)
        rows.append(row)
        print(f"{row['config']}: dependent products ({row['product']}) {row['tf_us_per_product']:.0f} us each in "
              f"TensorFlow = {row['tf_gflops']:.0f} GFLOP/s, numpy {row['numpy_us_per_product']:.0f} us = "
              f"{row['numpy_gflops']:.0f} GFLOP/s, 2048x2048 {row['matmul_2048_gflops']:.0f} GFLOP/s; they are "
              f"{100 * row['chain_share_of_flops']:.0f}% of the epoch's FLOPs and take {row['chain_s']:.2f} s of "
              f"it; with the rest at the 2048x2048 rate an epoch takes at least {row['bound_s']:.2f} s = "
              f"{row['bound_ratio']:.2f} x the floor ({row['floor_s']:.2f} s; goal <= 1.5); with numpy's chain "
              f"{row['bound_numpy_s']:.2f} s = {row['bound_numpy_ratio']:.2f} x", flush=True)  # fmt: skip
    benchlib.write_json(args.json, {"machine": machine, "rows": rows})


if __name__ == "__main__":
    main()
