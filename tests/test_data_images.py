"""The image datasets read tiny files that these tests write in the real on-disk formats:
CIFAR python pickle batches, MNIST IDX files, the Tiny-ImageNet folder tree. The real loading code
runs on them: shapes, labels, class counts, the augmentation's determinism, subsets, and the
errors for a missing root."""
import os
import pickle
import struct

import numpy as np
import pytest
import torch

from dbx import registry
from dbx.data import take_subset
from dbx.data.cifar import CIFAR10_MEAN, CIFAR10_STD, cifar10, cifar100
from dbx.data.digits import digits
from dbx.data.loader import make_loader
from dbx.data.mnist import mnist
from dbx.data.tiny_imagenet import tiny_imagenet
from dbx.errors import UserError


def random_images(n, channels, size, seed):
    return np.random.default_rng(seed).integers(0, 256, (n, channels, size, size), dtype=np.uint8)


def write_cifar10(root, per_batch=4):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    labels = {}
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        images = random_images(per_batch, 3, 32, seed=i)
        labels[name] = [(i + j) % 10 for j in range(per_batch)]
        entry = {"batch_label": name, "labels": labels[name], "data": images.reshape(per_batch, -1),
                 "filenames": [f"{name}_{j}.png" for j in range(per_batch)]}
        with open(folder / name, "wb") as f:
            pickle.dump(entry, f)  # the official files are protocol-2 pickles of such dicts
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"class{c}" for c in range(10)], "num_cases_per_batch": per_batch}, f)
    return labels


def write_cifar100(root, n_train=6, n_test=3):
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    for name, n, seed in (("train", n_train, 10), ("test", n_test, 11)):
        entry = {"data": random_images(n, 3, 32, seed).reshape(n, -1), "fine_labels": [97 + j % 3 for j in range(n)],
                 "coarse_labels": [j % 20 for j in range(n)], "filenames": [f"{j}.png" for j in range(n)]}
        with open(folder / name, "wb") as f:
            pickle.dump(entry, f)


def write_idx(path, array):
    """IDX: magic (0, 0, dtype 0x08 = ubyte, ndim), then big-endian int32 dims, then the bytes."""
    with open(path, "wb") as f:
        f.write(struct.pack(">BBBB", 0, 0, 0x08, array.ndim))
        f.write(struct.pack(f">{array.ndim}I", *array.shape))
        f.write(array.astype(np.uint8).tobytes())


def write_mnist(root, n_train=12, n_test=5):
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    train = random_images(n_train, 1, 28, 0)[:, 0]
    write_idx(raw / "train-images-idx3-ubyte", train)
    write_idx(raw / "train-labels-idx1-ubyte", np.arange(n_train) % 10)
    write_idx(raw / "t10k-images-idx3-ubyte", random_images(n_test, 1, 28, 1)[:, 0])
    write_idx(raw / "t10k-labels-idx1-ubyte", (np.arange(n_test) + 3) % 10)
    return train


WNIDS = ["n02124075", "n01443537", "n09246464"]  # not sorted on purpose


def write_tiny_imagenet(root, per_class=2):
    from PIL import Image

    folder = root / "tiny-imagenet-200"
    (folder / "val" / "images").mkdir(parents=True)
    (folder / "wnids.txt").write_text("\n".join(WNIDS) + "\n")
    rng = np.random.default_rng(0)
    for wnid in WNIDS:
        images = folder / "train" / wnid / "images"
        images.mkdir(parents=True)
        for k in range(per_class):
            Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(images / f"{wnid}_{k}.JPEG")
        (folder / "train" / wnid / f"{wnid}_boxes.txt").write_text("")
    lines = []
    for k, wnid in enumerate(WNIDS * 2):
        mode = "L" if k == 0 else "RGB"  # the real set has a few greyscale images
        shape = (64, 64) if mode == "L" else (64, 64, 3)
        pixels = rng.integers(0, 256, shape, dtype=np.uint8)
        Image.fromarray(pixels, mode).save(folder / "val" / "images" / f"val_{k}.JPEG")
        lines.append(f"val_{k}.JPEG\t{wnid}\t0\t0\t63\t63")
    (folder / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")


# ---------------------------------------------------------------------------------- CIFAR


def test_cifar10_reads_the_pickle_batches(tmp_path):
    labels = write_cifar10(tmp_path)
    splits = cifar10(root=str(tmp_path))
    (x, y), (xt, yt) = splits.train, splits.test
    assert x.shape == (20, 3, 32, 32) and x.dtype == torch.float32
    assert xt.shape == (4, 3, 32, 32)
    assert y.tolist() == sum((labels[f"data_batch_{k}"] for k in range(1, 6)), [])
    assert yt.tolist() == labels["test_batch"] and y.dtype == torch.int64
    assert splits.num_classes == 10 and splits.input_shape == (3, 32, 32)
    # pixel (c, 0, 0) of the first image, normalised as ToTensor + Normalize would
    raw = random_images(4, 3, 32, seed=0)
    for c in range(3):
        expected = (raw[0, c, 0, 0] / 255 - CIFAR10_MEAN[c]) / CIFAR10_STD[c]
        assert x[0, c, 0, 0].item() == pytest.approx(expected, abs=1e-5)
    assert splits.augment is not None
    assert cifar10(root=str(tmp_path), augment=False).augment is None


def test_cifar_root_may_be_the_archive_folder_itself(tmp_path):
    write_cifar10(tmp_path)
    splits = cifar10(root=str(tmp_path / "cifar-10-batches-py"))
    assert splits.train[0].shape[0] == 20


def test_cifar100_fine_labels_and_rotation(tmp_path):
    write_cifar100(tmp_path)
    splits = cifar100(root=str(tmp_path))
    assert splits.num_classes == 100
    assert splits.train[1].tolist() == [97, 98, 99, 97, 98, 99]
    assert splits.test[0].shape == (3, 3, 32, 32)
    assert splits.augment.rotation == 15.0 and splits.augment.padding == 4 and splits.augment.flip


def test_cifar_per_image_pipeline_gives_the_same_tensors(tmp_path):
    write_cifar10(tmp_path)
    resident = cifar10(root=str(tmp_path), augment=False)
    per_image = cifar10(root=str(tmp_path), augment=False, device_resident=False)
    assert isinstance(per_image.train, torch.utils.data.Dataset) and len(per_image.train) == 20
    image, label = per_image.train[7]
    assert torch.allclose(image, resident.train[0][7], atol=1e-6) and label == resident.train[1][7].item()
    augmented = cifar10(root=str(tmp_path), device_resident=False).train[0][0]
    assert augmented.shape == (3, 32, 32)


def test_cifar_augmentation_is_deterministic_under_the_seed(tmp_path):
    write_cifar10(tmp_path)
    splits = cifar10(root=str(tmp_path))

    def first_epoch(seed):
        loader = make_loader(splits.train, batch_size=8, shuffle=True, device="cpu", seed=seed, augment=splits.augment)
        return torch.cat([x for x, _ in loader])

    a, b, c = first_epoch(0), first_epoch(0), first_epoch(1)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == (20, 3, 32, 32)


def test_missing_cifar_is_a_clear_error(tmp_path):
    with pytest.raises(UserError) as info:
        cifar10(root=str(tmp_path / "nowhere"))
    message = str(info.value)
    assert str(tmp_path / "nowhere" / "cifar-10-batches-py") in message
    assert "cifar-10-python.tar.gz" in message and "download: true" in message
    with pytest.raises(UserError, match="cifar-100-python"):
        cifar100(root=str(tmp_path))


def test_damaged_cifar_file_is_a_clear_error(tmp_path):
    write_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(b"not a pickle")
    with pytest.raises(UserError, match="test_batch"):
        cifar10(root=str(tmp_path))


def test_root_comes_from_the_environment(tmp_path, monkeypatch):
    write_cifar10(tmp_path)
    monkeypatch.setenv("DBX_DATA_ROOT", str(tmp_path))
    assert cifar10().train[0].shape[0] == 20
    splits = registry.build("dataset", "cifar10", {"augment": False}, root=str(tmp_path), seed=0)
    assert splits.augment is None


def test_subset_of_cifar(tmp_path):
    write_cifar10(tmp_path)
    splits = cifar10(root=str(tmp_path))
    small = take_subset(splits, 5, seed=0)
    assert small.train[0].shape == (5, 3, 32, 32) and small.test[0].shape[0] == 4
    assert torch.equal(take_subset(splits, 5, seed=0).train[1], small.train[1])
    per_image = take_subset(cifar10(root=str(tmp_path), device_resident=False), 5, seed=0)
    assert len(per_image.train) == 5
    assert [per_image.train[i][1] for i in range(5)] == small.train[1].tolist()  # the same samples


# ---------------------------------------------------------------------------------- MNIST


def test_mnist_reads_idx_files(tmp_path):
    raw = write_mnist(tmp_path)
    splits = mnist(root=str(tmp_path))
    (x, y), (xt, yt) = splits.train, splits.test
    assert x.shape == (12, 1, 28, 28) and xt.shape == (5, 1, 28, 28)
    assert y.tolist() == [i % 10 for i in range(12)] and yt.tolist() == [3, 4, 5, 6, 7]
    assert splits.num_classes == 10 and splits.input_shape == (1, 28, 28) and splits.augment is None
    assert x[3, 0, 5, 6].item() == pytest.approx((raw[3, 5, 6] / 255 - 0.1307) / 0.3081, abs=1e-5)


def test_mnist_root_may_hold_an_mnist_folder(tmp_path):
    write_mnist(tmp_path / "mnist")
    assert mnist(root=str(tmp_path)).train[0].shape[0] == 12


def test_mnist_augment_is_a_padded_crop(tmp_path):
    write_mnist(tmp_path)
    splits = mnist(root=str(tmp_path), augment=True)
    assert splits.augment.padding == 2 and not splits.augment.flip


def test_missing_mnist_is_a_clear_error(tmp_path):
    with pytest.raises(UserError) as info:
        mnist(root=str(tmp_path))
    assert str(tmp_path / "MNIST" / "raw") in str(info.value) and "train-images-idx3-ubyte" in str(info.value)


def test_real_mnist_when_available():
    root = os.environ.get("DBX_DATA_ROOT")
    if not root or not os.path.isdir(root):
        pytest.skip("set DBX_DATA_ROOT to a folder holding MNIST/raw to check the real files")
    try:
        splits = mnist(root=root)
    except UserError:
        pytest.skip(f"no MNIST under {root}")
    assert splits.train[0].shape == (60000, 1, 28, 28) and splits.test[0].shape == (10000, 1, 28, 28)
    assert splits.train[1].bincount().tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]


# ---------------------------------------------------------------------------------- Tiny-ImageNet


def test_tiny_imagenet_reads_the_folder_tree(tmp_path):
    write_tiny_imagenet(tmp_path)
    splits = tiny_imagenet(root=str(tmp_path))
    assert splits.num_classes == 3 and splits.input_shape == (3, 224, 224)
    assert len(splits.train) == 6 and len(splits.test) == 6
    order = sorted(WNIDS)
    assert sorted(label for _, label in splits.train.samples) == [0, 0, 1, 1, 2, 2]
    for path, label in splits.train.samples:
        assert os.path.basename(path).startswith(order[label])
    x, y = splits.train[0]
    assert x.shape == (3, 224, 224) and x.dtype == torch.float32
    xt, yt = splits.test[0]  # val_0 is greyscale on disk: converted to RGB
    assert xt.shape == (3, 224, 224) and yt == order.index(WNIDS[0])


def test_tiny_imagenet_native_and_loader(tmp_path):
    write_tiny_imagenet(tmp_path)
    splits = tiny_imagenet(root=str(tmp_path / "tiny-imagenet-200"), native=True)
    assert splits.input_shape == (3, 64, 64)
    loader = make_loader(splits.train, batch_size=4, shuffle=True, device="cpu", seed=0)
    shapes = [(tuple(x.shape), tuple(y.shape)) for x, y in loader]
    assert shapes == [((4, 3, 64, 64), (4,)), ((2, 3, 64, 64), (2,))]
    loader.set_batch_size(6)
    assert [len(y) for _, y in loader] == [6]


def test_tiny_imagenet_augmentation_is_deterministic_under_the_seed(tmp_path):
    write_tiny_imagenet(tmp_path)
    splits = tiny_imagenet(root=str(tmp_path), native=True)

    def first_epoch(seed):
        loader = make_loader(splits.train, batch_size=6, shuffle=True, device="cpu", seed=seed, num_workers=1)
        return torch.cat([x for x, _ in loader])

    assert torch.equal(first_epoch(3), first_epoch(3))
    assert not torch.equal(first_epoch(3), first_epoch(4))


def test_tiny_imagenet_subset(tmp_path):
    write_tiny_imagenet(tmp_path)
    small = take_subset(tiny_imagenet(root=str(tmp_path)), 4, seed=0)
    assert len(small.train) == 4 and len(small.test) == 6


def test_missing_tiny_imagenet_is_a_clear_error(tmp_path):
    with pytest.raises(UserError) as info:
        tiny_imagenet(root=str(tmp_path))
    assert str(tmp_path / "tiny-imagenet-200") in str(info.value) and "tiny-imagenet-200.zip" in str(info.value)


def test_bad_val_annotation_names_the_line(tmp_path):
    write_tiny_imagenet(tmp_path)
    with open(tmp_path / "tiny-imagenet-200" / "val" / "val_annotations.txt", "a") as f:
        f.write("val_99.JPEG\tn00000000\t0\t0\t1\t1\n")
    with pytest.raises(UserError, match=r"val_annotations.txt:7"):
        tiny_imagenet(root=str(tmp_path))


# ---------------------------------------------------------------------------------- digits


def test_digits_is_always_available():
    splits = digits(seed=0)
    (x, y), (xt, _) = splits.train, splits.test
    assert x.shape[1:] == (1, 8, 8) and len(x) + len(xt) == 1797 and len(xt) == 359
    assert splits.num_classes == 10 and set(y.tolist()) == set(range(10))
    assert torch.equal(digits(seed=0).train[0], x) and not torch.equal(digits(seed=1).train[0], x)
    assert abs(x.mean().item()) < 1e-4


def test_tiny_imagenet_native_in_memory(tmp_path):
    write_tiny_imagenet(tmp_path)
    in_memory = tiny_imagenet(root=str(tmp_path), native=True, device_resident=True)
    (x, y), (xt, _) = in_memory.train, in_memory.test
    assert x.shape == (6, 3, 64, 64) and x.dtype == torch.float32 and xt.shape == (6, 3, 64, 64)
    assert in_memory.augment.padding == 4 and in_memory.augment.flip
    per_image = tiny_imagenet(root=str(tmp_path), native=True, augment=False)
    image, label = per_image.train[4]
    assert torch.allclose(image, x[4], atol=1e-5) and label == y[4].item()
    with pytest.raises(UserError, match="native"):
        tiny_imagenet(root=str(tmp_path), device_resident=True)
