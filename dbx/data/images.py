"""Shared plumbing of the image datasets held in memory as uint8 arrays (MNIST, CIFAR, digits).

A dataset factory reads its files into ``ImageArrays`` (uint8 images ``(N, C, H, W)`` and int64
labels) and ``image_splits`` turns them into ``DataSplits`` one of two ways:

- ``device_resident=True`` (the default, the fast path): normalised float32 tensor pairs, which
  dbx's loader moves to the training device once and batches by index, with the training
  augmentation done there in batches by ``ImageAugment`` (``DataSplits.augment``). CIFAR-10 costs
  ~0.6 GB of device memory this way (float32; 150 MB as uint8).
- ``device_resident=False``: ``ArrayImageDataset``s that give one PIL image at a time to the
  equivalent torchvision transforms, for a DataLoader with workers: the classic pipeline, kept
  for comparison (``benchmarks/loader.py``) and as the reference of the augmentation tests.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from dbx.data.augment import ImageAugment, normalized_fill
from dbx.protocols import DataSplits

__all__ = ["ImageArrays", "AugmentSpec", "ArrayImageDataset", "image_splits", "torchvision_transform", "normalize"]


@dataclass
class ImageArrays:
    """Images as uint8 ``(N, C, H, W)`` and labels as int64 ``(N,)``, for both splits."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor


@dataclass(frozen=True)
class AugmentSpec:
    """A training augmentation in torchvision's terms: ``RandomCrop(size, padding)``,
    ``RandomHorizontalFlip()``, ``RandomRotation(rotation)``, in that order (each optional)."""

    padding: int = 0
    flip: bool = False
    rotation: float = 0.0

    def on_device(self, mean: Sequence[float], std: Sequence[float]) -> ImageAugment:
        return ImageAugment(padding=self.padding, flip=self.flip, rotation=self.rotation,
                            fill=normalized_fill(mean, std))


def normalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 ``(N, C, H, W)`` -> float32 ``(x / 255 - mean) / std``, as ToTensor + Normalize do."""
    out = images.to(torch.float32).div_(255.0)
    m = torch.tensor(mean, dtype=torch.float32).reshape(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).reshape(1, -1, 1, 1)
    return out.sub_(m).div_(s)


def torchvision_transform(augment: AugmentSpec | None, mean: Sequence[float], std: Sequence[float],
                          size: tuple[int, int]) -> Callable:
    """The per-image torchvision pipeline (PIL in, normalised tensor out) equivalent to ``augment``
    for images of ``size`` (height, width)."""
    from torchvision import transforms as T

    steps: list[Any] = []
    if augment is not None:
        if augment.padding:
            steps.append(T.RandomCrop(size, padding=augment.padding))
        if augment.flip:
            steps.append(T.RandomHorizontalFlip())
        if augment.rotation:
            steps.append(T.RandomRotation(augment.rotation))
    steps += [T.ToTensor(), T.Normalize(mean, std)]
    return T.Compose(steps)


class ArrayImageDataset(torch.utils.data.Dataset):
    """One ``(transform(PIL image), label)`` per index, from uint8 ``(N, C, H, W)`` images."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform: Callable | None = None) -> None:
        self.images = images.permute(0, 2, 3, 1).contiguous().numpy()  # NHWC, as PIL wants
        self.labels = labels.tolist()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        from PIL import Image

        array = self.images[index]
        image = Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array)
        return (self.transform(image) if self.transform is not None else image), self.labels[index]


def image_splits(
    arrays: ImageArrays,
    *,
    num_classes: int,
    mean: Sequence[float],
    std: Sequence[float],
    augment: AugmentSpec | None,
    device_resident: bool,
    description: str,
) -> DataSplits:
    """``DataSplits`` from uint8 arrays: device-resident tensors, or per-image Datasets."""
    input_shape = tuple(arrays.train_images.shape[1:])
    size = tuple(input_shape[1:])
    if device_resident:
        return DataSplits(
            train=(normalize(arrays.train_images, mean, std), arrays.train_labels),
            test=(normalize(arrays.test_images, mean, std), arrays.test_labels),
            num_classes=num_classes,
            input_shape=input_shape,
            augment=None if augment is None else augment.on_device(mean, std),
            description=description,
        )
    return DataSplits(
        train=ArrayImageDataset(arrays.train_images, arrays.train_labels,
                                torchvision_transform(augment, mean, std, size)),
        test=ArrayImageDataset(arrays.test_images, arrays.test_labels, torchvision_transform(None, mean, std, size)),
        num_classes=num_classes,
        input_shape=input_shape,
        description=description + " (per-image DataLoader pipeline)",
    )
