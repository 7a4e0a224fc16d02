"""MNIST from the raw IDX files, in torchvision's layout: ``<root>/MNIST/raw/*-ubyte``.

``root`` is the folder that holds ``MNIST/`` (what ``torchvision.datasets.MNIST(root)`` takes);
``<root>/mnist`` is also searched, so a data root holding several datasets works too. The data are
small (47 MB as uint8), so they live on the training device as normalised tensors.
"""
from __future__ import annotations

import math
import os
import struct
from typing import Any

import numpy as np

from dbx.data import resolve_root
from dbx.data.images import AugmentSpec, ImageArrays, image_splits
from dbx.errors import UserError
from dbx.protocols import DataSplits

__all__ = ["mnist", "MNIST_MEAN", "MNIST_STD"]

MNIST_MEAN = (0.1307,)
MNIST_STD = (0.3081,)
_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def mnist(*, root: str | None = None, augment: bool = False, device_resident: bool = True,
          download: bool = False) -> DataSplits:
    """MNIST: 60,000 training and 10,000 test images, 1x28x28, 10 classes.

    ``augment``: random crop 28 with padding 2 (no flip: digits are not mirror-symmetric).
    ``device_resident``: see ``cifar10``. ``download``: fetch the files with torchvision.
    """
    root = resolve_root(root)
    candidates = [root, os.path.join(root, "mnist")]
    base = next((c for c in candidates if _complete(c)), None)
    if base is None and download:
        from torchvision.datasets import MNIST

        try:
            MNIST(root, train=True, download=True)
        except Exception as exc:  # noqa: BLE001
            raise UserError(f"downloading MNIST into {root} failed ({type(exc).__name__}: {exc})") from exc
        base = next((c for c in candidates if _complete(c)), None)
    if base is None:
        looked = " and ".join(os.path.join(c, "MNIST", "raw") for c in candidates)
        raise UserError(
            f"MNIST not found: looked for {', '.join(_FILES)} in {looked}. Put the four uncompressed IDX "
            f"files (from https://ossci-datasets.s3.amazonaws.com/mnist/ or yann.lecun.com) in "
            f"{os.path.join(root, 'MNIST', 'raw')}, or set data.params.download: true, or point data.root "
            f"(or $DBX_DATA_ROOT) at the folder that holds MNIST/."
        )
    raw = os.path.join(base, "MNIST", "raw")
    train = _read_split(os.path.join(raw, _FILES[0]), os.path.join(raw, _FILES[1]))
    test = _read_split(os.path.join(raw, _FILES[2]), os.path.join(raw, _FILES[3]))
    arrays = ImageArrays(*train, *test)
    return image_splits(arrays, num_classes=10, mean=MNIST_MEAN, std=MNIST_STD,
                        augment=AugmentSpec(padding=2) if augment else None,
                        device_resident=device_resident, description="MNIST")


def _complete(base: str) -> bool:
    return all(os.path.isfile(os.path.join(base, "MNIST", "raw", f)) for f in _FILES)


def _read_split(images_path: str, labels_path: str) -> tuple[Any, Any]:
    """uint8 images (N, 1, H, W) and int64 labels (N,), checked against each other before any run."""
    import torch

    images = _read_idx(images_path, dims=3, what="images")
    labels = _read_idx(labels_path, dims=1, what="labels")
    if images.shape[0] != labels.shape[0]:
        raise UserError(f"{images_path} holds {images.shape[0]} images but {labels_path} holds {labels.shape[0]} "
                        f"labels; the files are from different sets or cut short: download the four files again")
    outside = np.flatnonzero(labels > 9)
    if outside.size:
        raise UserError(f"{labels_path}: label {labels[outside[0]]} (sample {outside[0]}) is outside 0..9 "
                        f"({outside.size} such labels); the file is damaged or not MNIST's: download it again")
    return torch.from_numpy(images).unsqueeze(1), torch.from_numpy(labels.astype(np.int64))


def _read_idx(path: str, *, dims: int, what: str) -> np.ndarray:
    """An IDX file of unsigned bytes: magic ``00 00 08 ndim``, big-endian uint32 sizes, the data."""
    with open(path, "rb") as handle:
        raw = bytearray(handle.read())
    if len(raw) < 4 or raw[:3] != b"\x00\x00\x08":
        raise UserError(f"{path} is not an uncompressed IDX file of unsigned bytes (it starts with {bytes(raw[:4])!r}); "
                        f"gunzip it if it is the .gz download, else download it again")
    if raw[3] != dims:
        raise UserError(f"{path} has {raw[3]} dimensions; an MNIST {what} file has {dims}: are the file names swapped?")
    header = 4 + 4 * dims
    if len(raw) < header:
        raise UserError(f"{path} is cut short inside its header; download it again")
    shape = struct.unpack(f">{dims}I", raw[4:header])
    expected = math.prod(shape)
    if len(raw) - header != expected:
        raise UserError(f"{path}: its header says {' x '.join(map(str, shape))} = {expected:,} bytes of {what}, but it "
                        f"holds {len(raw) - header:,}; the file is cut short or damaged: download it again")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)
