"""Writing key frames to disk, and pulling known frames out of a clip in one pass.

Frames of a project live under `<frames_dir>/<project>/scene_<NNN>/frame_<NNNNNN>.jpg`.
A re-run builds the project's folder aside and swaps it in, so no JPEG from an
earlier run survives next to the new ones.
"""

from __future__ import annotations

import os
import re
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import cv2
import numpy as np

from cv_assets.settings import SamplingSettings
from cv_assets.video.decoder import ClipDecoder
from cv_assets.video.pixels import frame_to_rgb
from cv_assets.video.errors import VideoInputError
from cv_assets.video.paths import validate_clip_path
from cv_assets.video.sampler import decode_limits, frame_content_hash

_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")


def scene_dir_name(scene_index: int) -> str:
    return f"scene_{int(scene_index):03d}"


def frame_file_name(frame_index: int) -> str:
    return f"frame_{int(frame_index):06d}.jpg"


def project_frames_dir(frames_dir: str | os.PathLike, project: str) -> Path:
    """`<frames_dir>/<project>`; the key must be a plain folder name (no '/', no '..')."""
    if not _SAFE_NAME.match(project) or ".." in project:
        raise ValueError(f"project key {project!r} cannot be used as a folder name")
    return Path(frames_dir) / project


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


def new_staging_dir(target: Path) -> Path:
    """An empty folder beside `target` to build its replacement in."""
    staging = target.with_name(f".{target.name}.staging-{uuid.uuid4().hex}")
    staging.mkdir(parents=True)
    return staging


def replace_directory(staging: Path, target: Path) -> None:
    """Swap `staging` in as `target`, then delete what `target` held before."""
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex}")
        os.rename(target, old)
    os.rename(staging, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


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


def export_frames(frames: Sequence, out_dir: str | os.PathLike, jpeg_quality: int) -> list[Path]:
    """Write SampledFrames as JPEGs into `out_dir`; returns the paths in the same order."""
    return [write_jpeg(f.image, Path(out_dir) / frame_file_name(f.frame_index), jpeg_quality) for f in frames]
