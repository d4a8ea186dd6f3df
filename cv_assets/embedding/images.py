"""Turn any image source into an RGB uint8 array, or refuse it with a clear reason.

A source is a decoded RGB frame (np.ndarray), a PIL image, a file path or the bytes
of an encoded image. Decoding uses Pillow (it knows every odd mode and format);
everything after decoding is numpy. Each awkward case is either converted the way
a person looking at the picture would expect, or rejected with an `ImageError`
whose message names the source:

- truncated or corrupt files are rejected (Pillow never half-decodes them here);
- decompression bombs (more than `max_pixels`) are rejected from the header, before
  decoding, with this module's limit in the message (never Pillow's own text);
- with `min_side` (the embedder's input size, oversampled), large images are decoded
  or reduced to about that size: JPEGs in the DCT domain (`draft`), other formats by an
  integer box reduction right after decoding, so the conversions below never run at
  full size (a 64 Mpx RGBA PNG costs its decode, not gigabytes of float copies);
- EXIF orientation is applied, so a portrait photo stays portrait;
- transparency (RGBA, LA, palette with a transparent index) is composited on
  white, so colour hidden under alpha = 0 never shows up;
- CMYK, YCbCr, 1-bit and the like are converted to RGB;
- 16-bit and 32-bit greyscale are scaled to 8 bit (not clipped to white).
"""

from __future__ import annotations

import io
import warnings
from os import PathLike
from pathlib import Path
from typing import Any, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# About 8000 x 8000. Larger images are almost certainly hostile (or a mistake);
# CLIP looks at 224 x 224 anyway.
MAX_PIXELS = 64_000_000
TRANSPARENT_BACKGROUND = (255, 255, 255)
COMPOSITE_BLOCK_PIXELS = 1 << 20  # pixels composited at a time (about 20 MB of float temporaries)

ImageSource = Union[np.ndarray, Image.Image, str, PathLike, bytes, bytearray, memoryview]


class ImageError(ValueError):
    """An image could not be used; the message names the source and the reason."""

    def __init__(self, source: str, reason: str):
        self.source = source
        self.reason = reason
        super().__init__(f"{source}: {reason}")


def describe_source(source: Any, name: str | None = None) -> str:
    """A short label for error messages: the given name, the path, or the kind of object."""
    if name:
        return str(name)
    if isinstance(source, (str, PathLike)):
        return str(source)
    if isinstance(source, (bytes, bytearray, memoryview)):
        return f"<{len(source)} bytes>"
    if isinstance(source, np.ndarray):
        return f"<array {source.shape} {source.dtype}>"
    if isinstance(source, Image.Image):
        return f"<PIL image {source.mode} {source.size[0]}x{source.size[1]}>"
    return f"<{type(source).__name__}>"


def load_image(
    source: ImageSource,
    name: str | None = None,
    *,
    max_pixels: int = MAX_PIXELS,
    min_side: int | None = None,
) -> np.ndarray:
    """Decode `source` into an RGB uint8 array (H, W, 3), or raise `ImageError`.

    `min_side`, when given, lets JPEG decoding scale down in the DCT domain (a cheap,
    alias-free reduction) as long as both sides stay at least `min_side` pixels; the
    embedder asks for twice its input size, so the final resize still sees detail.
    """
    label = describe_source(source, name)
    if isinstance(source, np.ndarray):
        return array_to_rgb(source, label)
    if isinstance(source, Image.Image):
        return pil_to_rgb(source, label, max_pixels=max_pixels)
    if isinstance(source, (str, PathLike)):
        path = Path(source)
        if not path.is_file():
            raise ImageError(label, "file not found" if not path.exists() else "not a regular file")
        return _decode(lambda: Image.open(path), label, max_pixels=max_pixels, min_side=min_side)
    if isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) == 0:
            raise ImageError(label, "empty image data")
        data = bytes(source)
        return _decode(lambda: Image.open(io.BytesIO(data)), label, max_pixels=max_pixels, min_side=min_side)
    raise ImageError(label, f"unsupported image source type {type(source).__name__}")


def _decode(opener, label: str, *, max_pixels: int, min_side: int | None) -> np.ndarray:
    try:
        with warnings.catch_warnings():
            # Pillow only warns between MAX_IMAGE_PIXELS and twice that; treat it as the error it is.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = opener()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        # Pillow's own thresholds lie above ours; say which limit was crossed, not Pillow's.
        raise ImageError(
            label, f"rejected as a decompression bomb: its header declares more than the limit of {max_pixels} pixels"
        ) from None
    except UnidentifiedImageError:
        raise ImageError(label, "not a recognised image format") from None
    except OSError as exc:
        raise ImageError(label, f"cannot open: {exc}") from None
    with image:
        _check_pixels(image, label, max_pixels)
        if min_side and image.format == "JPEG":
            image.draft(None, (min_side, min_side))
        return pil_to_rgb(image, label, max_pixels=max_pixels, min_side=min_side)


def _check_pixels(image: Image.Image, label: str, max_pixels: int) -> None:
    width, height = image.size
    if width <= 0 or height <= 0:
        raise ImageError(label, f"empty image ({width}x{height})")
    if width * height > max_pixels:
        raise ImageError(
            label,
            f"rejected as a decompression bomb: {width}x{height} = {width * height} pixels "
            f"exceeds the limit of {max_pixels}",
        )


def pil_to_rgb(image: Image.Image, label: str, *, max_pixels: int = MAX_PIXELS, min_side: int | None = None) -> np.ndarray:
    """Fully decode a PIL image and convert it to RGB uint8 (see the module docstring)."""
    _check_pixels(image, label, max_pixels)
    try:
        image.load()
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        # "image file is truncated", broken Huffman data, bad palette ...
        raise ImageError(label, f"corrupt or truncated image data: {exc}") from None
    image = _apply_exif_orientation(image)
    if min_side:
        image = _reduce_to(image, min_side)
    return _to_rgb(image, label)


# Modes Pillow's integer reduction handles (LA/RGBA with premultiplied alpha).
_REDUCIBLE_MODES = ("L", "LA", "RGB", "RGBA", "I", "F", "CMYK", "YCbCr")


def _reduce_to(image: Image.Image, min_side: int) -> Image.Image:
    """Shrink by the largest integer factor that keeps both sides at least `min_side`
    (a box filter: no aliasing, and the embedder's resize still sees detail)."""
    factor = min(image.size) // min_side
    if factor < 2:
        return image
    if image.mode.startswith("I;16"):
        image = image.convert("I")  # same values, a mode the reduction knows
    elif image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode not in _REDUCIBLE_MODES:
        return image
    # Block by block (rows a multiple of the factor, so the result is the same as one
    # reduction of the whole): RGBA is premultiplied on the way, and a whole-image copy of
    # a 64 Mpx picture would cost 256 MB.
    width, height = image.size
    rows = max(factor, COMPOSITE_BLOCK_PIXELS // width // factor * factor)
    try:
        reduced = Image.new(image.mode, (-(-width // factor), -(-height // factor)))
        for top in range(0, height, rows):
            reduced.paste(image.crop((0, top, width, min(height, top + rows))).reduce(factor), (0, top // factor))
    except (ValueError, OSError):
        return image
    return reduced


EXIF_ORIENTATION = 0x0112


def _apply_exif_orientation(image: Image.Image) -> Image.Image:
    try:
        if image.getexif().get(EXIF_ORIENTATION, 1) == 1:
            return image  # upright already (exif_transpose would still copy every pixel)
        return ImageOps.exif_transpose(image)
    except (OSError, ValueError, KeyError, TypeError, SyntaxError):
        # A broken EXIF block says nothing reliable about orientation; keep the pixels as stored.
        return image


def _to_rgb(image: Image.Image, label: str) -> np.ndarray:
    mode = image.mode
    if mode == "RGB":
        return np.array(image, dtype=np.uint8)
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        return _grey_to_rgb(_high_depth_to_uint8(np.asarray(image), mode))
    if mode == "P":
        mode_after = "RGBA" if "transparency" in image.info else "RGB"
        return _to_rgb(image.convert(mode_after), label)
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        return _composite_image(image if mode == "RGBA" else image.convert("RGBA"))
    if mode == "L":
        return _grey_to_rgb(np.array(image, dtype=np.uint8))
    try:
        # 1, CMYK, YCbCr, LAB, HSV, RGBX ...: Pillow's conversions are the right ones.
        return np.array(image.convert("RGB"), dtype=np.uint8)
    except (ValueError, OSError) as exc:
        raise ImageError(label, f"cannot convert image mode {mode} to RGB: {exc}") from None


def _high_depth_to_uint8(values: np.ndarray, mode: str) -> np.ndarray:
    values = values.astype(np.float64)
    if mode == "F":
        # Float images are either 0..1 or 0..255 by convention.
        scale = 255.0 if values.size and np.nanmax(values) <= 1.0 else 1.0
        return np.clip(np.nan_to_num(values) * scale, 0, 255).round().astype(np.uint8)
    # 16-bit data (Pillow opens 16-bit PNG/TIFF greyscale as I;16 or I): 65535 -> 255.
    return np.clip(values / 257.0, 0, 255).round().astype(np.uint8)


def _grey_to_rgb(grey: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.repeat(grey[:, :, None], 3, axis=2))


def _composite_image(rgba: Image.Image) -> np.ndarray:
    """`composite_on_background` of an RGBA PIL image, read a block of rows at a time so no
    full-size copy of its pixels is ever made besides the RGB result."""
    width, height = rgba.size
    out = np.empty((height, width, 3), dtype=np.uint8)
    rows = max(1, COMPOSITE_BLOCK_PIXELS // width)
    for top in range(0, height, rows):
        bottom = min(height, top + rows)
        out[top:bottom] = composite_on_background(np.asarray(rgba.crop((0, top, width, bottom)), dtype=np.uint8))
    return out


def composite_on_background(rgba: np.ndarray, background=TRANSPARENT_BACKGROUND) -> np.ndarray:
    """Alpha-composite an RGBA uint8 array on a solid background; fully transparent pixels
    become the background whatever colour they stored. Done in blocks of rows, so the
    float temporaries stay small whatever the image size."""
    bg = np.asarray(background, dtype=np.float32)
    out = np.empty((*rgba.shape[:2], 3), dtype=np.uint8)
    rows = max(1, COMPOSITE_BLOCK_PIXELS // max(1, rgba.shape[1]))
    for start in range(0, rgba.shape[0], rows):
        block = rgba[start:start + rows]
        alpha = block[:, :, 3:4].astype(np.float32) / 255.0
        out[start:start + rows] = (block[:, :, :3].astype(np.float32) * alpha + bg * (1.0 - alpha)).round()
    return out


def array_to_rgb(array: np.ndarray, label: str = "<array>") -> np.ndarray:
    """Validate a decoded frame and return it as contiguous RGB uint8 (H, W, 3).

    Accepts RGB (H, W, 3), RGBA (H, W, 4, composited on white) and greyscale (H, W) or
    (H, W, 1); uint8 as is, uint16 scaled to 8 bit, floats in 0..1 scaled by 255.
    """
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (3, 4)):
        raise ImageError(label, f"expected an RGB image array (H, W, 3), got shape {array.shape}")
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ImageError(label, f"empty image array {array.shape}")
    array = _array_to_uint8(array, label)
    if array.ndim == 2:
        return _grey_to_rgb(array)
    if array.shape[2] == 4:
        return composite_on_background(array)
    return np.ascontiguousarray(array)


def _array_to_uint8(array: np.ndarray, label: str) -> np.ndarray:
    if array.dtype == np.uint8:
        return array
    if array.dtype == np.uint16:
        return (array.astype(np.float32) / 257.0).round().astype(np.uint8)
    if np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise ImageError(label, "image array contains NaN or infinite values")
        scale = 255.0 if array.max(initial=0.0) <= 1.0 else 1.0
        return np.clip(array * scale, 0, 255).round().astype(np.uint8)
    if np.issubdtype(array.dtype, np.integer):
        if array.min(initial=0) < 0 or array.max(initial=0) > 255:
            raise ImageError(label, f"{array.dtype} image array has values outside 0..255")
        return array.astype(np.uint8)
    raise ImageError(label, f"unsupported image array dtype {array.dtype}")
