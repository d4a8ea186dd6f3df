"""Synthetic clips and projects for the video tests (and any other test that needs a clip).

Clips are made with PyAV so their frame count, rate and motion are known exactly:
a clip shows one of two very different patterns, switching at the `cuts` frame
indices (each switch is a frame where nearly every pixel moves), or at every frame
with `all_motion=True`. Everything else is still.
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path
from typing import Iterable, Sequence

import av
import numpy as np

from cv_assets.store import AppDatabase
from cv_assets.store.models import Project, SceneManifest


def pattern(width: int, height: int, variant: int) -> np.ndarray:
    """A smooth RGB test image; variants 0 and 1 differ by far more than 30 luma levels everywhere."""
    yy, xx = np.mgrid[0:height, 0:width]
    ramp = (xx * 60 // max(width, 1) + yy * 40 // max(height, 1)).astype(np.uint8)
    level = np.uint8(30 if variant % 2 == 0 else 170)
    base = ramp + level
    return np.stack([base, base, base], axis=-1)


def write_clip(
    path: Path,
    *,
    width: int = 160,
    height: int = 90,
    fps: int = 25,
    n_frames: int = 50,
    codec: str = "libx264",
    pix_fmt: str = "yuv420p",
    cuts: Iterable[int] = (),
    all_motion: bool = False,
    pts_ms: Sequence[int] | None = None,
    faststart: bool = False,
) -> Path:
    """Encode a clip of `n_frames` frames; `pts_ms` gives explicit (variable-rate) timestamps in ms."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    cut_set = set(cuts)
    options = {"movflags": "faststart"} if faststart else {}
    with av.open(str(path), "w", options=options) as container:
        if pts_ms is None:
            stream = container.add_stream(codec, rate=fps)
        else:
            stream = container.add_stream(codec)
            stream.codec_context.time_base = Fraction(1, 1000)
            stream.time_base = Fraction(1, 1000)
        stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
        if codec == "libx264":
            stream.options = {"preset": "ultrafast"}
        images = [pattern(width, height, 0), pattern(width, height, 1)]
        variant = 0
        for index in range(n_frames):
            if all_motion and index > 0 or index in cut_set:
                variant ^= 1
            frame = av.VideoFrame.from_ndarray(images[variant], format="rgb24")
            if pts_ms is not None:
                frame.pts = int(pts_ms[index])
                frame.time_base = Fraction(1, 1000)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def truncate_copy(src: Path, dst: Path, keep_fraction: float) -> Path:
    """Copy the first `keep_fraction` of `src` (a download cut short)."""
    data = Path(src).read_bytes()
    Path(dst).write_bytes(data[: int(len(data) * keep_fraction)])
    return Path(dst)


def write_clip_without_decoder(path: Path) -> Path:
    """A valid Matroska file whose video track names a codec this FFmpeg build cannot decode.

    Made by encoding MPEG-4 into Matroska and renaming the track's CodecID
    (V_MPEG4/ISO/ASP) to an unknown one of the same length, so the container
    opens, the stream is there and has packets, but no decoder exists for it.
    """
    path = Path(path)
    tmp = path.with_suffix(".src.mkv")
    write_clip(tmp, codec="mpeg4", n_frames=10)
    data = tmp.read_bytes()
    assert data.count(b"V_MPEG4/ISO/ASP") == 1
    path.write_bytes(data.replace(b"V_MPEG4/ISO/ASP", b"V_NOSUCH/CODEC!"))
    tmp.unlink()
    return path


def register_project(db: AppDatabase, key: str, root: Path, clips: Sequence[Path | str]) -> int:
    """Insert a project and one scene per clip (scene_index = position); paths inside `root` are stored relative."""
    root = Path(root)
    with db.write() as session:
        project = Project(key=key, name=f"Project {key}", root_path=str(root))
        session.add(project)
        session.flush()
        for index, clip in enumerate(clips):
            clip_path = str(clip)
            if isinstance(clip, Path) and clip.is_absolute() and _is_inside(clip, root):
                clip_path = str(clip.relative_to(root))
            session.add(SceneManifest(project_id=project.id, scene_index=index, clip_path=clip_path))
        return project.id


def _is_inside(path: Path, root: Path) -> bool:
    try:
        path.relative_to(root)
        return True
    except ValueError:
        return False


def settings_yaml(tmp_path: Path, **sampling) -> Path:
    """A config file that keeps every store inside tmp_path; `sampling` overrides sampling keys."""
    lines = [
        "storage:",
        f"  sqlite_url: sqlite:///{tmp_path / 'app.sqlite'}",
        f"  duckdb_path: {tmp_path / 'warehouse.duckdb'}",
        f"  frames_dir: {tmp_path / 'frames'}",
        f"  reports_dir: {tmp_path / 'reports'}",
        f"  projects_root: {tmp_path / 'projects'}",
        f"  thumbnails_root: {tmp_path / 'thumbnails'}",
    ]
    if sampling:
        lines.append("sampling:")
        lines += [f"  {key}: {value}" for key, value in sampling.items()]
    path = tmp_path / "config.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def materialization(result, asset_name: str):
    """The (last) materialization of one asset in a run result, found by asset key, so a
    multi-asset step is handled like a single one."""
    found = [e.event_specific_data.materialization for e in result.get_asset_materialization_events()
             if e.event_specific_data.materialization.asset_key.path[-1] == asset_name]
    assert found, f"no materialization of {asset_name}"
    return found[-1]
