"""MNIST (or any set shaped like it) as 28 time steps of 28 features, loaded once per process.

The package carries the real MNIST in Keras's `mnist.npz` layout (`datasets/mnist.npz`, made by
`scripts/make_mnist.py`); its content checksum is verified on every load, so a damaged install is caught
before any compute is spent. `--data PATH` loads any other npz with the same four arrays.
"""

from __future__ import annotations

import functools
import hashlib
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tuner.errors import DataError

BUNDLED = Path(__file__).resolve().parent / "datasets" / "mnist.npz"
BUNDLED_SHA256 = "67c5a2534dd720d8e0a9035bdec7367d42dd58efbc8b13646a69d97e0d25f883"
KEYS = ("x_train", "y_train", "x_test", "y_test")
VALIDATION_SIZE = 10_000  # the standard hold-out: the last 10,000 training images


def content_sha256(arrays: dict[str, np.ndarray]) -> str:
    """A checksum of the arrays themselves (dtype, shape, bytes), independent of zip timestamps."""
    digest = hashlib.sha256()
    for key in KEYS:
        arr = np.ascontiguousarray(arrays[key])
        digest.update(f"{key}:{arr.dtype.str}:{arr.shape}".encode())
        digest.update(arr.tobytes())
    return digest.hexdigest()


@dataclass(frozen=True)
class Splits:
    """Arrays ready for Keras: x float32 in [0, 1] shaped (n, 28, 28), y int32 labels 0..9."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray | None
    y_val: np.ndarray | None
    x_test: np.ndarray
    y_test: np.ndarray
    source: str

    def describe(self) -> dict:
        return {
            "data_source": self.source,
            "n_train": int(len(self.y_train)),
            "n_val": 0 if self.y_val is None else int(len(self.y_val)),
            "n_test": int(len(self.y_test)),
        }


@functools.lru_cache(maxsize=4)
def load_arrays(path: str | None = None) -> dict[str, np.ndarray]:
    """Read and check the four arrays; cached, so a worker reads the file once however many trials run."""
    file = BUNDLED if path is None else Path(path)
    if not file.is_file():
        hint = " (reinstall tuner: its data file is missing)" if path is None else ""
        raise DataError(f"data file not found: {file}{hint}")
    try:
        with np.load(file, allow_pickle=False) as npz:
            missing = [k for k in KEYS if k not in npz.files]
            if missing:
                raise DataError(f"{file}: missing array(s) {', '.join(missing)}; expected {', '.join(KEYS)}")
            arrays = {k: npz[k] for k in KEYS}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise DataError(f"{file}: not a readable .npz file ({exc.__class__.__name__})") from None
    _check_shapes(file, arrays)
    if path is None and content_sha256(arrays) != BUNDLED_SHA256:
        raise DataError(f"{file}: checksum mismatch, the bundled MNIST is damaged; reinstall tuner")
    return arrays


def _check_shapes(file: Path, arrays: dict[str, np.ndarray]) -> None:
    for part in ("train", "test"):
        x, y = arrays[f"x_{part}"], arrays[f"y_{part}"]
        if x.ndim == 2 and x.shape[1] == 784:
            arrays[f"x_{part}"] = x = x.reshape(-1, 28, 28)
        if x.ndim != 3 or x.shape[1:] != (28, 28):
            raise DataError(f"{file}: x_{part} has shape {x.shape}, expected (n, 28, 28)")
        if y.ndim != 1 or len(y) != len(x):
            raise DataError(f"{file}: y_{part} has shape {y.shape}, expected ({len(x)},)")
        if len(x) == 0:
            raise DataError(f"{file}: x_{part} is empty")
        if not np.issubdtype(y.dtype, np.integer) or y.min() < 0 or y.max() > 9:
            raise DataError(f"{file}: y_{part} must hold integer labels 0..9")


def _scale(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float32)
    return x / 255.0 if x.max() > 1.0 else x


def stratified_indices(y: np.ndarray, n: int, seed: int) -> np.ndarray:
    """`n` indices of `y` with each class in its original proportion (largest remainder), in a seeded order."""
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(y, return_counts=True)
    exact = counts / counts.sum() * n
    take = np.floor(exact).astype(int)
    for i in np.argsort(exact - take)[::-1][: n - take.sum()]:
        take[i] += 1
    picked = [rng.choice(np.flatnonzero(y == c), size=k, replace=False) for c, k in zip(classes, take)]
    return np.sort(np.concatenate(picked))


@functools.lru_cache(maxsize=8)
def load(path: str | None = None, *, subset: int | None = None, validation: bool = False, seed: int = 0) -> Splits:
    """The splits a study trains on. Cached per process: trials share one copy.

    `validation=True` holds out the last 10,000 training images (scaled down with `subset`) for model
    selection, so the test set is only ever used to report. `subset=N` keeps N stratified training
    examples; the test set stays whole so that test accuracies stay comparable.
    """
    arrays = load_arrays(path)
    x, y = _scale(arrays["x_train"]), arrays["y_train"].astype(np.int32)
    x_val = y_val = None
    if validation:
        n_val = VALIDATION_SIZE if subset is None else max(1, subset // 6)
        if len(y) <= VALIDATION_SIZE:
            raise DataError(f"{len(y)} training images are too few to hold out {VALIDATION_SIZE} for validation")
        x_val, y_val = x[-VALIDATION_SIZE:], y[-VALIDATION_SIZE:]
        x, y = x[:-VALIDATION_SIZE], y[:-VALIDATION_SIZE]
        if subset is not None:
            keep = stratified_indices(y_val, min(n_val, len(y_val)), seed + 1)
            x_val, y_val = x_val[keep], y_val[keep]
    if subset is not None:
        if subset < 10 or subset > len(y):
            raise DataError(f"--subset must be between 10 and {len(y)}, got {subset}")
        keep = stratified_indices(y, subset, seed)
        x, y = x[keep], y[keep]
    source = "bundled MNIST" if path is None else str(path)
    return Splits(x, y, x_val, y_val, _scale(arrays["x_test"]), arrays["y_test"].astype(np.int32), source)
