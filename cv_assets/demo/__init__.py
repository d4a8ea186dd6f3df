"""Deterministic demo data: a video project with ground truth and a security-event set.

`write_demo_data(root)` writes, with nothing downloaded and the same bytes every run:

    root/projects/demo/project.yaml          manifest (4 assets, 4 scenes)
    root/projects/demo/refs/<CODE>.png       reference images
    root/projects/demo/clips/scene_NN.mp4    H.264 clips, 640x360
    root/projects/demo/ground_truth.json     every frame's visible assets and boxes, cuts
    root/events/events.jsonl                 events in the import format
    root/events/events_truth.json            visitor of each event, corrupted ids
    root/thumbnails/<camera>/<id>.jpg        thumbnails given as files

With `root` = `data/`, these are the default `storage.projects_root` and
`storage.thumbnails_root`.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from cv_assets.demo.events import CAMERAS, MIN_EVENTS, EventsOutput, write_events
from cv_assets.demo.sprites import DESIGNS
from cv_assets.demo.video_project import PROJECT_KEY, SCENES, ProjectOutput, write_project

DEFAULT_SEED = 2026

__all__ = ["DemoSummary", "write_demo_data"]


@dataclass(frozen=True)
class DemoSummary:
    """What `write_demo_data` wrote: paths and counts. The project's and the events' own
    figures (`manifest_path`, `clip_paths`, `events`, `thumbnails_dir`, ...) read as the
    summary's attributes."""

    root: Path
    project: ProjectOutput
    event_set: EventsOutput
    scenes: int
    assets: int
    elapsed_sec: float

    def __getattr__(self, name: str):
        if name.startswith("__") or name in ("project", "event_set"):  # copy/pickle probes, unset fields
            raise AttributeError(name)
        for part in (self.project, self.event_set):
            if name in part.__dataclass_fields__:
                return getattr(part, name)
        raise AttributeError(f"{type(self).__name__!r} has no attribute {name!r}")

    def __str__(self) -> str:
        return (
            f"Demo data in {self.root} ({self.elapsed_sec:.1f} s)\n"
            f"  project '{PROJECT_KEY}': {self.manifest_path}\n"
            f"    {self.assets} assets, {self.scenes} scenes, {self.frames} frames; "
            f"ground truth {self.ground_truth_path.name}\n"
            f"  events: {self.events_path}\n"
            f"    {self.events} events on {self.cameras} cameras over {self.days} days; "
            f"{self.visitors} recurring visitors in {self.visitor_events} events; "
            f"{self.file_thumbnails} thumbnails as files under {self.thumbnails_dir}; "
            f"{self.corrupted} corrupted on purpose"
        )


def write_demo_data(
    root: Path,
    *,
    scene_seconds: float = 8.0,
    fps: int = 24,
    n_events: int = 240,
    seed: int = DEFAULT_SEED,
) -> DemoSummary:
    """Write the demo project and event set under `root`, replacing an earlier demo there.

    `scene_seconds`, `fps` and `n_events` shrink the data for tests; every scripted
    feature (the cut, the fast pan, the missing and the unexpected asset, the broken
    thumbnails) is kept at any size. The video is fully scripted; `seed` drives the
    events (who comes when, thumbnail spellings, noise).
    """
    n_frames = int(round(scene_seconds * fps))
    if not 1 <= fps <= 120:
        raise ValueError(f"fps must be between 1 and 120, got {fps}")
    if n_frames < 12:
        raise ValueError(f"scenes need at least 12 frames, got {scene_seconds} s at {fps} fps = {n_frames}")
    if n_events < MIN_EVENTS:
        raise ValueError(f"n_events must be at least {MIN_EVENTS} (five visitors, five corrupted), got {n_events}")
    started = time.perf_counter()
    root = Path(root)
    _remove_earlier_demo(root)
    project = write_project(root / "projects", n_frames, fps)
    events = write_events(root, n_events, seed)
    return DemoSummary(root, project, events, scenes=len(SCENES), assets=len(DESIGNS),
                       elapsed_sec=time.perf_counter() - started)


def _remove_earlier_demo(root: Path) -> None:
    """Only what the demo writes goes, so a smaller rerun leaves no stale clip or thumbnail
    behind while other projects and files under root stay."""
    shutil.rmtree(root / "projects" / PROJECT_KEY, ignore_errors=True)
    stale = [root / "events" / "events.jsonl", root / "events" / "events_truth.json"]
    stale += (root / "events").glob("evt-*.jpg")
    for camera in CAMERAS:
        stale += (root / "thumbnails" / camera).glob("evt-*.jpg")
    for path in stale:
        path.unlink(missing_ok=True)
