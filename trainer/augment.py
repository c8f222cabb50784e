"""Batched on-device augmentation: one random draw per image, whole batches at once, replayable view parameters."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torchvision.ops import roi_align
from torchvision.transforms.v2 import functional as TF

# Every random parameter is drawn on the CPU from the caller's generator and then moved to the images' device, so a
# seed gives the same views on CPU and GPU. generator=None falls back to torch's default CPU generator.


def to_device(values: torch.Tensor, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Move a small CPU tensor of random parameters to `device` without stalling the GPU queue.

    A plain `.to("cuda")` from pageable memory waits for every queued kernel (a host sync per batch); a pinned copy
    with non_blocking=True is ordered on the stream like a kernel, so the next batch is prepared while this one runs.
    """
    if dtype is not None:
        values = values.to(dtype)
    if device.type != "cuda" or values.device.type != "cpu":
        return values.to(device)
    return values.pin_memory().to(device, non_blocking=True)


def _uniform(n: int, low: float, high: float, generator: torch.Generator | None) -> torch.Tensor:
    return torch.empty(n).uniform_(low, high, generator=generator)


def _bernoulli(n: int, p: float, generator: torch.Generator | None) -> torch.Tensor:
    return torch.rand(n, generator=generator) < p


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, C, H, W) in [0, 255] -> float32 in [0, 1]."""
    return TF.to_dtype(images, torch.float32, scale=True)


def normalize(images: torch.Tensor, mean: Sequence[float] | torch.Tensor, std: Sequence[float] | torch.Tensor
              ) -> torch.Tensor:
    """(x - mean_c) / std_c per channel; len(mean) == len(std) == C (1 or 3). In a loop on a GPU pass mean and std as
    tensors on the images' device: lists become a CUDA tensor per call, a copy that waits for the GPU to drain."""
    if len(mean) != images.shape[-3] or len(std) != images.shape[-3]:
        raise ValueError(f"mean/std have {len(mean)}/{len(std)} entries, the images {images.shape[-3]} channels")
    mean, std = (v if torch.is_tensor(v) else list(v) for v in (mean, std))  # torchvision uses tensors as they are
    return TF.normalize(images, mean=mean, std=std)


def sample_crop_flip(n: int, padding: int, flip: bool, generator: torch.Generator | None = None) -> torch.Tensor:
    """(n, 3) long parameters of RandomCrop(padding) + flip: row offset, column offset (into the padded image), flip."""
    offsets = torch.randint(0, 2 * padding + 1, (n, 2), generator=generator)
    flips = _bernoulli(n, 0.5, generator) if flip else torch.zeros(n, dtype=torch.bool)
    return torch.cat([offsets, flips[:, None].long()], dim=1)


def apply_crop_flip(images: torch.Tensor, params: torch.Tensor, padding: int) -> torch.Tensor:
    """Replay crop+flip parameters from `sample_crop_flip` exactly; (N, C, H, W) -> same shape/dtype."""
    n, c, h, w = images.shape
    device = images.device
    params = to_device(params, device)
    offsets, flips = params[:, :2], params[:, 2].bool()
    padded = F.pad(images, (padding, padding, padding, padding))
    # Pad once, then two gathers with per-image row/column indices: the crop window is a shifted index range and the
    # flip is the same range read backwards, so both cost one gather and no Python loop over images.
    ys = offsets[:, :1] + torch.arange(h, device=device)
    xs_fwd = torch.arange(w, device=device)
    xs = offsets[:, 1:] + torch.where(flips[:, None], xs_fwd.flip(0), xs_fwd)
    rows = padded.gather(2, ys[:, None, :, None].expand(n, c, h, padded.shape[-1]))
    return rows.gather(3, xs[:, None, None, :].expand(n, c, h, w))


def random_crop_flip(
    images: torch.Tensor, padding: int, flip: bool, generator: torch.Generator | None = None
) -> torch.Tensor:
    """RandomCrop(H, padding, zero fill) + horizontal flip p=0.5, drawn per image; (N, C, H, W) -> same shape/dtype."""
    if padding == 0 and not flip:
        return images
    return apply_crop_flip(images, sample_crop_flip(len(images), padding, flip, generator), padding)


def crop_flip_to_boxes(params: torch.Tensor, padding: int, height: int, width: int) -> torch.Tensor:
    """(n, 5) float view records [x0, y0, x1, y1, flip] in original-image pixels (the store's `view_params`)."""
    y0 = params[:, 0].float() - padding
    x0 = params[:, 1].float() - padding
    return torch.stack([x0, y0, x0 + width, y0 + height, params[:, 2].float()], dim=1)


def boxes_to_crop_flip(boxes: torch.Tensor, padding: int) -> torch.Tensor:
    """Inverse of `crop_flip_to_boxes`: stored view records back to replayable crop+flip parameters."""
    return torch.stack([boxes[:, 1] + padding, boxes[:, 0] + padding, boxes[:, 4]], dim=1).round().long()


def sample_resized_crop_boxes(
    n: int,
    height: int,
    width: int,
    scale: tuple[float, float] = (0.2, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """(n, 4) float boxes (x0, y0, x1, y1) in pixels, torchvision RandomResizedCrop's rule: 10 tries, then centre crop.

    Each try draws area ~ U(scale) * H * W and log aspect ~ U(log ratio); the first try whose rounded w, h fit is kept
    and its top-left corner is uniform over the integer positions. All n images and tries are drawn at once.
    """
    tries = 10
    area = height * width
    target = area * _uniform(n * tries, scale[0], scale[1], generator).double().view(n, tries)
    log_ratio = _uniform(n * tries, math.log(ratio[0]), math.log(ratio[1]), generator).double().view(n, tries)
    corner = torch.rand(n, 2, generator=generator, dtype=torch.float64)
    aspect = log_ratio.exp()
    # torch.round and Python's round both round half to even, as torchvision's int(round(...)) does.
    ws = (target * aspect).sqrt().round()
    hs = (target / aspect).sqrt().round()
    fits = (ws > 0) & (ws <= width) & (hs > 0) & (hs <= height)
    first = fits.to(torch.uint8).argmax(1, keepdim=True)
    w_try, h_try = ws.gather(1, first).squeeze(1), hs.gather(1, first).squeeze(1)
    y_try = (corner[:, 0] * (height - h_try + 1)).floor()
    x_try = (corner[:, 1] * (width - w_try + 1)).floor()
    # Fallback when no try fits: the largest centred crop whose aspect is clamped into `ratio`.
    in_ratio = width / height
    if in_ratio < min(ratio):
        w_c, h_c = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w_c, h_c = int(round(height * max(ratio))), height
    else:
        w_c, h_c = width, height
    x_c, y_c = (width - w_c) // 2, (height - h_c) // 2
    ok = fits.any(1)
    x0 = torch.where(ok, x_try, torch.full_like(x_try, x_c))
    y0 = torch.where(ok, y_try, torch.full_like(y_try, y_c))
    x1 = x0 + torch.where(ok, w_try, torch.full_like(w_try, w_c))
    y1 = y0 + torch.where(ok, h_try, torch.full_like(h_try, h_c))
    return torch.stack([x0, y0, x1, y1], 1).float()


def apply_resized_crop(images: torch.Tensor, boxes: torch.Tensor, flips: torch.Tensor, size: int) -> torch.Tensor:
    """Crop each image to its box (x0, y0, x1, y1), resize to size x size (bilinear), then mirror where flips[i].

    (N, C, H, W) float + (N, 4) + bool (N,) -> (N, C, size, size). roi_align with aligned=True samples the continuous
    box exactly as a bilinear resize (align_corners=False) of the crop does; the adaptive sampling ratio is 1 when
    upsampling and averages several points per output pixel when downsampling (an antialias). Unlike crop-then-resize
    it reads the real pixels just outside the box in the outermost half-pixel ring instead of repeating the edge.
    Flipping after cropping equals flipping the image and mirroring the box, so a stored (box, flip) replays exactly.
    """
    n = images.shape[0]
    index = torch.arange(n, device=images.device, dtype=images.dtype)[:, None]
    rois = torch.cat([index, to_device(boxes, images.device, images.dtype)], 1)
    out = roi_align(images, rois, output_size=size, spatial_scale=1.0, sampling_ratio=-1, aligned=True)
    return torch.where(to_device(flips, images.device)[:, None, None, None], out.flip(-1), out)


def resized_crop_uint8(images: torch.Tensor, boxes: torch.Tensor, flips: torch.Tensor, size: int) -> torch.Tensor:
    """apply_resized_crop's CPU form on uint8: torchvision RandomResizedCrop's own ops per image (slice the integer
    box, antialiased bilinear resize), then the flip; uint8 (N, C, H, W) -> uint8 (N, C, size, size).

    The boxes of `sample_resized_crop_boxes` are whole pixels, so slicing reads exactly the crop torchvision reads.
    On a CPU, PyTorch's uint8 channels-last resize kernel is about 2x faster than roi_align on float and leaves a
    quarter of the bytes to convert; but it loops over the batch in Python, so a GPU (and a CUDA graph) takes
    apply_resized_crop, which differs only in the resampling at the crop's outer half-pixel ring.
    """
    crops = []
    for i, ((x0, y0, x1, y1), flip) in enumerate(zip(boxes.round().long().tolist(), flips.tolist())):
        crop = F.interpolate(images[i : i + 1, :, y0:y1, x0:x1], size=(size, size), mode="bilinear",
                             antialias=True, align_corners=False)[0]
        crops.append((crop.flip(-1) if flip else crop).permute(1, 2, 0))
    return torch.stack(crops).permute(0, 3, 1, 2)  # stacked as NHWC (a plain copy), returned channels-last


def sample_jitter_factors(
    n: int,
    brightness: float,
    contrast: float,
    saturation: float,
    hue: float,
    p: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """(n, 4) per-image ColorJitter factors (brightness, contrast, saturation, hue shift); identity where not applied.

    As torchvision ColorJitter: b, c, s ~ U(max(0, 1 - x), 1 + x), hue ~ U(-hue, hue); each image is jittered with
    probability p (RandomApply), otherwise its factors are (1, 1, 1, 0).
    """
    if not 0 <= hue <= 0.5:
        raise ValueError(f"hue must be in [0, 0.5], got {hue}")
    factors = torch.stack(
        [_uniform(n, max(0.0, 1 - x), 1 + x, generator) for x in (brightness, contrast, saturation)]
        + [_uniform(n, -hue, hue, generator)],
        1,
    )
    applied = _bernoulli(n, p, generator)
    identity = torch.tensor([1.0, 1.0, 1.0, 0.0])
    return torch.where(applied[:, None], factors, identity)


def _blend(images: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    factor = factor[:, None, None, None]
    return (factor * images + (1 - factor) * other).clamp(0, 1)


def _grayscale(images: torch.Tensor) -> torch.Tensor:
    return images if images.shape[1] == 1 else TF.rgb_to_grayscale(images)


def _shift_hue(images: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """RGB -> HSV, rotate hue by shift[i] (in turns), HSV -> RGB; (N, 3, H, W), vectorised over the batch."""
    r, g, b = images.unbind(1)
    value, _ = images.max(1)
    chroma = value - images.amin(1)
    has_chroma = chroma > 0
    sat = torch.where(value > 0, chroma / torch.where(value > 0, value, 1.0), 0.0)
    safe = torch.where(has_chroma, chroma, 1.0)  # grey pixels: any hue, avoid 0/0
    rc, gc, bc = (value - r) / safe, (value - g) / safe, (value - b) / safe
    h6 = torch.where(value == r, bc - gc, torch.where(value == g, 2.0 + rc - bc, 4.0 + gc - rc))
    hue = torch.remainder(h6 / 6.0 + shift[:, None, None], 1.0)
    # Closed-form HSV -> RGB: channel n in (R=5, G=3, B=1) is v - v*s*clamp(min(k, 4 - k), 0, 1), k = (n + 6h) mod 6.
    channels = []
    for offset in (5.0, 3.0, 1.0):
        k = torch.remainder(offset + hue * 6.0, 6.0)
        channels.append(value - value * sat * torch.minimum(k, 4.0 - k).clamp(0, 1))
    return torch.stack(channels, 1)


def apply_color_jitter(images: torch.Tensor, factors: torch.Tensor, hue: bool = True) -> torch.Tensor:
    """Apply per-image (brightness, contrast, saturation, hue) factors to float [0, 1] images, in that fixed order.

    Each step matches torchvision's adjust_* for one image. torchvision ColorJitter shuffles the four steps per call;
    we keep the fixed order b, c, s, h (a documented difference: a per-image order would need a loop or 24 branches).
    For C=1 images saturation and hue are skipped, as torchvision does for grayscale inputs. hue=False skips the HSV
    round trip for factors drawn with hue=0 (ColorJitter(hue=0) does not shift), which the torch.where below would
    otherwise compute for the whole batch.
    """
    factors = to_device(factors, images.device, images.dtype)
    out = (images * factors[:, 0, None, None, None]).clamp(0, 1)
    out = _blend(out, _grayscale(out).mean((-3, -2, -1), keepdim=True), factors[:, 1])
    if images.shape[1] == 3:
        out = _blend(out, _grayscale(out), factors[:, 2])
        if not hue:
            return out
        shift = factors[:, 3]
        # Unshifted images skip the HSV round trip so they stay bit-exact.
        out = torch.where((shift != 0)[:, None, None, None], _shift_hue(out, shift), out)
    return out


def color_jitter(
    images: torch.Tensor,
    brightness: float,
    contrast: float,
    saturation: float,
    hue: float,
    p: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """RandomApply(ColorJitter(b, c, s, h), p) with an independent draw per image; float (N, C, H, W) in [0, 1]."""
    factors = sample_jitter_factors(images.shape[0], brightness, contrast, saturation, hue, p, generator)
    return apply_color_jitter(images, factors)


def apply_grayscale(images: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
    """Chosen RGB images (bool (N,)) become their luma in all 3 channels; C=1 is returned as is."""
    if images.shape[1] == 1:
        return images
    chosen = to_device(chosen, images.device).bool()
    return torch.where(chosen[:, None, None, None], TF.rgb_to_grayscale(images, num_output_channels=3), images)


def random_grayscale(images: torch.Tensor, p: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """RandomGrayscale(p) per image: chosen RGB images become their luma in all 3 channels; C=1 is returned as is."""
    if images.shape[1] == 1:
        return images
    return apply_grayscale(images, _bernoulli(images.shape[0], p, generator))


# Columns of a MoCo key view's parameter row (sample_moco_view): crop box, flip, jitter factors, grayscale.
MOCO_BOX, MOCO_FLIP, MOCO_JITTER, MOCO_GRAY = slice(0, 4), 4, slice(5, 9), 9


def sample_moco_view(shape: torch.Size, generator: torch.Generator | None = None) -> torch.Tensor:
    """(N, 10) float parameters of the MoCo-v2 key view (columns MOCO_*) of images of `shape` (N, C, H, W).

    One tensor, so a batch's key views reach the GPU in one copy and a CUDA graph of the step can apply them. Drawn
    in the order they are applied; grayscale is not drawn for C=1 (as random_grayscale), so runs stay reproducible.
    """
    n, channels, height, width = shape
    boxes = sample_resized_crop_boxes(n, height, width, (0.2, 1.0), (3 / 4, 4 / 3), generator)
    flips = _bernoulli(n, 0.5, generator)
    jitter = sample_jitter_factors(n, 0.4, 0.4, 0.4, 0.1, p=0.8, generator=generator)
    gray = _bernoulli(n, 0.2, generator) if channels != 1 else torch.zeros(n, dtype=torch.bool)
    return torch.cat([boxes, flips[:, None].float(), jitter, gray[:, None].float()], 1)


def apply_moco_view(images: torch.Tensor, params: torch.Tensor, size: int) -> torch.Tensor:
    """Replay `sample_moco_view` parameters: uint8 or float (N, C, H, W) -> float (N, C, size, size) in [0, 1].

    Device ops only (no host sync, fixed shapes), so it can run inside a captured training step.
    """
    params = to_device(params, images.device)
    x = images if images.is_floating_point() else to_float(images)
    x = apply_resized_crop(x, params[:, MOCO_BOX], params[:, MOCO_FLIP] > 0, size)
    x = apply_color_jitter(x, params[:, MOCO_JITTER])
    return apply_grayscale(x, params[:, MOCO_GRAY] > 0)


def moco_view(images: torch.Tensor, size: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """MoCo-v2 key view for small images: RRC(scale 0.2-1) + jitter(0.4, 0.4, 0.4, 0.1) p=0.8 + gray p=0.2 + flip.

    uint8 (N, C, H, W) -> float (N, C, size, size) in [0, 1], not normalised. No blur (RECIPES.md: 32-px analogue).
    The flip is done with the crop: jitter and grayscale are per-pixel or whole-image ops, so they commute with it.
    """
    return apply_moco_view(images, sample_moco_view(images.shape, generator), size)
