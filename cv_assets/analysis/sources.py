"""Appearance sources behind one interface, the way PySceneDetect's detectors share one.

Each source has a `name` (the `source` column of an appearance), says whether it is
`enabled` and, if not, why (`disabled_reason`), and finds appearances with
`find(frames, references)`. `clip_match` (region matching by embedding) is always on;
`face_match` runs with dlib when the faces extra is installed, or with OpenCV YuNet + SFace
when their model files are configured (`analysis.faces`); `yolo` (ultralytics) runs when its
weights are configured. The asset iterates over `build_sources(...)` and knows none of them.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol, Sequence

import numpy as np

from cv_assets.analysis import faces
from cv_assets.analysis.appearances import Appearance, FrameInput, ReferenceAsset, RegionSearch, match_frames
from cv_assets.settings import AppearanceSettings, CvAnalysisSettings

EmbedImages = Callable[[list[np.ndarray]], np.ndarray]


class AppearanceSource(Protocol):
    name: str

    @property
    def enabled(self) -> bool: ...

    @property
    def disabled_reason(self) -> str | None: ...

    def describe(self) -> str: ...

    def find(self, frames: Sequence[FrameInput], references: Sequence[ReferenceAsset]) -> list[Appearance]: ...


@dataclass
class _Source:
    """Shared bookkeeping: enabled unless a reason says otherwise, and a one-line summary."""

    disabled_reason: str | None = None
    found: int = field(default=0, init=False)

    @property
    def enabled(self) -> bool:
        return self.disabled_reason is None

    def describe(self) -> str:
        if not self.enabled:
            return f"disabled: {self.disabled_reason}"
        return f"enabled, {self.found} appearance(s)" + (f": {self.detail()}" if self.detail() else "")

    def detail(self) -> str:
        return ""


@dataclass
class ClipMatchSource(_Source):
    """Whole frame plus crops (coarse to fine, or the exhaustive grid), embedded and compared
    with each reference vector; each match's box is fitted to the object."""

    embed_images: EmbedImages | None = None
    search: RegionSearch = field(default_factory=lambda: RegionSearch(threshold=0.65))
    name: str = "clip_match"
    regions_embedded: int = field(default=0, init=False)
    regions_reused: int = field(default=0, init=False)
    frames_searched: int = field(default=0, init=False)

    @property
    def threshold(self) -> float:
        return self.search.threshold

    @property
    def forwards_per_frame(self) -> float:
        """Crops embedded per frame (the whole frame counts as one): the cost that matters."""
        return self.regions_embedded / self.frames_searched if self.frames_searched else 0.0

    def find(self, frames, references):
        outcome = match_frames(frames, references, self.embed_images, self.search)
        self.regions_embedded, self.frames_searched = outcome.forwards, outcome.frames
        self.regions_reused = outcome.reused
        self.found = len(outcome.appearances)
        return outcome.appearances

    def detail(self) -> str:
        mode = "coarse to fine" if self.search.coarse_to_fine else "exhaustive grid"
        return (f"threshold {self.threshold}, {mode}, {self.regions_embedded} regions embedded "
                f"({self.forwards_per_frame:.1f} per frame), {self.regions_reused} unchanged since the "
                f"previous frame reused")


def missing_model_files(paths: dict[str, Path | None]) -> str | None:
    """Why model files named by config keys cannot be used, or None."""
    unset = [k for k, p in paths.items() if p is None]
    if unset:
        return f"not configured (set appearances.{' and appearances.'.join(unset)})"
    absent = [f"{k}={p}" for k, p in paths.items() if not Path(p).is_file()]
    return f"model file not found: {', '.join(absent)}" if absent else None


def choose_face_backend(choice: str, detector_model: Path | None, recognizer_model: Path | None,
                        dlib_problem: Callable[[], str | None] = faces.dlib_problem) -> tuple[str | None, str | None]:
    """(backend name, None) for the face backend that `appearances.face_backend` selects here,
    or (None, why face_match is off). `dlib_problem` says why dlib cannot run (None: it can)."""
    yunet_files = {"face_detector_model": detector_model, "face_recognizer_model": recognizer_model}
    if choice == "dlib":
        problem = dlib_problem()
        return ("dlib", None) if problem is None else (None, f"face_backend dlib: {problem}")
    if choice == "yunet":
        problem = missing_model_files(yunet_files)
        return ("yunet", None) if problem is None else (None, f"face_backend yunet: {problem}")
    if dlib_problem() is None:
        return "dlib", None
    if all(p is None for p in yunet_files.values()):
        return None, f"{faces.INSTALL_HINT} (or configure YuNet/SFace: appearances.face_detector_model and face_recognizer_model)"
    problem = missing_model_files(yunet_files)
    return ("yunet", None) if problem is None else (None, f"dlib not installed ({faces.INSTALL_HINT}); YuNet {problem}")


@dataclass
class FaceMatchSource(_Source):
    """Faces found and described by the configured backend (`analysis.faces`: dlib from the
    faces extra, or YuNet + SFace), each matched to the nearest reference face by the
    backend's rule. `reference_images` maps asset id -> (code, RGB image); a reference
    image without a face (a prop, a location) is never matched."""

    backend: str = "auto"
    detector_model: Path | None = None
    recognizer_model: Path | None = None
    threshold: float = 0.6
    reference_images: dict[int, tuple[str, np.ndarray]] = field(default_factory=dict)
    dlib_problem: Callable[[], str | None] = faces.dlib_problem
    name: str = "face_match"
    backend_name: str | None = field(default=None, init=False)
    backend_description: str | None = field(default=None, init=False)
    reference_faces: int = field(default=0, init=False)

    def __post_init__(self):
        if self.disabled_reason is None:
            self.backend_name, self.disabled_reason = choose_face_backend(
                self.backend, self.detector_model, self.recognizer_model, self.dlib_problem)

    def make_backend(self) -> faces.FaceBackend:
        if self.backend_name == "dlib":
            return faces.DlibFaceBackend(threshold=self.threshold)
        return faces.YuNetFaceBackend(self.detector_model, self.recognizer_model, threshold=self.threshold)

    def find(self, frames, references):
        if not self.enabled:
            return []
        backend = self.make_backend()
        self.backend_description = backend.describe()
        known = faces.reference_faces(backend, self.reference_images)
        self.reference_faces = len(known)
        found = [Appearance(m.asset_id, m.code, frame.scene_index, frame.frame_index, frame.timestamp_sec, m.box,
                            m.confidence, source=self.name)
                 for frame in (frames if known else []) for m in faces.match_faces(backend, frame.image, known)]
        self.found = len(found)
        return found

    def detail(self) -> str:
        backend = self.backend_description or f"backend {self.backend_name}"
        return f"{backend}; {self.reference_faces} of {len(self.reference_images)} reference image(s) with a face"


@dataclass
class YoloSource(_Source):
    """Boxes from an ultralytics YOLO model, each matched to the most similar asset by embedding."""

    weights: Path | None = None
    embed_images: EmbedImages | None = None
    threshold: float = 0.65
    name: str = "yolo"

    def __post_init__(self):
        if self.disabled_reason is None and importlib.util.find_spec("ultralytics") is None:
            self.disabled_reason = "the ultralytics package is not installed"
        self.disabled_reason = self.disabled_reason or missing_model_files({"yolo_weights": self.weights})

    def find(self, frames, references):
        if not self.enabled or not references:
            return []
        from ultralytics import YOLO

        model = YOLO(str(self.weights))
        ref_matrix = np.stack([r.vector for r in references])
        found = []
        for frame in frames:
            result = model(frame.image[:, :, ::-1], verbose=False)[0]
            boxes = [tuple(int(v) for v in b) for b in result.boxes.xyxy.cpu().numpy()]
            boxes = [b for b in boxes if b[2] > b[0] and b[3] > b[1]]
            if not boxes:
                continue
            similarity = self.embed_images([frame.image[y1:y2, x1:x2] for x1, y1, x2, y2 in boxes]) @ ref_matrix.T
            for box, row in zip(boxes, similarity):
                k = int(np.argmax(row))
                if row[k] >= self.threshold:
                    ref = references[k]
                    found.append(Appearance(ref.asset_id, ref.code, frame.scene_index, frame.frame_index,
                                            frame.timestamp_sec, box, float(row[k]), source=self.name))
        self.found = len(found)
        return found

    def detail(self) -> str:
        return f"weights {self.weights}"


def find_appearances(sources: Sequence[AppearanceSource], frames: Sequence[FrameInput],
                     references: Sequence[ReferenceAsset]) -> list[Appearance]:
    """Every enabled source's appearances, in source order."""
    return [a for source in sources if source.enabled for a in source.find(frames, references)]


def region_search(appearances: AppearanceSettings, threshold: float) -> RegionSearch:
    """The clip_match search the `appearances` settings describe, at the embedder's threshold."""
    return RegionSearch(
        threshold=threshold, scales=tuple(appearances.region_scales), overlap=appearances.region_overlap,
        coarse_to_fine=appearances.coarse_to_fine, coarse_scales=tuple(appearances.coarse_scales),
        coarse_overlap=appearances.coarse_overlap, seed_margin=appearances.seed_margin,
        extent_reach=appearances.extent_reach, edge_reach=appearances.edge_reach, extent_steps=appearances.extent_steps,
        extent_rounds=appearances.extent_rounds,
        tie_margin=appearances.tie_margin, reuse_unchanged=appearances.reuse_unchanged_regions,
        track_found=appearances.track_found)


def build_sources(
    appearances: AppearanceSettings,
    cv: CvAnalysisSettings,
    embed_images: EmbedImages,
    embedder_family: str,
    reference_images: Callable[[], dict[int, tuple[str, np.ndarray]]],
) -> list[AppearanceSource]:
    """The configured sources, in the order their appearances are reported.
    `reference_images` is called only when face matching is configured (it decodes images)."""
    threshold = appearances.thresholds.get(embedder_family, cv.clip_similarity_threshold)
    face = FaceMatchSource(backend=appearances.face_backend, detector_model=appearances.face_detector_model,
                           recognizer_model=appearances.face_recognizer_model, threshold=cv.face_match_threshold)
    if face.enabled:
        face.reference_images = reference_images()
    return [
        ClipMatchSource(embed_images=embed_images, search=region_search(appearances, threshold)),
        face,
        YoloSource(weights=appearances.yolo_weights, embed_images=embed_images, threshold=threshold),
    ]
