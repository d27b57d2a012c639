"""What every benchmark shares: the command line, the machine description, a matrix-product rate, JSON output.

Benchmarks print their figures and, with `--json PATH`, write them; nothing here asserts on time.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `python bench/NAME.py` from a checkout runs this checkout's tuner
    sys.path.insert(0, str(ROOT))

# Before anything imports TensorFlow: importing tuner sets TensorFlow's environment as the `tuner` command
# has it (tuner/__init__.py), so that every benchmark trains on the command's configuration.
import tuner  # noqa: E402, F401


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="a small run (about a minute) to check the harness")
    p.add_argument("--json", metavar="PATH", help="also write the figures to this JSON file")
    return p


def write_json(path: str | None, payload) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(payload, indent=2, default=float) + "\n", encoding="utf-8")
        print(f"wrote {path}")


def machine() -> dict:
    """CPU model, cores, memory, library versions, and whether the repro run was using the cores meanwhile."""
    info = {"python": platform.python_version(), "cores": os.cpu_count()}
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        fields = dict(line.split(":", 1) for line in lscpu.splitlines() if ":" in line)
        fields = {k.strip(): v.strip() for k, v in fields.items()}
        # machines of one model name differ here in family, vector units and cache (the rounds' kinds)
        info["cpu"] = fields.get("Model name")
        info["cpu_family"] = fields.get("CPU family")
        info["cpu_model"] = fields.get("Model")
        flags = set(fields.get("Flags", "").split())
        vector_units = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "amx_tile")
        info["vector_isa"] = [f for f in vector_units if f in flags]
        info["l3_cache"] = fields.get("L3 cache")
    except OSError:
        pass
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            kb = int(next(line for line in f if line.startswith("MemTotal")).split()[1])
        info["memory_gib"] = round(kb / 2**20, 1)
    except (OSError, StopIteration, ValueError):
        pass
    for name in ("optuna", "tensorflow", "keras", "numpy"):
        try:
            from importlib.metadata import version

            info[name] = version(name)
        except Exception:  # noqa: BLE001 - a missing package is reported as missing
            info[name] = None
    info["load_average_1min"] = os.getloadavg()[0]
    info["contended"] = contended()
    return info


def as_in_a_trial(model, n: int, batch_size: int, epochs: int = 5) -> None:
    """Before a warm-up fit on a few batches: the steps per call that `tuner.models.train` gives a model whose
    first trial is `epochs` epochs (the document's 5) on `n` images, not what the warm-up alone would get."""
    from tuner import models

    choose = getattr(models, "choose_steps_per_execution", None)  # tuner before the nineteenth round: none
    if choose is not None:
        choose(model, epochs * math.ceil(n / batch_size))
        model.make_train_function()  # made, not traced: `train` now keeps the choice through the warm-up


def start_training(configs: list, selected: str) -> tuple[dict, list]:
    """What a training benchmark does first: glibc's malloc arenas capped as the objective caps them for every
    worker, the machine printed. Returns the machine and the `configs` whose cell is in `selected` (a,b,c)."""
    from tuner import models

    models.limit_malloc_arenas()
    info = machine()
    print(f"machine: {info}")
    return info, [c for c in configs if c[0] in selected.split(",")]


def contended() -> bool:
    """True while the long reproduction run (that uses both cores) has not finished."""
    path = Path("/tmp/repro/times.txt")
    try:
        return path.exists() and len(path.read_text().splitlines()) < 6
    except OSError:
        return False


def matmul_rate(n: int = 2048, repeats: int = 5) -> dict:
    """Best-of-`repeats` float32 n x n matrix-product rate, in GFLOP/s, with numpy and with tf.matmul."""
    import numpy as np

    rng = np.random.default_rng(0)
    a, b = rng.random((n, n), dtype=np.float32), rng.random((n, n), dtype=np.float32)
    flops = 2 * n**3
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(repeats))
    rates = {"numpy": flops / best / 1e9}
    try:
        import tensorflow as tf

        ta, tb = tf.constant(a), tf.constant(b)
        tf.matmul(ta, tb).numpy()
        best = min(_timed(lambda: tf.matmul(ta, tb).numpy()) for _ in range(repeats))
        rates["tf"] = flops / best / 1e9
    except ImportError:
        pass
    which = max(rates, key=rates.get)
    return {"gflops": rates[which], "which": f"{which} {n}x{n} float32 matmul, best of {repeats}", "all": rates}


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t
