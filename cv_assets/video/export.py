"""Pulling known frames out of a clip in one pass (`extract_frame`, `extract_frames`), and
writing a frame as JPEG for people to look at. The pipeline's own frames are stored
losslessly by `cv_assets.store.frames`."""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import cv2
import numpy as np

from cv_assets.settings import SamplingSettings
from cv_assets.video.decoder import ClipDecoder
from cv_assets.video.pixels import frame_to_rgb
from cv_assets.video.errors import VideoInputError
from cv_assets.video.paths import validate_clip_path
from cv_assets.video.sampler import decode_limits, frame_content_hash



def frame_file_name(frame_index: int) -> str:
    return f"frame_{int(frame_index):06d}.jpg"




def write_jpeg(image_rgb: np.ndarray, path: str | os.PathLike, quality: int) -> Path:
    """Encode an RGB frame as JPEG; written to a temporary name first, so a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ok, encoded = cv2.imencode(".jpg", cv2.cvtColor(image_rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise OSError(f"{path}: JPEG encoding failed for a {image_rgb.shape} frame")
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    tmp.write_bytes(encoded.tobytes())
    os.replace(tmp, path)
    return path






@dataclass(frozen=True)
class ExtractedFrame:
    frame_index: int
    timestamp_sec: float
    image: np.ndarray = field(repr=False)
    image_path: Path | None
    content_hash: str


def extract_frames(
    clip: str | os.PathLike,
    indices: Iterable[int],
    out_dir: str | os.PathLike | None = None,
    *,
    sampling: SamplingSettings | None = None,
    project_root: str | os.PathLike | None = None,
) -> list[ExtractedFrame]:
    """The frames at `indices` (0-based decode order), in one sequential pass, no seeking.

    Decoding stops after the highest index. With `out_dir`, each frame is also written
    there as `frame_<index>.jpg`. Raises VideoInputError for an unusable clip or
    for indices past the end of the clip (naming them).
    """
    sampling = sampling or SamplingSettings()
    wanted = sorted({int(i) for i in indices})
    if any(i < 0 for i in wanted):
        raise ValueError(f"frame indices must be >= 0, got {[i for i in wanted if i < 0]}")
    if not wanted:
        return []
    label = os.fspath(clip)
    resolved = validate_clip_path(clip, project_root=project_root, max_file_bytes=sampling.max_file_bytes)
    found: list[ExtractedFrame] = []
    remaining = set(wanted)
    with ClipDecoder(resolved, decode_limits(sampling), label=label) as decoder:
        for decoded in decoder.frames():
            if decoded.index in remaining:
                found.append(_extracted(decoded, out_dir, sampling.jpeg_quality))
                remaining.discard(decoded.index)
                if not remaining:
                    break
        decoded_count = decoder.decoded_frames
    if remaining:
        raise VideoInputError(
            label, f"frames {sorted(remaining)} are past the end of the clip ({decoded_count} frames decoded)"
        )
    return found


def extract_frame(
    clip: str | os.PathLike,
    index: int,
    *,
    sampling: SamplingSettings | None = None,
    project_root: str | os.PathLike | None = None,
) -> np.ndarray:
    """One frame as RGB uint8 (decodes up to it; never seeks)."""
    return extract_frames(clip, [index], sampling=sampling, project_root=project_root)[0].image


def _extracted(decoded, out_dir, quality: int) -> ExtractedFrame:
    image = frame_to_rgb(decoded.frame)
    path = write_jpeg(image, Path(out_dir) / frame_file_name(decoded.index), quality) if out_dir is not None else None
    return ExtractedFrame(decoded.index, decoded.timestamp_sec, image, path, frame_content_hash(image))
