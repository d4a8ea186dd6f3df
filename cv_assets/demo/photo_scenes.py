"""Box-quality test sets: real photographs composed into frame sequences with known
geometry, and the demo project's sampled frames, each with its reference images and
per-frame true boxes.

The real-photo set uses only photographs that packages ship in their wheels
(scikit-image's `data` module, matplotlib's sample data), so nothing is downloaded;
both packages are in the `test` extra and imported only here, when a set is built.
Each sequence pastes object photos onto a background photo, then moves a virtual
camera over the composite (pan and zoom): every frame's true box is the pasted
rectangle mapped through that frame's camera window. The reference of each asset is
the object photo itself, the way a user would upload it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from cv_assets.analysis.appearances import Box, FrameInput

FRAME_W, FRAME_H = 640, 360
# An object counts as visible in a frame when this share of its pasted area shows
# (the demo's ground truth uses the same rule).
MIN_VISIBLE = 0.3


@dataclass(frozen=True)
class BoxQualitySet:
    """Frames, reference images by asset code and `truth[(scene, frame)] = {code: box}`."""

    name: str
    frames: list[FrameInput]
    references: dict[str, np.ndarray]
    truth: dict[tuple[int, int], dict[str, Box]]


@dataclass(frozen=True)
class Paste:
    code: str
    box: Box  # where the object photo lands on the composite canvas (x1, y1, x2, y2)


@dataclass(frozen=True)
class CameraMove:
    """One background, the objects pasted on it and the camera path over it: the window
    (x, y, width) at the first and at the last frame, interpolated linearly."""

    background: str
    canvas: tuple[int, int]  # composite width, height
    pastes: tuple[Paste, ...]
    window_from: tuple[float, float, float]
    window_to: tuple[float, float, float]
    frames: int = 6


def _photos() -> dict[str, np.ndarray]:
    import skimage.data
    from matplotlib import cbook
    from PIL import Image

    with Image.open(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)) as img:
        hopper = np.asarray(img.convert("RGB"))
    return {
        "astronaut": skimage.data.astronaut(),
        "coffee": skimage.data.coffee(),
        "chelsea": skimage.data.chelsea(),
        "rocket": skimage.data.rocket(),
        "hopper": hopper,
        "hubble": skimage.data.hubble_deep_field(),
        "ihc": skimage.data.immunohistochemistry(),
    }


# Assets: the object photos a user uploads as references.
OBJECTS = {"CHAR_ASTRONAUT": "astronaut", "CHAR_HOPPER": "hopper", "PROP_CAT": "chelsea", "PROP_COFFEE": "coffee"}

# Objects of about a fifth to a half of the frame height, panned and zoomed over;
# some leave or enter the view, and each background also hosts frames without them.
SEQUENCES: tuple[CameraMove, ...] = (
    CameraMove("rocket", (960, 540), (Paste("CHAR_ASTRONAUT", (120, 160, 340, 380)), Paste("PROP_CAT", (600, 260, 840, 420))),
             window_from=(0, 0, 800), window_to=(240, 120, 640)),
    CameraMove("hubble", (960, 540), (Paste("CHAR_HOPPER", (380, 120, 560, 331)), Paste("PROP_COFFEE", (660, 300, 900, 460))),
             window_from=(100, 40, 720), window_to=(200, 100, 600)),
    CameraMove("ihc", (960, 540), (Paste("PROP_CAT", (200, 200, 380, 320)), Paste("CHAR_HOPPER", (640, 60, 800, 248))),
             window_from=(0, 60, 640), window_to=(320, 120, 640)),
    CameraMove("rocket", (960, 540), (Paste("PROP_COFFEE", (180, 240, 420, 400)),),
             window_from=(60, 40, 700), window_to=(0, 100, 560)),
    CameraMove("hubble", (960, 540), (Paste("CHAR_ASTRONAUT", (540, 140, 800, 400)),),
             window_from=(0, 0, 960), window_to=(360, 90, 600)),
)


def _fit(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Cover `size` (w, h) with the image: scale to fill, centre-crop the overflow."""
    w, h = size
    scale = max(w / image.shape[1], h / image.shape[0])
    resized = cv2.resize(image, (max(w, round(image.shape[1] * scale)), max(h, round(image.shape[0] * scale))),
                         interpolation=cv2.INTER_AREA)
    y0, x0 = (resized.shape[0] - h) // 2, (resized.shape[1] - w) // 2
    return resized[y0:y0 + h, x0:x0 + w]


def _composite(seq: CameraMove, photos: dict[str, np.ndarray]) -> np.ndarray:
    canvas = _fit(photos[seq.background], seq.canvas).copy()
    for paste in seq.pastes:
        x1, y1, x2, y2 = paste.box
        canvas[y1:y2, x1:x2] = cv2.resize(photos[OBJECTS[paste.code]], (x2 - x1, y2 - y1), interpolation=cv2.INTER_AREA)
    return canvas


def _window(seq: CameraMove, t: float) -> tuple[float, float, float]:
    return tuple(a + (b - a) * t for a, b in zip(seq.window_from, seq.window_to))  # type: ignore[return-value]


def _true_box(paste: Paste, window: tuple[float, float, float]) -> Box | None:
    """The pasted rectangle in frame pixels, clipped to the frame; None when too little shows."""
    x, y, width = window
    s = FRAME_W / width
    x1, y1, x2, y2 = ((paste.box[0] - x) * s, (paste.box[1] - y) * s, (paste.box[2] - x) * s, (paste.box[3] - y) * s)
    cx1, cy1, cx2, cy2 = max(0.0, x1), max(0.0, y1), min(FRAME_W, x2), min(FRAME_H, y2)
    if cx2 <= cx1 or cy2 <= cy1 or (cx2 - cx1) * (cy2 - cy1) < MIN_VISIBLE * (x2 - x1) * (y2 - y1):
        return None
    return int(round(cx1)), int(round(cy1)), int(round(cx2)), int(round(cy2))


def real_photo_set() -> BoxQualitySet:
    """Five short camera moves over composites of packaged photographs (see module doc)."""
    photos = _photos()
    frames: list[FrameInput] = []
    truth: dict[tuple[int, int], dict[str, Box]] = {}
    for scene, seq in enumerate(SEQUENCES):
        canvas = _composite(seq, photos)
        for i in range(seq.frames):
            window = _window(seq, i / max(1, seq.frames - 1))
            x, y, width = window
            height = width * FRAME_H / FRAME_W
            view = canvas[int(round(y)):int(round(y + height)), int(round(x)):int(round(x + width))]
            image = cv2.resize(view, (FRAME_W, FRAME_H), interpolation=cv2.INTER_AREA)
            frames.append(FrameInput(scene, i, i / 24.0, np.ascontiguousarray(image)))
            boxes = {p.code: _true_box(p, window) for p in seq.pastes}
            truth[(scene, i)] = {code: box for code, box in boxes.items() if box is not None}
    references = {code: photos[name] for code, name in OBJECTS.items()}
    return BoxQualitySet("real_photos", frames, references, truth)


def demo_set(root: Path, scene_seconds: float = 3.0) -> BoxQualitySet:
    """The demo project written under `root`, its clips sampled as the pipeline samples
    them (`sample_video_frames` with default settings), its references and ground truth."""
    from cv_assets.analysis.ground_truth import load_ground_truth
    from cv_assets.demo import write_demo_data
    from cv_assets.demo.events import MIN_EVENTS
    from cv_assets.embedding.images import load_image
    from cv_assets.manifest import load_manifest
    from cv_assets.settings import CvAnalysisSettings, SamplingSettings
    from cv_assets.video import sample_video_frames

    summary = write_demo_data(Path(root), scene_seconds=scene_seconds, n_events=MIN_EVENTS)
    manifest = load_manifest(summary.project_dir)
    frames: list[FrameInput] = []
    for scene in manifest.spec.scenes:
        result = sample_video_frames(manifest.clip_path(scene), SamplingSettings(), CvAnalysisSettings(),
                                     project_root=summary.project_dir)
        frames += [FrameInput(scene.index, f.frame_index, f.timestamp_sec, f.image) for f in result.frames]
    references = {a.code: load_image(manifest.reference_path(a)) for a in manifest.spec.assets}
    truth = load_ground_truth(summary.ground_truth_path)
    return BoxQualitySet("demo", frames, references, truth)


@dataclass(frozen=True)
class SetQuality:
    """Per-asset scores of one search over one set, the micro averages and the cost."""

    scores: dict  # code -> AssetScore
    forwards_per_frame: float

    @property
    def precision(self) -> float:
        predicted = sum(s.predicted for s in self.scores.values())
        return sum(s.true_positives for s in self.scores.values()) / predicted if predicted else 0.0

    @property
    def recall(self) -> float:
        actual = sum(s.actual for s in self.scores.values())
        return sum(s.true_positives for s in self.scores.values()) / actual if actual else 0.0

    @property
    def mean_iou(self) -> float:
        """Mean over the assets that were predicted where visible (each asset counts once)."""
        values = [s.mean_iou for s in self.scores.values() if s.mean_iou is not None]
        return sum(values) / len(values) if values else 0.0


def evaluate_set(quality_set: BoxQualitySet, embedder, search, min_iou: float) -> SetQuality:
    """Run `match_frames` over the set's frames with `embedder` and score it per asset."""
    from cv_assets.analysis.appearances import ReferenceAsset, evaluate_against_truth, match_frames

    codes = list(quality_set.references)
    vectors = embedder.embed_images([quality_set.references[c] for c in codes])
    references = [ReferenceAsset(i, code, vectors[i]) for i, code in enumerate(codes)]
    outcome = match_frames(quality_set.frames, references, embedder.embed_images, search)
    keys = [(f.scene_index, f.frame_index) for f in quality_set.frames]
    scores = evaluate_against_truth(outcome.appearances, quality_set.truth, keys, codes, min_iou)
    return SetQuality(scores, outcome.forwards_per_frame)
