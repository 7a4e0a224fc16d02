"""The device-resident batch augmentation draws from the same distribution as torchvision's
per-image transforms (RandomCrop with padding, RandomHorizontalFlip, RandomRotation), checked
statistically on thousands of draws, and each of its outputs is exactly one of torchvision's."""
import numpy as np
import pytest
import torch
from scipy import stats
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from dbx.data.augment import ImageAugment, normalized_fill, rotate_by
from dbx.data.images import normalize

MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)
DRAWS = 2000


def to_tensor(pil_images):
    """PIL images -> normalised float (N, C, H, W), as ToTensor + Normalize."""
    arrays = np.stack([np.asarray(p).reshape(p.size[1], p.size[0], -1) for p in pil_images])
    return normalize(torch.from_numpy(arrays).permute(0, 3, 1, 2), MEAN, STD)


@pytest.fixture(scope="module")
def image():
    # random pixels in 1..255: every crop/flip gives a different picture, and none is padding (0)
    return torch.from_numpy(np.random.default_rng(0).integers(1, 256, (3, 32, 32), dtype=np.uint8))


def test_crop_and_flip_match_torchvision(image):
    pil = TF.to_pil_image(image)
    # every outcome of RandomCrop(32, padding=4) + RandomHorizontalFlip: 9 x 9 offsets x flip
    outcomes, keys = [], []
    padded = TF.pad(pil, 4)
    for top in range(9):
        for left in range(9):
            crop = TF.crop(padded, top, left, 32, 32)
            for flip in (False, True):
                outcomes.append(TF.hflip(crop) if flip else crop)
                keys.append((top, left, flip))
    outcomes = to_tensor(outcomes).flatten(1)

    def classify(batch):
        distance = torch.cdist(batch.flatten(1), outcomes, compute_mode="donot_use_mm_for_euclid_dist")
        best = distance.min(1)
        assert (best.values < 1e-3).all(), "an output is not any crop/flip of the input"
        return torch.bincount(best.indices, minlength=len(keys))

    torch.manual_seed(0)
    reference = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip()])
    theirs = classify(to_tensor([reference(pil) for _ in range(DRAWS)]))

    augment = ImageAugment(padding=4, flip=True, fill=normalized_fill(MEAN, STD))
    batch = normalize(image.unsqueeze(0), MEAN, STD).expand(DRAWS, -1, -1, -1).contiguous()
    ours = classify(augment(batch, torch.Generator().manual_seed(1)))

    # same distribution as torchvision's (162 cells, ~12 draws each), and uniform on its own
    assert stats.chi2_contingency(np.stack([theirs.numpy(), ours.numpy()]))[1] > 1e-3
    assert stats.chisquare(ours.numpy())[1] > 1e-3
    flips = ours.reshape(81, 2).sum(0)
    assert abs(flips[1].item() / DRAWS - 0.5) < 0.05


def test_no_padding_flip_only(image):
    augment = ImageAugment(flip=True)
    batch = image.float().unsqueeze(0).expand(400, -1, -1, -1)
    out = augment(batch, torch.Generator().manual_seed(1))
    same = (out == batch).flatten(1).all(1)
    mirrored = (out == batch.flip(-1)).flatten(1).all(1)
    assert (same ^ mirrored).all() and 150 < mirrored.sum() < 250


@pytest.mark.parametrize("angle", [15.0, -15.0, 7.5, -3.3, 0.0])
def test_rotation_matches_torchvision_at_a_given_angle(image, angle):
    pil = TF.to_pil_image(image)
    theirs = to_tensor([TF.rotate(pil, angle, interpolation=InterpolationMode.NEAREST)])
    fill = torch.tensor(normalized_fill(MEAN, STD)).reshape(1, 3, 1, 1)
    ours = rotate_by(normalize(image.unsqueeze(0), MEAN, STD), torch.tensor([angle]), fill=fill)
    agree = torch.isclose(ours, theirs, atol=1e-4).float().mean().item()
    assert agree > 0.99  # nearest-neighbour ties may round differently on a handful of pixels


def bar_angle(batch):
    """Orientation (degrees, counter-clockwise) of the bright bar in each image, from moments."""
    weight = (batch[:, 0] > 0).float()
    h, w = batch.shape[-2:]
    ys, xs = torch.meshgrid(torch.arange(h) - (h - 1) / 2, torch.arange(w) - (w - 1) / 2, indexing="ij")
    xs, ys = xs.expand_as(weight), -ys.expand_as(weight)  # y up, so counter-clockwise is positive
    total = weight.sum((1, 2))
    mx, my = (weight * xs).sum((1, 2)) / total, (weight * ys).sum((1, 2)) / total
    dx, dy = xs - mx[:, None, None], ys - my[:, None, None]
    mu20, mu02, mu11 = (weight * dx * dx).sum((1, 2)), (weight * dy * dy).sum((1, 2)), (weight * dx * dy).sum((1, 2))
    return torch.rad2deg(0.5 * torch.atan2(2 * mu11, mu20 - mu02))


def test_rotation_angles_match_torchvision_distribution():
    bar = torch.zeros(1, 32, 32, dtype=torch.uint8)
    bar[0, 15:17, 3:29] = 255
    pil = TF.to_pil_image(bar)
    to_float = lambda pils: torch.from_numpy(np.stack([np.asarray(p) for p in pils])).float().unsqueeze(1)  # noqa: E731

    torch.manual_seed(0)
    reference = T.RandomRotation(15)
    theirs = bar_angle(to_float([reference(pil) for _ in range(DRAWS)]))

    augment = ImageAugment(rotation=15)
    ours = bar_angle(augment(bar.float().unsqueeze(0).expand(DRAWS, -1, -1, -1), torch.Generator().manual_seed(1)))

    assert stats.ks_2samp(theirs.numpy(), ours.numpy(), method="asymp").pvalue > 1e-3
    assert ours.abs().max() < 16.5 and ours.min() < -13 and ours.max() > 13
    assert abs(ours.mean().item()) < 1.0


def test_augment_keeps_shape_dtype_and_device():
    augment = ImageAugment(padding=4, flip=True, rotation=15, fill=(-1.0, -2.0, -3.0))
    batch = torch.randn(5, 3, 32, 32)
    out = augment(batch, torch.Generator().manual_seed(0))
    assert out.shape == batch.shape and out.dtype == batch.dtype
    # padding and rotated-in corners carry the per-channel fill value
    dark = augment(torch.full((64, 3, 32, 32), 9.0), torch.Generator().manual_seed(0))
    for c, fill in enumerate((-1.0, -2.0, -3.0)):
        assert set(dark[:, c].unique().tolist()) <= {9.0, fill}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_augment_on_cuda_matches_the_cpu_distribution(image):
    augment = ImageAugment(padding=4, flip=True, rotation=15, fill=normalized_fill(MEAN, STD))
    batch = normalize(image.unsqueeze(0), MEAN, STD).expand(256, -1, -1, -1).contiguous()
    out = augment(batch.cuda(), torch.Generator(device="cuda").manual_seed(0))
    assert out.is_cuda and out.shape == batch.shape
