"""Images per second: dbx's device-resident loader vs a torchvision DataLoader, in one run.

The DiveBatch authors fed CIFAR through a DataLoader whose worker transformed one PIL image at a
time (RandomCrop + RandomHorizontalFlip (+ RandomRotation) + ToTensor + Normalize): at large batch
sizes the GPU waits for it. dbx keeps the dataset on the training device and augments whole
batches there. This script times one epoch of each (after a warm-up epoch), with the same
augmentation, and prints the ratios.

    python benchmarks/loader.py                       # CIFAR-shaped random images, CPU or GPU
    DBX_DATA_ROOT=~/data python benchmarks/loader.py --dataset cifar10
    python benchmarks/loader.py --rotation 15 --batch-size 2048 --device cuda

Only data loading is timed (each batch is produced on the device and dropped); no model runs.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dbx.data import resolve_root  # noqa: E402
from dbx.data.cifar import CIFAR10_MEAN, CIFAR10_STD  # noqa: E402
from dbx.data.images import ArrayImageDataset, AugmentSpec, ImageArrays, normalize, torchvision_transform  # noqa: E402
from dbx.data.loader import make_loader  # noqa: E402


def load_images(dataset: str, n: int) -> tuple[torch.Tensor, torch.Tensor, str]:
    """uint8 (n, 3, 32, 32) images and labels: real CIFAR-10 if asked for, else random pixels."""
    if dataset == "cifar10":
        from dbx.data.cifar import CIFAR10, _load

        arrays: ImageArrays = _load(CIFAR10, resolve_root(None), download=False)
        return arrays.train_images[:n], arrays.train_labels[:n], f"CIFAR-10 from {resolve_root(None)}"
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, 32, 32), generator=generator, dtype=torch.uint8)
    return images, torch.randint(0, 10, (n,), generator=generator), "random CIFAR-shaped images"


def images_per_second(loader, device: torch.device, epochs: int) -> float:
    def epoch() -> int:
        count = 0
        for x, _ in loader:
            count += x.shape[0]
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return count

    epoch()  # warm-up: worker start-up, allocator, kernels
    start = time.perf_counter()
    count = sum(epoch() for _ in range(epochs))
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", choices=["random", "cifar10"], default="random")
    parser.add_argument("--n", type=int, default=10000, help="training images per epoch")
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--rotation", type=float, default=0.0, help="15 for the CIFAR-100 augmentation")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--epochs", type=int, default=1, help="timed epochs per path (after one warm-up)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads of this process (default: torch's choice); on a busy machine "
                             "1 avoids threads waiting for each other")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    images, labels, source = load_images(args.dataset, args.n)
    spec = AugmentSpec(padding=4, flip=True, rotation=args.rotation)
    name = "crop 32 pad 4 + flip" + (f" + rotation {args.rotation:g}" if args.rotation else "")
    threads = torch.get_num_threads()
    device_name = (torch.cuda.get_device_name(device) if device.type == "cuda"
                   else f"CPU ({threads} thread{'s' if threads != 1 else ''})")
    print(f"data: {source}, {len(images)} images; augmentation: {name}; batch size {args.batch_size}; "
          f"device: {device_name}; torch {torch.__version__}")

    results: list[tuple[str, float]] = []
    resident = make_loader((normalize(images, CIFAR10_MEAN, CIFAR10_STD), labels), batch_size=args.batch_size,
                           shuffle=True, device=device, seed=0, augment=spec.on_device(CIFAR10_MEAN, CIFAR10_STD))
    results.append(("device-resident (dbx)", images_per_second(resident, device, args.epochs)))
    dataset = ArrayImageDataset(images, labels, torchvision_transform(spec, CIFAR10_MEAN, CIFAR10_STD, (32, 32)))
    for workers in args.workers:
        loader = make_loader(dataset, batch_size=args.batch_size, shuffle=True, device=device, seed=0,
                             num_workers=workers)
        label = f"DataLoader, {workers} worker{'s' if workers != 1 else ''}"
        results.append((label, images_per_second(loader, device, args.epochs)))

    fastest_loader = max(rate for label, rate in results[1:]) if len(results) > 1 else float("nan")
    print(f"{'path':<26}{'images/s':>12}{'vs device-resident':>22}")
    for label, rate in results:
        print(f"{label:<26}{rate:>12,.0f}{results[0][1] / rate:>21.1f}x")
    print(f"device-resident is {results[0][1] / fastest_loader:.1f}x the fastest DataLoader here")


if __name__ == "__main__":
    main()
