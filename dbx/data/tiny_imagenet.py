"""Tiny-ImageNet-200 from the official folder layout, read image by image behind a DataLoader.

Layout (as in http://cs231n.stanford.edu/tiny-imagenet-200.zip, extracted)::

    tiny-imagenet-200/
        wnids.txt                          one WordNet id per line: the classes
        train/<wnid>/images/<wnid>_<k>.JPEG
        val/images/val_<k>.JPEG
        val/val_annotations.txt            "val_<k>.JPEG <tab> <wnid> <tab> box..."

The validation split (labelled) is the test split; the official test split has no labels. Class
indices follow the sorted wnids (as ``torchvision.datasets.ImageFolder`` would number them).

Transforms as in the paper (docs/algorithm.md; the authors' ImageNet recipe at 224 px): training
``RandomResizedCrop(224) + RandomHorizontalFlip``, evaluation ``Resize(256) + CenterCrop(224)``,
then ImageNet normalisation. ``native: true`` keeps the 64 px images instead (training: random crop
64 with padding 4 and flip), 12x less compute per image; at 64 px the whole set also fits on the
training device (``device_resident: true``: 1.2 GB as uint8, 4.9 GB as float32), decoded once and
augmented there in batches like CIFAR.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

import numpy as np
import torch

from dbx.data import resolve_root
from dbx.data.images import AugmentSpec, ImageArrays, image_splits
from dbx.errors import UserError
from dbx.protocols import DataSplits

__all__ = ["tiny_imagenet", "TinyImageNetFolder", "IMAGENET_MEAN", "IMAGENET_STD"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"


class TinyImageNetFolder(torch.utils.data.Dataset):
    """``(transform(RGB PIL image), class index)`` for each image of one split."""

    def __init__(self, samples: list[tuple[str, int]], transform: Callable | None) -> None:
        self.samples = samples
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        from PIL import Image

        path, label = self.samples[index]
        with Image.open(path) as image:
            image = image.convert("RGB")  # a few Tiny-ImageNet images are greyscale
        return (self.transform(image) if self.transform is not None else image), label


def tiny_imagenet(*, root: str | None = None, augment: bool = True, native: bool = False,
                  device_resident: bool = False) -> DataSplits:
    """Tiny-ImageNet-200: 100,000 training and 10,000 validation images, 200 classes.

    ``augment``: the training transforms above (false: the evaluation transform for both).
    ``native``: 64 px inputs instead of 224 px. By default the images are read one at a time by
    DataLoader workers; ``device_resident`` (with ``native``) decodes them all once into memory.
    """
    from torchvision import transforms as T

    folder = _find(resolve_root(root))
    wnids = _read_wnids(folder)
    index = {wnid: i for i, wnid in enumerate(wnids)}
    train, test = _train_samples(folder, wnids, index), _val_samples(folder, index)
    if device_resident:
        if not native:
            raise UserError("tiny_imagenet: device_resident: true needs native: true (64 px); at 224 px the "
                            "set would take 60 GB as float32, so it is read by DataLoader workers instead")
        arrays = ImageArrays(*_decode_all(train), *_decode_all(test))
        return image_splits(arrays, num_classes=len(wnids), mean=IMAGENET_MEAN, std=IMAGENET_STD,
                            augment=AugmentSpec(padding=4, flip=True) if augment else None,
                            device_resident=True, description=f"Tiny-ImageNet-{len(wnids)} at 64 px, in memory")
    normalize = [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    if native:
        size = 64
        evaluate = T.Compose(normalize)
        training = T.Compose([T.RandomCrop(64, padding=4), T.RandomHorizontalFlip(), *normalize])
    else:
        size = 224
        evaluate = T.Compose([T.Resize(256), T.CenterCrop(224), *normalize])
        training = T.Compose([T.RandomResizedCrop(224), T.RandomHorizontalFlip(), *normalize])
    return DataSplits(
        train=TinyImageNetFolder(train, training if augment else evaluate),
        test=TinyImageNetFolder(test, evaluate),
        num_classes=len(wnids),
        input_shape=(3, size, size),
        description=f"Tiny-ImageNet-{len(wnids)} at {size} px",
    )


def _decode_all(samples: list[tuple[str, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Every image of a split as uint8 (N, 3, 64, 64), decoded by a few threads (PIL releases the GIL)."""
    from PIL import Image

    def decode(path: str) -> np.ndarray:
        with Image.open(path) as image:
            array = np.asarray(image.convert("RGB"))
        if array.shape != (64, 64, 3):
            raise UserError(f"{path}: expected a 64x64 image, got {array.shape[1]}x{array.shape[0]}")
        return array

    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        images = np.stack(list(pool.map(decode, [path for path, _ in samples])))
    labels = torch.tensor([label for _, label in samples], dtype=torch.int64)
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), labels


def _find(root: str) -> str:
    candidates = [os.path.join(root, "tiny-imagenet-200"), root]
    for folder in candidates:
        if os.path.isfile(os.path.join(folder, "wnids.txt")) and os.path.isdir(os.path.join(folder, "train")):
            return folder
    raise UserError(
        f"Tiny-ImageNet not found: looked for wnids.txt and train/ in {candidates[0]} and in {candidates[1]}. "
        f"Download {URL} and unzip it into {root} (it creates tiny-imagenet-200/), or point data.root "
        f"(or $DBX_DATA_ROOT) at the folder that holds tiny-imagenet-200/."
    )


def _read_wnids(folder: str) -> list[str]:
    with open(os.path.join(folder, "wnids.txt")) as f:
        wnids = sorted({line.strip() for line in f if line.strip()})
    if not wnids:
        raise UserError(f"{os.path.join(folder, 'wnids.txt')} lists no classes")
    return wnids


def _train_samples(folder: str, wnids: list[str], index: dict[str, int]) -> list[tuple[str, int]]:
    samples = []
    for wnid in wnids:
        images = os.path.join(folder, "train", wnid, "images")
        if not os.path.isdir(images):
            raise UserError(f"Tiny-ImageNet class {wnid} (listed in wnids.txt) has no folder {images}; "
                            f"the extraction is incomplete: unzip {URL} again")
        names = sorted(n for n in os.listdir(images) if n.lower().endswith((".jpeg", ".jpg", ".png")))
        samples += [(os.path.join(images, n), index[wnid]) for n in names]
    return samples


def _val_samples(folder: str, index: dict[str, int]) -> list[tuple[str, int]]:
    annotations = os.path.join(folder, "val", "val_annotations.txt")
    if not os.path.isfile(annotations):
        raise UserError(f"Tiny-ImageNet validation labels not found: {annotations} is missing; unzip {URL} again")
    samples = []
    with open(annotations) as f:
        for number, line in enumerate(f, 1):
            fields = line.strip().split("\t")
            if not fields or not fields[0]:
                continue
            if len(fields) < 2 or fields[1] not in index:
                raise UserError(f"{annotations}:{number}: expected '<image>\\t<wnid listed in wnids.txt>', "
                                f"got {line.strip()!r}")
            if os.path.basename(fields[0]) != fields[0] or fields[0] in (".", ".."):
                raise UserError(f"{annotations}:{number}: image {fields[0]!r} is not a file name in val/images "
                                f"(a path leading elsewhere); the file is not the official one: unzip {URL} again")
            samples.append((os.path.join(folder, "val", "images", fields[0]), index[fields[1]]))
    return sorted(samples)
