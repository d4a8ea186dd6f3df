"""Video: probing clips, one-pass key-frame sampling, motion deltas, frame export (no Dagster here)."""

from cv_assets.video.errors import VideoInputError
from cv_assets.video.export import (
    ExtractedFrame,
    extract_frame,
    extract_frames,
    frame_file_name,
    write_jpeg,
)
from cv_assets.video.motion import downscaled_luma, motion_ratio
from cv_assets.video.paths import validate_clip_path
from cv_assets.video.sampler import (
    ClipProbe,
    SampledFrame,
    SamplingResult,
    clip_file_sha256,
    detect_motion_deltas,
    frame_content_hash,
    sample_video_frames,
)
from cv_assets.video.selection import FramePick, KeyFrameSelector, select_key_frames

__all__ = [
    "ClipProbe",
    "ExtractedFrame",
    "FramePick",
    "KeyFrameSelector",
    "SampledFrame",
    "SamplingResult",
    "VideoInputError",
    "clip_file_sha256",
    "detect_motion_deltas",
    "downscaled_luma",
    "extract_frame",
    "extract_frames",
    "frame_content_hash",
    "frame_file_name",
    "motion_ratio",
    "sample_video_frames",
    "select_key_frames",
    "validate_clip_path",
    "write_jpeg",
]
