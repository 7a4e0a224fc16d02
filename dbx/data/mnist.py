"""MNIST from the raw IDX files, in torchvision's layout: ``<root>/MNIST/raw/*-ubyte``.

``root`` is the folder that holds ``MNIST/`` (what ``torchvision.datasets.MNIST(root)`` takes);
``<root>/mnist`` is also searched, so a data root holding several datasets works too. The data are
small (47 MB as uint8), so they live on the training device as normalised tensors.
"""
from __future__ import annotations

import os

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
    from torchvision.datasets import MNIST
    from torchvision.datasets.mnist import read_image_file, read_label_file

    root = resolve_root(root)
    candidates = [root, os.path.join(root, "mnist")]
    base = next((c for c in candidates if _complete(c)), None)
    if base is None and download:
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
    try:
        arrays = ImageArrays(
            read_image_file(os.path.join(raw, _FILES[0])).unsqueeze(1),
            read_label_file(os.path.join(raw, _FILES[1])),
            read_image_file(os.path.join(raw, _FILES[2])).unsqueeze(1),
            read_label_file(os.path.join(raw, _FILES[3])),
        )
    except Exception as exc:  # noqa: BLE001
        raise UserError(f"cannot read the MNIST IDX files in {raw} ({type(exc).__name__}: {exc}); "
                        f"they are damaged or compressed (gunzip the .gz files)") from exc
    return image_splits(arrays, num_classes=10, mean=MNIST_MEAN, std=MNIST_STD,
                        augment=AugmentSpec(padding=2) if augment else None,
                        device_resident=device_resident, description="MNIST")


def _complete(base: str) -> bool:
    return all(os.path.isfile(os.path.join(base, "MNIST", "raw", f)) for f in _FILES)
