"""Batched augmentation: crop/flip content, resized-crop boxes and replay, colour jitter, grayscale, MoCo view."""

import pytest
import torch
import torch.nn.functional as F
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from trainer import augment


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def uint8_images(n=8, c=3, h=12, w=10, seed=0) -> torch.Tensor:
    return torch.randint(0, 256, (n, c, h, w), generator=gen(seed), dtype=torch.uint8)


def float_images(n=8, c=3, h=12, w=10, seed=0) -> torch.Tensor:
    return torch.rand(n, c, h, w, generator=gen(seed))


def test_to_float_and_normalize():
    images = torch.tensor([0, 51, 255], dtype=torch.uint8).view(1, 3, 1, 1)
    x = augment.to_float(images)
    assert x.dtype == torch.float32
    assert torch.allclose(x.flatten(), torch.tensor([0.0, 0.2, 1.0]))
    y = augment.normalize(x, (0.5, 0.2, 0.0), (0.5, 0.1, 2.0))
    assert torch.allclose(y.flatten(), torch.tensor([-1.0, 0.0, 0.5]), atol=1e-6)
    gray = augment.normalize(torch.full((2, 1, 3, 3), 0.75), (0.25,), (0.5,))
    assert torch.allclose(gray, torch.ones_like(gray))
    # Constants already on the images' device (how DeviceBatches passes them) give the same numbers as lists.
    assert torch.equal(augment.normalize(x, torch.tensor([0.5, 0.2, 0.0]), torch.tensor([0.5, 0.1, 2.0])), y)
    with pytest.raises(ValueError, match="channels"):
        augment.normalize(x, (0.5,), (0.5,))


def test_flip_only_gives_image_or_mirror_about_half_flipped():
    images = uint8_images(n=400, h=6, w=7)
    out = augment.random_crop_flip(images, 0, True, gen(1))
    assert out.shape == images.shape and out.dtype == torch.uint8
    same = (out == images).flatten(1).all(1)
    mirrored = (out == images.flip(-1)).flatten(1).all(1)
    assert bool((same | mirrored).all())
    assert 160 < int(mirrored.sum()) < 240


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_padded_crop_is_a_shifted_window_of_the_zero_padded_image(dtype):
    images = uint8_images(n=6, c=3, h=8, w=9, seed=2).to(dtype) + (1 if dtype == torch.uint8 else 0.5)
    pad = 3
    out = augment.random_crop_flip(images, pad, True, gen(3))
    assert out.shape == images.shape and out.dtype == dtype
    # Slow reference: redraw the same parameters and cut each window by hand.
    g = gen(3)
    offsets = torch.randint(0, 2 * pad + 1, (6, 2), generator=g)
    flips = torch.rand(6, generator=g) < 0.5
    padded = F.pad(images, (pad, pad, pad, pad))
    for i in range(6):
        oy, ox = offsets[i].tolist()
        window = padded[i, :, oy : oy + 8, ox : ox + 9]
        expected = window.flip(-1) if flips[i] else window
        assert torch.equal(out[i], expected)
    # The nonzero input makes zero-fill visible: some crops must reach into the padding.
    assert bool((out == 0).any())


def test_crop_flip_is_deterministic_per_seed_and_varies_per_image():
    images = uint8_images(n=64)
    a = augment.random_crop_flip(images, 4, True, gen(7))
    b = augment.random_crop_flip(images, 4, True, gen(7))
    c = augment.random_crop_flip(images, 4, True, gen(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(augment.random_crop_flip(images, 0, False, gen(7)), images)


def test_resized_crop_boxes_respect_scale_ratio_and_image():
    n, h, w = 2000, 32, 32
    boxes = augment.sample_resized_crop_boxes(n, h, w, (0.2, 1.0), (3 / 4, 4 / 3), gen(0))
    assert boxes.shape == (n, 4) and boxes.dtype == torch.float32
    assert torch.equal(boxes, boxes.round())
    x0, y0, x1, y1 = boxes.unbind(1)
    assert bool(((x0 >= 0) & (y0 >= 0) & (x1 <= w) & (y1 <= h) & (x1 > x0) & (y1 > y0)).all())
    bw, bh = x1 - x0, y1 - y0
    # Rounding w and h to whole pixels moves area and aspect slightly beyond the sampled range.
    area = bw * bh / (h * w)
    assert area.min() >= 0.2 * 0.9 and area.max() <= 1.0
    assert area.min() < 0.25 and area.max() > 0.9
    aspect = bw / bh
    assert aspect.min() >= 0.75 * 0.9 and aspect.max() <= 4 / 3 / 0.9
    # Positions are spread over the image, not always the corner.
    assert x0.max() > 10 and y0.max() > 10
    assert torch.equal(boxes, augment.sample_resized_crop_boxes(n, h, w, generator=gen(0)))


def test_resized_crop_boxes_fall_back_to_centre_crop():
    # No try can fit (scale > 1), so every box is torchvision's fallback: for a 20x40 image with ratio <= 4/3 the
    # crop is h=20, w=round(20*4/3)=27, centred at x0=(40-27)//2=6.
    boxes = augment.sample_resized_crop_boxes(5, 20, 40, (2.0, 3.0), (3 / 4, 4 / 3), gen(0))
    assert torch.equal(boxes, torch.tensor([[6.0, 0.0, 33.0, 20.0]]).expand(5, 4))
    square = augment.sample_resized_crop_boxes(3, 16, 16, (2.0, 3.0), generator=gen(0))
    assert torch.equal(square, torch.tensor([[0.0, 0.0, 16.0, 16.0]]).expand(3, 4))


def test_full_box_without_flip_reproduces_the_image():
    images = float_images(n=4, c=3, h=16, w=16)
    boxes = torch.tensor([[0.0, 0.0, 16.0, 16.0]]).expand(4, 4)
    out = augment.apply_resized_crop(images, boxes, torch.zeros(4, dtype=torch.bool), 16)
    assert torch.allclose(out, images, atol=1e-6)


def test_same_size_box_with_flip_is_the_mirrored_crop():
    images = float_images(n=3, c=1, h=12, w=12)
    boxes = torch.tensor([[2.0, 1.0, 10.0, 9.0], [0.0, 4.0, 8.0, 12.0], [4.0, 4.0, 12.0, 12.0]])
    flips = torch.tensor([True, False, True])
    out = augment.apply_resized_crop(images, boxes, flips, 8)
    for i, (x0, y0, x1, y1) in enumerate(boxes.long().tolist()):
        crop = images[i, :, y0:y1, x0:x1]
        expected = crop.flip(-1) if flips[i] else crop
        assert torch.allclose(out[i], expected, atol=1e-6)


def test_upsampling_box_matches_torchvision_resized_crop_inside_the_border():
    images = float_images(n=2, c=3, h=20, w=20)
    boxes = torch.tensor([[3.0, 5.0, 13.0, 15.0], [0.0, 0.0, 8.0, 12.0]])
    out = augment.apply_resized_crop(images, boxes, torch.zeros(2, dtype=torch.bool), 32)
    for i, (x0, y0, x1, y1) in enumerate(boxes.long().tolist()):
        ref = TF.resized_crop(images[i], y0, x0, y1 - y0, x1 - x0, [32, 32], InterpolationMode.BILINEAR,
                              antialias=False)
        # The outer ring differs by design (roi_align reads real pixels just outside the box), the rest matches.
        assert torch.allclose(out[i, :, 3:-3, 3:-3], ref[:, 3:-3, 3:-3], atol=1e-5)


def test_zero_strength_jitter_is_identity():
    for c in (1, 3):
        images = float_images(c=c)
        assert torch.equal(augment.color_jitter(images, 0, 0, 0, 0, p=1.0, generator=gen(0)), images)
    images = float_images()
    assert torch.equal(augment.color_jitter(images, 0.8, 0.8, 0.8, 0.5, p=0.0, generator=gen(0)), images)


def test_jitter_factors_ranges_and_probability():
    factors = augment.sample_jitter_factors(4000, 0.4, 0.3, 1.5, 0.1, p=0.8, generator=gen(0))
    applied = (factors != torch.tensor([1.0, 1.0, 1.0, 0.0])).any(1)
    assert 0.77 < applied.float().mean() < 0.83
    b, c, s, h = factors[applied].unbind(1)
    assert b.min() >= 0.6 and b.max() <= 1.4 and c.min() >= 0.7 and c.max() <= 1.3
    assert s.min() >= 0.0 and s.max() <= 2.5 and h.abs().max() <= 0.1
    assert b.std() > 0.1 and h.std() > 0.03
    with pytest.raises(ValueError, match="hue"):
        augment.sample_jitter_factors(2, 0, 0, 0, 0.6)


def test_jitter_matches_torchvision_adjust_functions_per_image():
    images = float_images(n=6, c=3, h=9, w=9, seed=4)
    factors = augment.sample_jitter_factors(6, 0.6, 0.6, 0.6, 0.5, generator=gen(5))
    out = augment.apply_color_jitter(images, factors)
    for i in range(6):
        b, c, s, h = factors[i].tolist()
        ref = TF.adjust_brightness(images[i], b)
        ref = TF.adjust_contrast(ref, c)
        ref = TF.adjust_saturation(ref, s)
        ref = TF.adjust_hue(ref, h)
        assert torch.allclose(out[i], ref, atol=1e-5), i


def test_hue_shift_handles_grey_black_and_primaries():
    pixels = torch.tensor([[0.0, 0.0, 0.0], [0.5, 0.5, 0.5], [1.0, 0.0, 0.0], [0.2, 0.9, 0.4], [0.3, 0.1, 0.8]])
    images = pixels.t().reshape(1, 3, 1, 5).expand(4, 3, 1, 5).contiguous()
    shifts = torch.tensor([0.25, -0.5, 0.1, 1 / 3])
    factors = torch.stack([torch.ones(4), torch.ones(4), torch.ones(4), shifts], 1)
    out = augment.apply_color_jitter(images, factors)
    for i in range(4):
        assert torch.allclose(out[i], TF.adjust_hue(images[i], float(shifts[i])), atol=1e-6)
    # A third of a turn maps pure red to pure green; grey and black never change.
    assert torch.allclose(out[3, :, 0, 2], torch.tensor([0.0, 1.0, 0.0]), atol=1e-6)
    assert torch.allclose(out[:, :, 0, :2], images[:, :, 0, :2])


def test_jitter_on_single_channel_uses_brightness_and_contrast_only():
    images = float_images(n=5, c=1, seed=6)
    factors = augment.sample_jitter_factors(5, 0.5, 0.5, 0.9, 0.4, generator=gen(1))
    out = augment.apply_color_jitter(images, factors)
    for i in range(5):
        b, c = factors[i, :2].tolist()
        ref = TF.adjust_contrast(TF.adjust_brightness(images[i], b), c)
        assert torch.allclose(out[i], ref, atol=1e-6)


def test_random_grayscale_equal_channels_on_chosen_images():
    images = float_images(n=400, h=4, w=4)
    out = augment.random_grayscale(images, 0.5, gen(2))
    equal = (out[:, 0] == out[:, 1]).flatten(1).all(1) & (out[:, 1] == out[:, 2]).flatten(1).all(1)
    kept = (out == images).flatten(1).all(1)
    assert bool((equal | kept).all()) and 150 < int(equal.sum()) < 250
    luma = 0.2989 * images[:, 0] + 0.587 * images[:, 1] + 0.114 * images[:, 2]
    assert torch.allclose(out[equal, 0], luma[equal], atol=1e-6)
    assert torch.allclose(augment.random_grayscale(images, 1.0, gen(2)), luma[:, None].expand(-1, 3, -1, -1), atol=1e-6)
    single = float_images(c=1)
    assert augment.random_grayscale(single, 1.0, gen(0)) is single


@pytest.mark.parametrize("channels", [1, 3])
def test_moco_view_shape_range_determinism(channels):
    images = uint8_images(n=32, c=channels, h=32, w=32)
    a = augment.moco_view(images, 32, gen(9))
    assert a.shape == (32, channels, 32, 32) and a.dtype == torch.float32
    assert a.min() >= 0 and a.max() <= 1
    assert torch.equal(a, augment.moco_view(images, 32, gen(9)))
    assert not torch.equal(a, augment.moco_view(images, 32, gen(10)))
    # Views differ per image: the same picture repeated gets different crops.
    repeated = augment.moco_view(images[:1].expand(8, -1, -1, -1), 16, gen(3))
    assert repeated.shape == (8, channels, 16, 16)
    assert len({tuple(v.flatten()[:20].tolist()) for v in repeated}) == 8


def test_moco_view_equals_its_parts_replayed():
    images = uint8_images(n=16, c=3, h=32, w=32, seed=5)
    g = gen(11)
    boxes = augment.sample_resized_crop_boxes(16, 32, 32, (0.2, 1.0), (3 / 4, 4 / 3), g)
    flips = torch.rand(16, generator=g) < 0.5
    x = augment.apply_resized_crop(augment.to_float(images), boxes, flips, 32)
    x = augment.apply_color_jitter(x, augment.sample_jitter_factors(16, 0.4, 0.4, 0.4, 0.1, 0.8, g))
    x = augment.random_grayscale(x, 0.2, g)
    assert torch.equal(augment.moco_view(images, 32, gen(11)), x)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    images = uint8_images(n=16, c=3, h=32, w=32)
    cpu = augment.moco_view(images, 32, gen(4))
    gpu = augment.moco_view(images.cuda(), 32, gen(4))
    assert gpu.device.type == "cuda" and torch.allclose(gpu.cpu(), cpu, atol=1e-4)
    crop = augment.random_crop_flip(images.cuda(), 4, True, gen(4))
    assert torch.equal(crop.cpu(), augment.random_crop_flip(images, 4, True, gen(4)))


def test_crop_flip_params_replay_exactly_and_round_trip_through_view_records():
    from trainer.augment import (apply_crop_flip, boxes_to_crop_flip, crop_flip_to_boxes, random_crop_flip,
                                 sample_crop_flip)

    images = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)
    params = sample_crop_flip(16, 4, True, torch.Generator().manual_seed(3))
    direct = random_crop_flip(images, 4, True, torch.Generator().manual_seed(3))
    assert torch.equal(apply_crop_flip(images, params, 4), direct)
    records = crop_flip_to_boxes(params, 4, 32, 32)
    assert torch.all(records[:, 2] - records[:, 0] == 32) and torch.all(records[:, :2] >= -4)
    assert torch.equal(boxes_to_crop_flip(records, 4), params)


@pytest.mark.parametrize("channels", [1, 3])
def test_a_draw_holds_every_random_choice_so_realizing_it_draws_nothing(channels):
    """DeviceBatches' step inputs: `draws` takes every random number on the host, and `realize` replays them with
    device ops only (what lets a CUDA graph of the step hold the augmentation). Realizing twice gives the same batch,
    moves no generator, and equals the batch `epoch` gives for the same seed."""
    from trainer.batches import DeviceBatches
    from trainer.config import AugmentConfig
    from trainer.datasets import ImageSet

    images = uint8_images(n=48, c=channels, h=32, w=32, seed=2)
    split = ImageSet(images=images, labels=torch.arange(48) % 4)
    batches = DeviceBatches(split, (0.5,) * channels, (0.25,) * channels, torch.device("cpu"), 16, AugmentConfig(),
                            sampler="class", key_view=True)
    g = gen(6)
    draw = next(batches.draws(0.0, g))
    assert draw.crop.shape == (16, 3) and draw.key.shape == (16, 10) and draw.ids.shape == (16,)
    host, default = g.get_state(), torch.random.get_rng_state()
    first, second = batches.realize(draw), batches.realize(draw)
    assert torch.equal(g.get_state(), host) and torch.equal(torch.random.get_rng_state(), default)
    assert torch.equal(first.images, second.images) and torch.equal(first.key_images, second.key_images)
    assert first.images.shape == first.key_images.shape == (16, channels, 32, 32)
    assert not torch.equal(first.images, first.key_images)  # two different views of each image
    same_seed = next(batches.epoch(0.0, gen(6)))
    assert torch.equal(same_seed.ids, first.ids) and torch.equal(same_seed.images, first.images)
    assert torch.equal(same_seed.key_images, first.key_images)
    assert torch.equal(first.key_images, augment.normalize(augment.apply_moco_view(images[draw.ids], draw.key, 32),
                                                          (0.5,) * channels, (0.25,) * channels))
