"""CLIP preprocessing on arrays, batched: resize the shortest side, centre-crop, normalise.

This reproduces `CLIPImageProcessor` without its per-image PIL round trip. The resize
is torch's uint8 antialiased bicubic kernel, which implements Pillow's resampling
(same a = -0.5 cubic, same support scaling when shrinking, same rounding), so crops
match the processor to within one grey level; it is several times faster than the
processor and runs without the GIL, so threads resize a batch on every core. The
crops stay uint8 up to the model: OpenVINO normalises them in its graph, the torch
paths with `normalise_batch` on the model's device. Sizes, mean and std come from the
checkpoint's `preprocessor_config.json` when it has one.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# PIL resampling codes used in preprocessor configs -> torch interpolate modes.
_RESAMPLE_MODES = {2: "bilinear", 3: "bicubic"}


@dataclass(frozen=True)
class PreprocessConfig:
    shortest_edge: int = 224
    crop_height: int = 224
    crop_width: int = 224
    do_center_crop: bool = True
    mode: str = "bicubic"
    rescale_factor: float = 1.0 / 255.0
    mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    std: tuple[float, float, float] = OPENAI_CLIP_STD

    @classmethod
    def for_image_size(cls, image_size: int) -> "PreprocessConfig":
        return cls(shortest_edge=image_size, crop_height=image_size, crop_width=image_size)

    @classmethod
    def from_file(cls, path: Path, default: "PreprocessConfig") -> "PreprocessConfig":
        """Read a `preprocessor_config.json`; keys it lacks keep the `default` values."""
        raw = json.loads(Path(path).read_text())
        size = raw.get("size") or {}
        if isinstance(size, int):
            size = {"shortest_edge": size}
        shortest = size.get("shortest_edge") or min(size.get("height", default.shortest_edge),
                                                    size.get("width", default.shortest_edge))
        crop = raw.get("crop_size") or {}
        if isinstance(crop, int):
            crop = {"height": crop, "width": crop}
        return cls(
            shortest_edge=int(shortest),
            crop_height=int(crop.get("height", default.crop_height)),
            crop_width=int(crop.get("width", default.crop_width)),
            do_center_crop=bool(raw.get("do_center_crop", default.do_center_crop)),
            mode=_RESAMPLE_MODES.get(raw.get("resample", 3), "bicubic"),
            rescale_factor=float(raw.get("rescale_factor", default.rescale_factor)),
            mean=tuple(float(v) for v in raw.get("image_mean", default.mean)),
            std=tuple(float(v) for v in raw.get("image_std", default.std)),
        )

    @property
    def output_hw(self) -> tuple[int, int]:
        if self.do_center_crop:
            return self.crop_height, self.crop_width
        return self.shortest_edge, self.shortest_edge


def resized_hw(height: int, width: int, shortest_edge: int) -> tuple[int, int]:
    """Output size with the shorter side at `shortest_edge` (the processor's own rounding)."""
    if height <= width:
        return shortest_edge, int(shortest_edge * width / height)
    return int(shortest_edge * height / width), shortest_edge


def resize_and_crop(image: np.ndarray, config: PreprocessConfig) -> np.ndarray:
    """One RGB uint8 (H, W, 3) frame -> the model's uint8 input crop (h, w, 3)."""
    height, width = image.shape[:2]
    new_h, new_w = resized_hw(height, width, config.shortest_edge)
    if not config.do_center_crop:
        new_h = new_w = config.shortest_edge
    if (new_h, new_w) != (height, width):
        if not image.flags.writeable or not image.flags.c_contiguous:
            image = np.array(image)  # torch wraps only writable, contiguous memory without a copy
        # (1, 3, H, W) view of the HWC array: channels-last memory, which the uint8 kernel prefers.
        tensor = torch.from_numpy(image).permute(2, 0, 1).unsqueeze(0)
        resized = F.interpolate(tensor, size=(new_h, new_w), mode=config.mode, antialias=True,
                                align_corners=False)
        image = resized[0].permute(1, 2, 0).numpy()
    if config.do_center_crop:
        image = center_crop(image, config.crop_height, config.crop_width)
    return np.ascontiguousarray(image)


def center_crop(image: np.ndarray, crop_h: int, crop_w: int) -> np.ndarray:
    """Centre crop like the processor: top/left rounded down, zero padding when too small."""
    height, width = image.shape[:2]
    if height >= crop_h and width >= crop_w:
        top, left = (height - crop_h) // 2, (width - crop_w) // 2
        return image[top:top + crop_h, left:left + crop_w]
    padded_h, padded_w = max(crop_h, height), max(crop_w, width)
    padded = np.zeros((padded_h, padded_w, 3), dtype=image.dtype)
    pad_top, pad_left = math.ceil((padded_h - height) / 2), math.ceil((padded_w - width) / 2)
    padded[pad_top:pad_top + height, pad_left:pad_left + width] = image
    return center_crop(padded, crop_h, crop_w)


def pixel_mean_and_scale(config: PreprocessConfig) -> tuple[list[float], list[float]]:
    """Per-channel (mean, scale) in uint8 units: normalised = (value - mean) / scale, which is
    (value * rescale_factor - image_mean) / image_std."""
    factor = config.rescale_factor
    return [m / factor for m in config.mean], [s / factor for s in config.std]


def mean_colour(config: PreprocessConfig) -> np.ndarray:
    """The uint8 RGB colour that normalises to (about) zero: the model's "nothing here"."""
    mean, _ = pixel_mean_and_scale(config)
    return np.clip(np.round(mean), 0, 255).astype(np.uint8)


def pad_to_square(image: np.ndarray, fill: np.ndarray) -> np.ndarray:
    """`image` centred on a square canvas of colour `fill` (letterboxing), so a centre crop
    to a square keeps all of it; a square image is returned as it is."""
    height, width = image.shape[:2]
    if height == width:
        return image
    side = max(height, width)
    canvas = np.empty((side, side, 3), dtype=np.uint8)
    canvas[:] = fill
    top, left = (side - height) // 2, (side - width) // 2
    canvas[top:top + height, left:left + width] = image
    return canvas


def channel_affine(config: PreprocessConfig) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel float32 (scale, offset) with normalised = uint8 value * scale - offset."""
    std = np.asarray(config.std, dtype=np.float32)
    return np.float32(config.rescale_factor) / std, np.asarray(config.mean, dtype=np.float32) / std


def normalise_batch(batch: torch.Tensor, config: PreprocessConfig, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A uint8 (N, h, w, 3) batch (on any device, the GPU path) -> normalised (N, 3, h, w)
    `dtype` pixel values, in one fused multiply-add on that device."""
    scale, offset = (torch.from_numpy(a).to(batch.device).view(1, 3, 1, 1) for a in channel_affine(config))
    pixels = batch.permute(0, 3, 1, 2).to(torch.float32) * scale - offset
    return pixels.to(dtype).contiguous()


def crops_from_pixel_values(pixels: torch.Tensor, config: PreprocessConfig) -> torch.Tensor:
    """Normalised float (N, 3, h, w) pixel values -> the uint8 (N, h, w, 3) crops they were made
    from (exact for those; other values are rounded and clipped), for a model that takes crops."""
    scale, offset = (torch.from_numpy(a).view(1, 3, 1, 1) for a in channel_affine(config))
    values = (pixels.detach().to("cpu", torch.float32) + offset) / scale
    return values.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def preprocess_images(images: Sequence[np.ndarray], config: PreprocessConfig) -> torch.Tensor:
    """RGB uint8 frames of any size -> normalised float32 (N, 3, h, w) model input: the crops
    every path makes, normalised as the torch paths do (OpenVINO does the same in its graph)."""
    crops = torch.from_numpy(np.stack([resize_and_crop(image, config) for image in images]))
    return normalise_batch(crops, config)
