"""Key-frame sampling: one sequential decode per clip, motion on small luma, guaranteed coverage.

`sample_video_frames` opens the clip once, decodes every frame once (no seeking, no
second pass), measures motion on each frame's downscaled Y plane, lets a
`KeyFrameSelector` hold on to the few frames that can still be picked, and converts
only the picked frames to RGB. The probe (codec, size, real rate, declared and
decoded frame counts, duration, status) comes out of the same pass.

Bad input never raises here: it comes back as a probe with status "failed" and the
reason, so the caller can record it and move on to the next clip.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Callable, Literal, Sequence

import av.error
import numpy as np

from cv_assets.settings import CvAnalysisSettings, SamplingSettings
from cv_assets.video.decoder import ClipDecoder, DecodeLimits
from cv_assets.video.pixels import frame_to_rgb
from cv_assets.video.cuts import Cut, CutDetector
from cv_assets.video.errors import VideoInputError
from cv_assets.video.motion import downscaled_luma, motion_ratio
from cv_assets.video.paths import validate_clip_path
from cv_assets.video.selection import KeyFrameSelector

Status = Literal["ok", "partial", "failed"]


@dataclass(frozen=True)
class ClipProbe:
    """What a clip is, as declared by its header and as found by decoding it."""

    path: str
    status: Status
    reason: str | None = None
    size_bytes: int | None = None
    container: str | None = None
    codec: str | None = None
    width: int | None = None
    height: int | None = None
    fps: float | None = None
    declared_frames: int | None = None
    decoded_frames: int = 0
    duration_sec: float | None = None
    resolved_path: str | None = None

    @property
    def usable(self) -> bool:
        return self.status != "failed"


@dataclass(frozen=True)
class SampledFrame:
    """A picked frame: where it is, why it was picked, and its decoded RGB pixels."""

    frame_index: int
    timestamp_sec: float
    reasons: tuple[str, ...]
    motion_score: float
    image: np.ndarray = field(repr=False)

    @property
    def width(self) -> int:
        return int(self.image.shape[1])

    @property
    def height(self) -> int:
        return int(self.image.shape[0])

    @cached_property
    def content_hash(self) -> str:
        """sha256 of the decoded RGB pixels (row-major, 3 bytes per pixel)."""
        return frame_content_hash(self.image)


@dataclass(frozen=True)
class SamplingResult:
    probe: ClipProbe
    frames: list[SampledFrame]
    decode_ms: float
    motion_candidates: int = 0
    cuts: list[Cut] = field(default_factory=list)  # shot boundaries inside the clip


def frame_content_hash(image: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(image).data).hexdigest()


def decode_limits(sampling: SamplingSettings) -> DecodeLimits:
    return DecodeLimits(sampling.max_width, sampling.max_height, sampling.max_duration_sec)


def sample_video_frames(
    path: str | os.PathLike,
    sampling: SamplingSettings,
    cv: CvAnalysisSettings,
    project_root: str | os.PathLike | None = None,
) -> SamplingResult:
    """Pick the key frames of one clip in a single decode pass; never raises for bad input."""
    started = time.perf_counter()
    label = os.fspath(path)
    size = decoder = resolved = None
    try:
        resolved = validate_clip_path(path, project_root=project_root, max_file_bytes=sampling.max_file_bytes)
        size = resolved.stat().st_size
        decoder = ClipDecoder(resolved, decode_limits(sampling), label=label)
        with decoder:
            picks, candidates, shape, last_ts, cuts = _decode_and_select(decoder, sampling, cv)
            status, reason = decoder.outcome()
            frames = [] if status == "failed" else [_to_sampled(p) for p in picks]
    except VideoInputError as exc:
        return _failed(label, size, decoder, exc.reason, started, resolved)
    except (av.error.FFmpegError, OSError) as exc:
        return _failed(label, size, decoder, f"decoding failed: {exc}", started, resolved)
    probe = _probe(label, size, decoder, status, reason, shape=shape, last_ts=last_ts, resolved=resolved)
    return SamplingResult(probe, frames, _ms_since(started), motion_candidates=candidates, cuts=cuts)


def _failed(label, size, decoder, reason: str, started: float, resolved: Path | None) -> SamplingResult:
    probe = _probe(label, size, decoder, status="failed", reason=reason, resolved=resolved)
    return SamplingResult(probe, [], _ms_since(started))


def _decode_and_select(decoder: ClipDecoder, sampling: SamplingSettings, cv: CvAnalysisSettings):
    selector = KeyFrameSelector(
        base_offsets_sec=sampling.base_offsets_sec,
        include_last=sampling.include_last,
        motion_threshold=cv.motion_delta_threshold,
        max_frames=cv.max_frames_per_clip,
        min_spacing_sec=sampling.min_spacing_sec,
    )
    cuts = CutDetector(sampling.cut_min_change, sampling.cut_adaptive_ratio, sampling.cut_window,
                       sampling.cut_min_shot_sec)
    previous = None
    candidates = 0
    shape = None
    timestamp = None
    pixel_delta, threshold, width = sampling.motion_pixel_delta, cv.motion_delta_threshold, sampling.motion_width
    for decoded in decoder.frames():
        small = downscaled_luma(decoded.frame, width)
        cuts.offer(decoded.index, decoded.timestamp_sec, small)
        score = motion_ratio(previous, small, pixel_delta)
        previous = small
        candidates += score > threshold
        timestamp = decoded.timestamp_sec
        if shape is None:
            shape = (decoded.frame.width, decoded.frame.height)
        # The decoded frame itself rides along; only picked frames are ever converted to RGB.
        selector.offer(decoded.index, timestamp, score, decoded.frame)
    return selector.finish(), candidates, shape, timestamp, cuts.finish()


def _to_sampled(pick) -> SampledFrame:
    image = frame_to_rgb(pick.payload)
    return SampledFrame(pick.frame_index, pick.timestamp_sec, pick.reasons, float(pick.motion_score), image)


def _probe(
    label: str,
    size: int | None,
    decoder: ClipDecoder | None,
    status: Status,
    reason: str | None,
    *,
    shape: tuple[int, int] | None = None,
    last_ts: float | None = None,
    resolved: Path | None = None,
) -> ClipProbe:
    header = decoder.header if decoder is not None else None
    decoded = decoder.decoded_frames if decoder is not None else 0
    fps = header.fps if header else None
    if fps is None and decoded > 1 and last_ts:
        fps = (decoded - 1) / last_ts
    duration = header.declared_duration_sec if header else None
    if decoded and last_ts is not None:
        # Time of the last frame plus its own display time.
        duration = last_ts + (1.0 / fps if fps else 0.0)
    width, height = shape if shape else ((header.width, header.height) if header else (None, None))
    return ClipProbe(
        path=label,
        status=status,
        reason=reason,
        size_bytes=size,
        container=header.container if header else None,
        codec=header.codec if header else None,
        width=width,
        height=height,
        fps=fps,
        declared_frames=header.declared_frames if header else None,
        decoded_frames=decoded,
        duration_sec=duration,
        resolved_path=str(resolved) if resolved is not None else None,
    )


def _ms_since(started: float) -> float:
    return (time.perf_counter() - started) * 1000.0


def detect_motion_deltas(
    path: str | os.PathLike,
    sampling: SamplingSettings | None = None,
    project_root: str | os.PathLike | None = None,
) -> np.ndarray:
    """Motion ratio of every frame of a clip (frame 0 scores 0), in one decode pass.

    Raises VideoInputError when the clip cannot be used.
    """
    sampling = sampling or SamplingSettings()
    resolved = validate_clip_path(path, project_root=project_root, max_file_bytes=sampling.max_file_bytes)
    scores: list[float] = []
    previous = None
    with ClipDecoder(resolved, decode_limits(sampling), label=os.fspath(path)) as decoder:
        for decoded in decoder.frames():
            small = downscaled_luma(decoded.frame, sampling.motion_width)
            scores.append(motion_ratio(previous, small, sampling.motion_pixel_delta))
            previous = small
        status, reason = decoder.outcome()
    if status == "failed":
        raise VideoInputError(os.fspath(path), reason)
    return np.asarray(scores, dtype=np.float64)


def clip_file_sha256(path: str | os.PathLike, chunk_bytes: int = 1 << 20) -> str:
    """sha256 of a clip file's bytes (identifies the exact input a probe describes)."""
    digest = hashlib.sha256()
    with open(Path(path), "rb") as handle:
        while chunk := handle.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def sample_clips(
    clips: Sequence[tuple[int, str]],
    sampling: SamplingSettings,
    cv: CvAnalysisSettings,
    project_root: str | os.PathLike | None = None,
    on_clip: Callable[[int, SamplingResult], None] | None = None,
) -> dict[int, SamplingResult]:
    """Sample every (scene index, clip path) of a project; a bad clip is a failed result,
    never an exception. `on_clip` sees each result as it is done (for progress logs)."""
    results = {}
    for scene_index, clip_path in clips:
        results[scene_index] = sample_video_frames(clip_path, sampling, cv, project_root=project_root)
        if on_clip is not None:
            on_clip(scene_index, results[scene_index])
    return results


def clip_record(result: SamplingResult) -> dict:
    """The probe of one clip as a `clips` row (without project and scene), with the sha256
    of the file when it could be read."""
    probe = result.probe
    readable = probe.resolved_path is not None and probe.size_bytes
    return {
        "path": probe.path,
        "size_bytes": probe.size_bytes,
        "codec": probe.codec,
        "width": probe.width,
        "height": probe.height,
        "fps": probe.fps,
        "declared_frames": probe.declared_frames,
        "decoded_frames": probe.decoded_frames,
        "duration_sec": probe.duration_sec,
        "status": probe.status,
        "reason": probe.reason,
        "decode_ms": round(result.decode_ms, 2),
        "content_hash": clip_file_sha256(probe.resolved_path) if readable else None,
        "cuts": json.dumps([cut.as_dict() for cut in result.cuts]),
    }
