"""Eval preset (resize, scaling) and the train preset's batched augmentations."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from chestxray.data.images import read_image
from chestxray.data.transforms import AugmentConfig, BatchAugment, EvalPreset, Preprocessing, resize_gray
from chestxray.errors import ChestXrayError

OFF = dict(rotation=0.0, scale=0.0, translate=0.0, hflip=0.0, brightness=0.0, contrast=0.0)


@pytest.fixture(scope="module")
def batch(sample_images) -> torch.Tensor:
    """Four real radiographs at 64 px as the training loop feeds them: (4, 1, 64, 64) in [0, 1]."""
    arr = np.stack([resize_gray(read_image(p), 64) for p in sample_images[:4]])
    return torch.from_numpy(arr).unsqueeze(1).float().div(255.0)


# -- resize and the eval preset ----------------------------------------------------------------


def test_resize_gray_is_antialiased(sample_images):
    image = read_image(sample_images[0])
    out = resize_gray(image, 32)
    assert out.shape == (32, 32) and out.dtype == np.uint8
    assert resize_gray(image, 256) is image  # already the size: untouched
    # A one-pixel checkerboard shrunk 8x must come out flat gray, not aliased stripes.
    board = (np.indices((256, 256)).sum(0) % 2 * 255).astype(np.uint8)
    small = resize_gray(board, 32).astype(int)
    assert abs(small.mean() - 127.5) < 2 and small.std() < 3
    assert resize_gray(np.zeros((100, 300), np.uint8), 50).shape == (50, 50)  # aspect not kept


@pytest.mark.parametrize(
    ("image", "size", "message"),
    [
        (np.zeros((8, 8, 3), np.uint8), 4, "expected a 2-D uint8 image"),
        (np.zeros((8, 8), np.float32), 4, "expected a 2-D uint8 image"),
        (np.zeros((8, 8), np.uint8), 0, "size must be a positive integer"),
        (np.zeros((0, 8), np.uint8), 4, "empty image"),
    ],
)
def test_resize_gray_rejects_bad_input(image, size, message):
    with pytest.raises(ChestXrayError, match=f"resize_gray: {message}"):
        resize_gray(image, size)


def test_eval_preset(sample_images):
    image = read_image(sample_images[0])
    preset = EvalPreset(Preprocessing(size=48))
    out = preset(image)
    assert out.shape == (1, 48, 48) and out.dtype == np.float32
    np.testing.assert_allclose(out[0], resize_gray(image, 48) / 255.0, atol=1e-7)
    assert out.min() >= 0.0 and out.max() <= 1.0
    assert preset.batch([image, image]).shape == (2, 1, 48, 48)
    assert preset.batch([]).shape == (0, 1, 48, 48)


def test_preprocessing_round_trip_and_validation():
    p = Preprocessing(size=320)
    assert Preprocessing.from_dict(p.to_dict()) == p
    with pytest.raises(ChestXrayError, match="preprocessing: missing or bad field"):
        Preprocessing.from_dict({"size": 224})
    with pytest.raises(ChestXrayError, match="preprocessing: invalid values"):
        Preprocessing.from_dict({**p.to_dict(), "std": [0.2, 0.0, 0.2]})


# -- augmentation config -----------------------------------------------------------------------


def test_presets_and_config_validation():
    seed = AugmentConfig.preset("seed")
    assert seed is not None and (seed.rotation, seed.hflip, seed.brightness, seed.contrast) == (10, 0.5, 0.1, 0.1)
    assert AugmentConfig.preset("none") is None
    assert AugmentConfig(**OFF).is_identity and not AugmentConfig().is_identity
    with pytest.raises(ChestXrayError, match="unknown augmentation preset 'heavy'"):
        AugmentConfig.preset("heavy")
    for field, bad in (("rotation", -1.0), ("hflip", 1.5), ("contrast", 2.0), ("scale", "0.1")):
        with pytest.raises(ChestXrayError, match=f"AugmentConfig.{field}: expected a number"):
            AugmentConfig(**{**OFF, field: bad})


# -- batched augmentation ----------------------------------------------------------------------


def test_deterministic_per_seed_and_own_generator(batch):
    config = AugmentConfig.preset("seed")
    global_state = torch.random.get_rng_state()
    a = BatchAugment(config, seed=7)(batch.clone())
    b = BatchAugment(config, seed=7)(batch.clone())
    c = BatchAugment(config, seed=8)(batch.clone())
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(a, c)
    assert torch.equal(torch.random.get_rng_state(), global_state)  # global RNG untouched
    aug = BatchAugment(config, seed=7)
    first = aug(batch.clone())
    assert not torch.equal(aug(batch.clone()), first)  # the stream moves on
    aug.reseed(7)
    torch.testing.assert_close(aug(batch.clone()), first, rtol=0, atol=0)


def test_output_shape_range_and_dtype(batch):
    strong = AugmentConfig(rotation=20, scale=0.2, translate=0.1, hflip=0.5, brightness=0.3, contrast=0.5)
    out = BatchAugment(strong, seed=0)(batch.clone())
    assert out.shape == batch.shape and out.dtype == torch.float32
    assert out.min() >= 0.0 and out.max() <= 1.0
    assert (out - batch).abs().mean() > 0.01


@pytest.mark.parametrize(
    "bad", [torch.zeros(4, 64, 64), torch.zeros(4, 3, 64, 64), torch.zeros(4, 1, 64, 64, dtype=torch.uint8)]
)
def test_bad_batch_names_the_transform(bad):
    with pytest.raises(ChestXrayError, match=r"BatchAugment: expected a float \(N, 1, H, W\) batch"):
        BatchAugment(AugmentConfig(), seed=0)(bad)


def test_batch_on_another_device_is_refused():
    with pytest.raises(ChestXrayError, match="BatchAugment: batch is on meta but the augmenter on cpu"):
        BatchAugment(AugmentConfig(), seed=0)(torch.zeros(2, 1, 8, 8, device="meta"))


def test_all_parts_off_is_identity(batch):
    out = BatchAugment(AugmentConfig(**OFF), seed=0)(batch.clone())
    torch.testing.assert_close(out, batch, rtol=0, atol=0)


def test_flip_alone_is_an_exact_mirror(batch):
    out = BatchAugment(AugmentConfig(**{**OFF, "hflip": 1.0}), seed=0)(batch.clone())
    torch.testing.assert_close(out, torch.flip(batch, dims=[3]), rtol=0, atol=1e-5)


def test_rotation_alone_moves_pixels_but_keeps_the_centre():
    ones = torch.ones(8, 1, 64, 64)
    out = BatchAugment(AugmentConfig(**{**OFF, "rotation": 30.0}), seed=1)(ones)
    torch.testing.assert_close(out[:, :, 24:40, 24:40], ones[:, :, 24:40, 24:40])
    corners = out[:, 0, [0, 0, -1, -1], [0, -1, 0, -1]]
    assert (corners < 0.99).any(dim=1).sum() >= 6  # rotated corners pull in the black border
    assert torch.isfinite(out).all()


def test_brightness_alone_shifts_each_image_by_one_constant(batch):
    mid = batch * 0.4 + 0.3  # stay clear of clipping
    out = BatchAugment(AugmentConfig(**{**OFF, "brightness": 0.2}), seed=3)(mid.clone())
    shift = out - mid
    per_image = shift.flatten(1)
    torch.testing.assert_close(per_image.max(1).values, per_image.min(1).values, rtol=0, atol=1e-5)
    assert per_image.abs().max() <= 0.2 + 1e-6 and per_image.abs().max() > 1e-3


def test_contrast_alone_scales_around_the_mean(batch):
    mid = batch * 0.4 + 0.3
    out = BatchAugment(AugmentConfig(**{**OFF, "contrast": 0.3}), seed=3)(mid.clone())
    mean_in = mid.mean(dim=(2, 3), keepdim=True)
    torch.testing.assert_close(out.mean(dim=(2, 3), keepdim=True), mean_in, rtol=0, atol=1e-5)
    gain = (out - mean_in).std(dim=(2, 3)) / (mid - mean_in).std(dim=(2, 3))
    assert ((gain >= 0.7 - 1e-4) & (gain <= 1.3 + 1e-4)).all() and (gain - 1).abs().max() > 1e-3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_a_cuda_device(batch):
    x = batch.cuda()
    config = AugmentConfig.preset("seed")
    a, b = (
        BatchAugment(config, seed=7, device="cuda")(x.clone()),
        BatchAugment(config, seed=7, device="cuda")(x.clone()),
    )
    assert a.device.type == "cuda" and torch.equal(a, b) and a.min() >= 0.0 and a.max() <= 1.0
    torch.testing.assert_close(BatchAugment(AugmentConfig(**OFF), device="cuda")(x.clone()), x, rtol=0, atol=0)
    with pytest.raises(ChestXrayError, match="batch is on cpu but the augmenter on cuda"):
        BatchAugment(config, device="cuda")(batch)
