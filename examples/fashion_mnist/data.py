"""Fashion-MNIST loading from the Debian package (numpy only, no download)."""

import gzip
import os

import numpy as np

try:  # works both as `examples.fashion_mnist.data` and as a script-local import
    from .model import MEAN, STD
except ImportError:
    from model import MEAN, STD

DATA_DIR = os.environ.get("FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist")


def _read_idx(path, expected_magic):
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"Fashion-MNIST file not found: {path}\n"
            "Install the Debian data set with `apt-get install dataset-fashion-mnist`, "
            "or point FASHION_MNIST_DIR at a folder holding the *-ubyte.gz files."
        )
    with gzip.open(path, "rb") as f:
        data = f.read()
    magic = int.from_bytes(data[0:4], "big")
    if magic != expected_magic:
        raise ValueError(f"{path}: bad IDX magic {magic:#x}, expected {expected_magic:#x}")
    ndim = magic & 0xFF
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    offset = 4 + 4 * ndim
    return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(dims)


def load(split="train", data_dir=DATA_DIR):
    """Return (images uint8 [N,28,28], labels int64 [N]) for split 'train' or 'test'."""
    prefix = {"train": "train", "test": "t10k"}[split]
    images = _read_idx(os.path.join(data_dir, f"{prefix}-images-idx3-ubyte.gz"), 0x803)
    labels = _read_idx(os.path.join(data_dir, f"{prefix}-labels-idx1-ubyte.gz"), 0x801)
    if len(images) != len(labels):
        raise ValueError(f"{split}: {len(images)} images but {len(labels)} labels")
    return images.copy(), labels.astype(np.int64)


def normalize(images_uint8):
    """uint8 [N,28,28] -> float32 [N,1,28,28], scaled to [0,1] then (x - MEAN) / STD."""
    x = np.asarray(images_uint8, dtype=np.float32) / 255.0
    x = (x - MEAN) / STD
    return x[:, None, :, :].astype(np.float32)
