"""Batched image augmentation on the training device: random crop with padding, horizontal flip,
random rotation, each sample drawing its own parameters, all in a few tensor ops per batch.

This is the fast path of device-resident image datasets (CIFAR, MNIST): instead of a DataLoader
worker transforming one PIL image at a time (the DiveBatch authors' bottleneck at large batches),
a whole batch is augmented where it lives. The distributions are torchvision's:

- ``RandomCrop(size, padding=p)``: offsets (i, j) uniform on {0, ..., 2p}² in the zero-padded image;
- ``RandomHorizontalFlip()``: each sample flipped with probability 1/2;
- ``RandomRotation(degrees)``: angle uniform on [-degrees, degrees], counter-clockwise, about the
  centre, nearest-neighbour sampling, zero fill, same size.

Inputs are already normalised (``(pixel - mean) / std``), so "zero" of a PIL image is the value
``fill = -mean / std`` per channel; padding and rotation fill with it, exactly as torchvision's
transforms followed by ``Normalize`` would. ``tests/test_data_augment.py`` checks the match
statistically against torchvision.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

__all__ = ["ImageAugment", "crop_and_flip", "rotate", "rotate_by", "normalized_fill"]


class ImageAugment:
    """``augment(images, generator)`` for ``DataSplits.augment``: crop+flip, then rotation.

    ``images`` is a float batch ``(N, C, H, W)`` on any device; ``generator`` lives on that device.
    The output has the input's shape. An instance is a plain picklable object (no closures).
    """

    def __init__(self, *, padding: int = 0, flip: bool = False, rotation: float = 0.0,
                 fill: Sequence[float] = (0.0,)) -> None:
        self.padding = int(padding)
        self.flip = bool(flip)
        self.rotation = float(rotation)
        self.fill = tuple(float(f) for f in fill)
        self._fills: dict[tuple[torch.device, torch.dtype, int], torch.Tensor] = {}

    def __call__(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        fill = self._fill(images)
        if self.padding or self.flip:
            images = crop_and_flip(images, generator, padding=self.padding, flip=self.flip, fill=fill)
        if self.rotation:
            images = rotate(images, generator, degrees=self.rotation, fill=fill)
        return images

    def _fill(self, images: torch.Tensor) -> torch.Tensor:
        # Made once per device and dtype: a host-to-device copy per batch would stall the step.
        key = (images.device, images.dtype, images.shape[1])
        if key not in self._fills:
            fill = torch.tensor(self.fill, dtype=images.dtype).expand(images.shape[1]).reshape(1, -1, 1, 1)
            self._fills[key] = fill.to(images.device)
        return self._fills[key]

    def __repr__(self) -> str:
        return f"ImageAugment(padding={self.padding}, flip={self.flip}, rotation={self.rotation})"


def crop_and_flip(images: torch.Tensor, generator: torch.Generator | None, *, padding: int, flip: bool,
                  fill: torch.Tensor) -> torch.Tensor:
    """Random crop of the image's own size from the image padded by ``padding`` (with ``fill``),
    then a random horizontal flip: one gather for the whole batch, no padded copy."""
    n, c, h, w = images.shape
    device = images.device
    p = padding
    # Top-left corner of each crop in the padded image, shifted to the unpadded image's coordinates.
    top = torch.randint(0, 2 * p + 1, (n,), generator=generator, device=device) - p
    left = torch.randint(0, 2 * p + 1, (n,), generator=generator, device=device) - p
    cols = torch.arange(w, device=device)
    if flip:
        flipped = torch.rand(n, generator=generator, device=device) < 0.5
        cols = torch.where(flipped[:, None], (w - 1) - cols, cols)  # read the crop right to left
    rows = top[:, None] + torch.arange(h, device=device)  # (n, h): source row of each output row
    cols = left[:, None] + cols  # (n, w): source column of each output column
    index = rows.clamp(0, h - 1)[:, :, None] * w + cols.clamp(0, w - 1)[:, None, :]
    out = images.reshape(n, c, h * w).gather(2, index.reshape(n, 1, h * w).expand(n, c, h * w))
    if not p:
        return out.reshape(n, c, h, w)
    inside = ((rows >= 0) & (rows < h))[:, :, None] & ((cols >= 0) & (cols < w))[:, None, :]
    return torch.where(inside[:, None], out.reshape(n, c, h, w), fill)


def rotate(images: torch.Tensor, generator: torch.Generator | None, *, degrees: float,
           fill: torch.Tensor) -> torch.Tensor:
    """Rotate each image by its own angle, uniform on [-degrees, degrees], counter-clockwise about
    the centre, nearest-neighbour, filling the corners with ``fill``."""
    n = images.shape[0]
    angles = (torch.rand(n, generator=generator, device=images.device) * 2 - 1) * degrees
    return rotate_by(images, angles, fill=fill)


def rotate_by(images: torch.Tensor, angles: torch.Tensor, *, fill: torch.Tensor) -> torch.Tensor:
    """Rotate image k by ``angles[k]`` degrees counter-clockwise about its centre, as
    ``torchvision.transforms.functional.rotate(image, angle, NEAREST, fill=0)`` does."""
    n, c, h, w = images.shape
    theta = torch.deg2rad(angles.to(torch.float32))
    cos, sin = torch.cos(theta), torch.sin(theta)
    zero = torch.zeros_like(cos)
    # affine_grid maps output to input positions in [-1, 1] coordinates (x right, y down). A
    # counter-clockwise rotation of the picture by theta samples the input at R(theta) of the
    # output position, as a matrix in pixel units; the aspect ratio converts to normalised units.
    matrix = torch.stack([
        torch.stack([cos, -sin * h / w, zero], 1),
        torch.stack([sin * w / h, cos, zero], 1),
    ], 1)
    grid = F.affine_grid(matrix.to(images.dtype), [n, c, h, w], align_corners=False)
    rotated = F.grid_sample(images - fill, grid, mode="nearest", padding_mode="zeros", align_corners=False)
    return rotated + fill


def normalized_fill(mean: Sequence[float], std: Sequence[float]) -> tuple[float, ...]:
    """The normalised value of a black pixel, per channel: what torchvision pads and fills with."""
    return tuple(-m / s for m, s in zip(mean, std))

