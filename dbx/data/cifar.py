"""CIFAR-10 and CIFAR-100 from the standard python-pickle archives, as in the DiveBatch code.

Files: ``<root>/cifar-10-batches-py/{data_batch_1..5, test_batch}`` and
``<root>/cifar-100-python/{train, test}``: the folders the official archives (and
``torchvision.datasets.CIFAR10/100(root, download=True)``) create. ``root`` may also be that folder
itself. Nothing is downloaded unless ``download: true``.

Training augmentation as in the paper (docs/algorithm.md): random crop 32 with padding 4 and horizontal flip; CIFAR-100
adds a random rotation of up to 15 degrees. Normalisation with the means and standard deviations
the authors' code used (pytorch-cifar for CIFAR-10, pytorch-cifar100 for CIFAR-100). By default the
whole dataset lives on the training device and is augmented there in batches (see
``dbx.data.images``).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

from dbx.data import resolve_root
from dbx.data.images import AugmentSpec, ImageArrays, image_splits
from dbx.errors import UserError
from dbx.protocols import DataSplits
from dbx.safe_pickle import UnsafePickle, load_plain

__all__ = ["cifar10", "cifar100", "CIFAR10_MEAN", "CIFAR10_STD", "CIFAR100_MEAN", "CIFAR100_STD"]

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2023, 0.1994, 0.2010)
CIFAR100_MEAN = (0.5070751592371323, 0.48654887331495095, 0.4409178433670343)
CIFAR100_STD = (0.2673342858792401, 0.2564384629170883, 0.27615047132568676)


@dataclass(frozen=True)
class _Layout:
    title: str
    folder: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    label_key: str
    num_classes: int
    url: str
    torchvision_class: str


CIFAR10 = _Layout("CIFAR-10", "cifar-10-batches-py", tuple(f"data_batch_{i}" for i in range(1, 6)), ("test_batch",),
                  "labels", 10, "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", "CIFAR10")
CIFAR100 = _Layout("CIFAR-100", "cifar-100-python", ("train",), ("test",), "fine_labels", 100,
                   "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz", "CIFAR100")


def cifar10(*, root: str | None = None, augment: bool = True, device_resident: bool = True,
            download: bool = False) -> DataSplits:
    """CIFAR-10: 50,000 training and 10,000 test images, 3x32x32, 10 classes.

    ``augment``: crop 32 with padding 4 and horizontal flip on the training split.
    ``device_resident``: hold the data on the training device and augment it there in batches
    (fast); false gives per-image torchvision transforms behind a DataLoader (the classic pipeline).
    ``download``: fetch the archive with torchvision when the files are missing.
    """
    arrays = _load(CIFAR10, resolve_root(root), download)
    return image_splits(arrays, num_classes=10, mean=CIFAR10_MEAN, std=CIFAR10_STD,
                        augment=AugmentSpec(padding=4, flip=True) if augment else None,
                        device_resident=device_resident, description="CIFAR-10")


def cifar100(*, root: str | None = None, augment: bool = True, device_resident: bool = True,
             download: bool = False) -> DataSplits:
    """CIFAR-100 (fine labels): 50,000 training and 10,000 test images, 3x32x32, 100 classes.

    ``augment``: crop 32 with padding 4, horizontal flip, and rotation up to 15 degrees. The other
    parameters are those of ``cifar10``.
    """
    arrays = _load(CIFAR100, resolve_root(root), download)
    return image_splits(arrays, num_classes=100, mean=CIFAR100_MEAN, std=CIFAR100_STD,
                        augment=AugmentSpec(padding=4, flip=True, rotation=15.0) if augment else None,
                        device_resident=device_resident, description="CIFAR-100")


def _load(layout: _Layout, root: str, download: bool) -> ImageArrays:
    candidates = [os.path.join(root, layout.folder), root]
    folder = next((c for c in candidates if _complete(c, layout)), None)
    if folder is None and download:
        _download(layout, root)
        folder = next((c for c in candidates if _complete(c, layout)), None)
    if folder is None:
        files = ", ".join(layout.train_files + layout.test_files)
        raise UserError(
            f"{layout.title} not found: looked for {files} in {candidates[0]} and in {candidates[1]}. "
            f"Download {layout.url} and extract it into {root} (it creates {layout.folder}/), or set "
            f"data.params.download: true, or point data.root (or $DBX_DATA_ROOT) at the folder that holds "
            f"{layout.folder}/."
        )
    train_images, train_labels = _read_batches(folder, layout.train_files, layout)
    test_images, test_labels = _read_batches(folder, layout.test_files, layout)
    return ImageArrays(train_images, train_labels, test_images, test_labels)


def _complete(folder: str, layout: _Layout) -> bool:
    return all(os.path.isfile(os.path.join(folder, f)) for f in layout.train_files + layout.test_files)


def _read_batches(folder: str, files: tuple[str, ...], layout: _Layout) -> tuple[torch.Tensor, torch.Tensor]:
    """The archive's pickled dicts: ``data`` uint8 (N, 3072) in CHW order, labels a list of ints.

    Read with ``dbx.safe_pickle.load_plain``: a file that asks pickle to call anything but what
    rebuilds a uint8 array is refused before anything runs.
    """
    images, labels = [], []
    for name in files:
        path = os.path.join(folder, name)
        try:
            with open(path, "rb") as f:
                entry = load_plain(f, array_dtypes=(np.uint8,), encoding="latin1")
        except UnsafePickle as exc:
            raise UserError(f"refused to read {path}: it asks pickle to call {exc.refused}, which the official "
                            f"{layout.title} archive never holds (dicts, lists, strings, ints and uint8 arrays); "
                            f"nothing from it was run. Delete it and extract {layout.url} again") from exc
        except Exception as exc:  # noqa: BLE001 - any unreadable file is the same user problem
            raise UserError(f"cannot read {path} ({type(exc).__name__}: {exc}); the file is damaged or not "
                            f"from the official python archive: delete it and extract the archive again") from exc
        batch_images, batch_labels = _checked_entry(entry, path, layout)
        images.append(batch_images)
        labels.extend(batch_labels)
    return torch.from_numpy(np.concatenate(images)), torch.tensor(labels, dtype=torch.int64)


def _checked_entry(entry: object, path: str, layout: _Layout) -> tuple[np.ndarray, list[int]]:
    """The images (N, 3, 32, 32) and labels of one batch file, or a UserError saying what is off."""
    def wrong(what: str) -> UserError:
        return UserError(f"{path} is not a {layout.title} batch: {what}; delete it and extract {layout.url} again")

    if not isinstance(entry, dict) or "data" not in entry or layout.label_key not in entry:
        keys = sorted(map(str, entry)) if isinstance(entry, dict) else type(entry).__name__
        raise wrong(f"expected a dict with 'data' and {layout.label_key!r}, got {keys}")
    data, labels = entry["data"], entry[layout.label_key]
    if not isinstance(data, np.ndarray) or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        shape = data.shape if isinstance(data, np.ndarray) else type(data).__name__
        raise wrong(f"'data' should be a uint8 array of shape (N, 3072), got {shape}")
    if not isinstance(labels, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in labels):
        raise wrong(f"{layout.label_key!r} should be a list of ints")
    if len(labels) != data.shape[0]:
        raise wrong(f"{data.shape[0]} images but {len(labels)} labels")
    bad = [v for v in labels if not 0 <= v < layout.num_classes]
    if bad:
        raise wrong(f"label {bad[0]} is outside 0..{layout.num_classes - 1}")
    return data.reshape(-1, 3, 32, 32), labels


def _download(layout: _Layout, root: str) -> None:
    """Fetch and unpack the official archive (its MD5 checked), without torchvision's dataset
    class: that would read the batches with ``pickle.load``."""
    import torchvision
    from torchvision.datasets.utils import download_and_extract_archive

    official = getattr(torchvision.datasets, layout.torchvision_class)
    try:
        download_and_extract_archive(official.url, root, filename=official.filename, md5=official.tgz_md5)
    except Exception as exc:  # noqa: BLE001 - no network, a bad checksum, a read-only folder...
        raise UserError(f"downloading {layout.title} into {root} failed ({type(exc).__name__}: {exc}); "
                        f"download {layout.url} yourself and extract it there") from exc
