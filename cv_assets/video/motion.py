"""Motion between consecutive frames, measured on a small grayscale (luma) image.

The motion ratio of a frame is the share of pixels whose luma changed by more than
`pixel_delta` since the previous frame. Luma is read straight from the Y plane of
the decoded picture (no colour conversion) and shrunk to `width` pixels wide.
"""

from __future__ import annotations

import cv2
import numpy as np

from cv_assets.video.pixels import frame_to_gray

# Pixel formats whose first plane is 8-bit luma, one byte per pixel.
_LUMA_FIRST_FORMATS = frozenset(
    {
        "yuv420p", "yuvj420p", "yuv422p", "yuvj422p", "yuv444p", "yuvj444p",
        "yuv440p", "yuvj440p", "yuv411p", "yuv410p", "yuva420p", "yuva422p",
        "yuva444p", "nv12", "nv21", "nv16", "gray",
    }
)


def luma_plane(frame) -> np.ndarray:
    """The full-size 8-bit luma of a PyAV VideoFrame: a view on the Y plane when possible."""
    if frame.format.name in _LUMA_FIRST_FORMATS:
        plane = frame.planes[0]
        data = np.frombuffer(plane, np.uint8)
        rows = data.size // plane.line_size
        return data[: rows * plane.line_size].reshape(rows, plane.line_size)[: frame.height, : frame.width]
    # 10-bit, RGB, paletted...: let swscale produce 8-bit gray.
    return frame_to_gray(frame)


def shrink_luma(luma: np.ndarray, width: int) -> np.ndarray:
    """Downscale to `width` columns (aspect kept), returning a new contiguous array.

    Slicing first to about twice the target size is nearly free and leaves
    INTER_AREA only a 2x2 average to do, instead of reading every source pixel
    (0.03 ms rather than 0.6 ms for a 1080p frame).
    """
    height, src_width = luma.shape
    if src_width <= width:
        return np.array(luma, copy=True)
    target = (width, max(1, round(height * width / src_width)))
    step = src_width // (2 * width)
    if step >= 2:
        luma = luma[::step, ::step]
    return cv2.resize(luma, target, interpolation=cv2.INTER_AREA)


def downscaled_luma(frame, width: int) -> np.ndarray:
    """Small grayscale image of a decoded frame, for motion measurement."""
    return shrink_luma(luma_plane(frame), width)


def motion_ratio(previous: np.ndarray | None, current: np.ndarray, pixel_delta: int) -> float:
    """Share of pixels whose value changed by more than `pixel_delta` (0.0 for the first frame).

    A change of picture size mid-stream counts as a full change.
    """
    if previous is None:
        return 0.0
    if previous.shape != current.shape:
        return 1.0
    moved = np.count_nonzero(cv2.absdiff(previous, current) > pixel_delta)
    return float(moved) / current.size
