"""The demo video project: reference images, scene clips, manifest and per-frame ground truth.

Four scenes script what the pipeline must find (motion is given in scene time u in
[0, 1], so a short version keeps every feature):

0. street    the Red runner walks in from the left and stops beside the Green crate.
1. alley     a fast chase while the camera pans along a brick wall (large motion);
             runner, walker and a bouncing Yellow ball cross the frame and leave it.
2. park/room a hard cut at 40%: park with the walker and the crate, then a dark room
             with the walker in close-up and the ball (the crate is gone).
3. dusk      the manifest expects the Blue walker, who never appears; the Yellow ball,
             not expected, bounces through for a moment; the runner leaves the frame.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import yaml
from PIL import Image

from cv_assets.demo.backgrounds import Tint, scene_background
from cv_assets.demo.sprites import DESIGNS, reference_image, render_sprite

PROJECT_KEY = "demo"
PROJECT_NAME = "Demo project"
WIDTH, HEIGHT = 640, 360
VISIBLE_FRACTION = 0.3  # an asset counts as visible when this share of its pixels shows
PAN_PX_PER_FRAME = 16  # the large-motion scene's camera pan speed
# Scene 2's cut falls between the sampler's fixed offsets (3.2 s of 8 s), so finding it
# takes motion detection rather than luck.
PARK_CUT = 0.4
# Fixed encoder settings: one thread makes libx264 output identical bytes on every run.
X264_OPTIONS = {"crf": "20", "preset": "veryfast", "threads": "1", "g": "48"}


@dataclass(frozen=True)
class Placement:
    """An asset in one frame: horizontal centre and bottom (feet) in frame pixels."""

    code: str
    cx: float
    bottom: float
    scale: float = 1.0
    pose: int = 0


@dataclass(frozen=True)
class Shot:
    background: str  # a key of BACKGROUNDS
    place: Callable[[float, int], list[Placement]]  # (scene time u, frame index) -> placements
    pan_px_per_frame: int = 0


@dataclass(frozen=True)
class SceneScript:
    title: str
    description: str
    expected_assets: tuple[str, ...]
    shots: tuple[Shot, ...]
    cut_at: float | None = None  # scene time of the hard cut between shot 0 and shot 1
    large_motion: bool = False


@dataclass(frozen=True)
class BackgroundSpec:
    kind: str
    seed: int
    tint: Tint
    brightness: float = 1.0


BACKGROUNDS: dict[str, BackgroundSpec] = {
    "street": BackgroundSpec("street", 11, (1.025, 1.0, 0.97)),
    "alley": BackgroundSpec("alley", 12, (1.02, 1.0, 0.97)),
    "park": BackgroundSpec("park", 13, (0.985, 1.015, 0.985)),
    "interior": BackgroundSpec("interior", 14, (1.015, 1.0, 0.975)),
    "dusk": BackgroundSpec("street", 15, (0.97, 0.99, 1.03), brightness=0.72),
}


def progress(u: float, start: float, end: float) -> float:
    """How far through [start, end] the scene time u is, clamped to [0, 1]."""
    return min(1.0, max(0.0, (u - start) / (end - start)))


def lerp(a: float, b: float, t: float) -> float:
    return a + (b - a) * t


def walking(u: float, start: float, end: float, frame: int, step_frames: int) -> int:
    """Striding pose that alternates while moving; standing still otherwise."""
    return (frame // step_frames) % 2 if start < u < end else 0


def bounce(t: float, bounces: int, height: float) -> float:
    return height * abs(math.sin(math.pi * bounces * t))


# --- the scenes --------------------------------------------------------------------------


def _street_arrival(u: float, i: int) -> list[Placement]:
    return [
        Placement("PROP_01", 470, 322),
        Placement("CHAR_01", lerp(-40, 300, progress(u, 0.0, 0.55)), 326, 1.0, walking(u, 0.0, 0.55, i, 4)),
    ]


def _alley_chase(u: float, i: int) -> list[Placement]:
    ball_t = progress(u, 0.1, 0.75)
    return [
        Placement("PROP_02", lerp(700, -60, ball_t), 330 - bounce(ball_t, 4, 110), 1.5),
        Placement("CHAR_02", lerp(-40, 700, progress(u, 0.25, 0.85)), 338, 1.0, walking(u, 0.25, 0.85, i, 3)),
        Placement("CHAR_01", lerp(-40, 700, progress(u, 0.0, 0.55)), 342, 1.05, walking(u, 0.0, 0.55, i, 2)),
    ]


def _park_before_cut(u: float, i: int) -> list[Placement]:
    t = progress(u, 0.0, PARK_CUT)
    return [
        Placement("PROP_01", 500, 332, 0.85),
        Placement("CHAR_02", lerp(110, 250, t), 334, 0.95, walking(u, 0.0, PARK_CUT, i, 5)),
    ]


def _room_after_cut(u: float, i: int) -> list[Placement]:
    return [
        Placement("PROP_02", lerp(120, 210, progress(u, PARK_CUT, 1.0)), 348, 1.5),
        Placement("CHAR_02", 470, 352, 1.12),
    ]


def _dusk_missing_walker(u: float, i: int) -> list[Placement]:
    placements = [Placement("PROP_01", 150, 330, 0.9)]
    ball_t = progress(u, 0.40, 0.62)
    if 0.0 < ball_t < 1.0:  # the unexpected ball only passes through
        placements.append(Placement("PROP_02", lerp(-60, 700, ball_t), 250 - bounce(ball_t, 2, 60), 1.4))
    placements.append(
        Placement("CHAR_01", lerp(420, 720, progress(u, 0.65, 0.95)), 334, 1.0, walking(u, 0.65, 0.95, i, 4))
    )
    return placements


SCENES: tuple[SceneScript, ...] = (
    SceneScript("Street arrival", "The Red runner walks in from the left and stops beside the Green crate.",
                ("CHAR_01", "PROP_01"), (Shot("street", _street_arrival),)),
    SceneScript("Alley chase", "Large motion: the camera pans fast along a brick wall while the runner, "
                "the walker and a bouncing ball race across the frame and leave it.",
                ("CHAR_01", "CHAR_02", "PROP_02"), (Shot("alley", _alley_chase, PAN_PX_PER_FRAME),),
                large_motion=True),
    SceneScript("Park, cut to room", "A hard cut: the walker and the crate in a park, then the walker "
                "in close-up in a dark room with the ball; the crate is gone.",
                ("CHAR_02", "PROP_01", "PROP_02"),
                (Shot("park", _park_before_cut), Shot("interior", _room_after_cut)), cut_at=PARK_CUT),
    SceneScript("Dusk, walker missing", "Continuity problems: the Blue walker is expected but never appears; "
                "the Yellow ball, not expected, bounces through; the runner leaves the frame.",
                ("CHAR_01", "CHAR_02", "PROP_01"), (Shot("dusk", _dusk_missing_walker),)),
)


# --- rendering ---------------------------------------------------------------------------


@dataclass(frozen=True)
class SceneTruth:
    index: int
    n_frames: int
    cuts: list[int]
    frames: list[list[dict]]  # per frame: visible assets with code, bbox, visible_fraction


def _background_for(shot: Shot, n_frames: int) -> np.ndarray:
    spec = BACKGROUNDS[shot.background]
    width = WIDTH + shot.pan_px_per_frame * max(0, n_frames - 1)
    return scene_background(spec.kind, spec.seed, width, HEIGHT, spec.tint, spec.brightness)


Box = tuple[int, int, int, int]


def _composite(frame: np.ndarray, labels: np.ndarray, placement: Placement, label: int) -> tuple[int, Box]:
    """Draw one asset; returns its total pixel count and its box clipped to the frame."""
    rgb, mask = render_sprite(placement.code, round(placement.scale, 3), placement.pose)
    h, w = mask.shape
    x0 = int(round(placement.cx - w / 2))
    y0 = int(round(placement.bottom - h))
    fx1, fy1 = max(0, x0), max(0, y0)
    fx2, fy2 = min(frame.shape[1], x0 + w), min(frame.shape[0], y0 + h)
    if fx1 < fx2 and fy1 < fy2:
        sub_mask = mask[fy1 - y0:fy2 - y0, fx1 - x0:fx2 - x0]
        frame[fy1:fy2, fx1:fx2][sub_mask] = rgb[fy1 - y0:fy2 - y0, fx1 - x0:fx2 - x0][sub_mask]
        labels[fy1:fy2, fx1:fx2][sub_mask] = label
    return int(mask.sum()), (fx1, fy1, fx2, fy2)


def render_frame(background: np.ndarray, pan_x: int, placements: list[Placement]) -> tuple[np.ndarray, list[dict]]:
    """One RGB frame and the assets visible in it (occlusion by later assets counted)."""
    frame = background[:, pan_x:pan_x + WIDTH].copy()
    labels = np.zeros((HEIGHT, WIDTH), dtype=np.uint8)
    drawn = [_composite(frame, labels, p, label) for label, p in enumerate(placements, start=1)]
    shown = np.bincount(labels.ravel(), minlength=len(placements) + 1)
    visible = []
    for label, (placement, (total, box)) in enumerate(zip(placements, drawn), start=1):
        fraction = shown[label] / total
        if fraction >= VISIBLE_FRACTION:
            visible.append({"code": placement.code, "bbox": list(box), "visible_fraction": round(float(fraction), 3)})
    return frame, visible


def scene_frames(script: SceneScript, n_frames: int):
    """Yield (frame RGB, visible assets) for every frame of a scene."""
    cut = cut_frame(script, n_frames)
    backgrounds = [_background_for(shot, n_frames) for shot in script.shots]
    for i in range(n_frames):
        u = i / max(1, n_frames - 1)
        shot_index = 1 if cut is not None and i >= cut else 0
        shot = script.shots[shot_index]
        yield render_frame(backgrounds[shot_index], shot.pan_px_per_frame * i, shot.place(u, i))


def cut_frame(script: SceneScript, n_frames: int) -> int | None:
    return None if script.cut_at is None else int(round(script.cut_at * n_frames))


def encode_clip(path: Path, frames, fps: int) -> int:
    """H.264 (libx264, yuv420p) MP4 with fixed settings; returns the number of frames."""
    path.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=fps, options=dict(X264_OPTIONS))
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        stream.time_base = Fraction(1, fps)
        for image in frames:
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts = count
            container.mux(stream.encode(frame))
            count += 1
        container.mux(stream.encode(None))
    return count


# --- writing the project -----------------------------------------------------------------


@dataclass(frozen=True)
class ProjectOutput:
    project_dir: Path
    manifest_path: Path
    ground_truth_path: Path
    clip_paths: tuple[Path, ...]
    reference_paths: tuple[Path, ...]
    frames: int


def write_reference_images(project_dir: Path) -> list[Path]:
    paths = []
    for code in DESIGNS:
        path = project_dir / "refs" / f"{code}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(reference_image(code)).save(path, format="PNG", optimize=False, compress_level=6)
        paths.append(path)
    return paths


def clip_relpath(index: int) -> str:
    return f"clips/scene_{index:02d}.mp4"


def manifest_text() -> str:
    data = {
        "project": PROJECT_KEY,
        "name": PROJECT_NAME,
        "ground_truth": "ground_truth.json",
        "assets": [
            {"code": d.code, "kind": d.kind, "name": d.name, "reference_image": f"refs/{d.code}.png"}
            for d in DESIGNS.values()
        ],
        "scenes": [
            {"index": i, "clip": clip_relpath(i), "expected_assets": list(s.expected_assets)}
            for i, s in enumerate(SCENES)
        ],
    }
    header = "# Demo project written by `cv-assets demo-data`; ground truth in ground_truth.json.\n"
    notes = "".join(f"#   scene {i}: {s.title}. {s.description}\n" for i, s in enumerate(SCENES))
    return header + notes + yaml.safe_dump(data, sort_keys=False, default_flow_style=None, width=120)


def scene_truth_json(index: int, script: SceneScript, truth: SceneTruth) -> dict:
    present = sorted({a["code"] for frame in truth.frames for a in frame})
    return {
        "title": script.title,
        "description": script.description,
        "clip": clip_relpath(index),
        "n_frames": truth.n_frames,
        "expected_assets": list(script.expected_assets),
        "present_assets": present,
        "missing_expected": [c for c in script.expected_assets if c not in present],
        "unexpected": [c for c in present if c not in script.expected_assets],
        "large_motion": script.large_motion,
        "cuts": truth.cuts,
        "frames": {str(i): assets for i, assets in enumerate(truth.frames)},
    }


def write_project(projects_root: Path, n_frames: int, fps: int) -> ProjectOutput:
    """Write `<projects_root>/demo/`: project.yaml, refs/, clips/ and ground_truth.json."""
    project_dir = projects_root / PROJECT_KEY
    references = write_reference_images(project_dir)
    manifest_path = project_dir / "project.yaml"
    manifest_path.write_text(manifest_text())
    clips, scenes = [], {}
    for index, script in enumerate(SCENES):
        per_frame: list[list[dict]] = []

        def frames_with_truth(script=script, per_frame=per_frame):
            for image, visible in scene_frames(script, n_frames):
                per_frame.append(visible)
                yield image

        path = project_dir / clip_relpath(index)
        encode_clip(path, frames_with_truth(), fps)
        cut = cut_frame(script, n_frames)
        truth = SceneTruth(index, n_frames, [] if cut is None else [cut], per_frame)
        scenes[str(index)] = scene_truth_json(index, script, truth)
        clips.append(path)
    ground_truth = {
        "fps": fps,
        "width": WIDTH,
        "height": HEIGHT,
        "bbox_format": "x1, y1, x2, y2 in pixels, exclusive end, clipped to the frame",
        "visible_fraction_min": VISIBLE_FRACTION,
        "assets": {d.code: {"name": d.name, "kind": d.kind} for d in DESIGNS.values()},
        "scenes": scenes,
    }
    truth_path = project_dir / "ground_truth.json"
    truth_path.write_text(json.dumps(ground_truth, separators=(",", ":")) + "\n")
    frames = n_frames * len(SCENES)
    return ProjectOutput(project_dir, manifest_path, truth_path, tuple(clips), tuple(references), frames)
