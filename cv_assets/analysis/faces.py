"""Face backends for `face_match`: find faces, describe each as a vector, decide whether two match.

Two backends implement `FaceBackend`:

- `DlibFaceBackend` (the `faces` extra: `pip install '.[faces]'`): dlib's HOG frontal face
  detector, its 5-point landmark model for alignment and its ResNet 128-d face descriptor,
  with the pretrained files that the `face-recognition-models` package ships. Two faces are
  the same person when the Euclidean distance between their descriptors is at most the
  threshold (0.6, dlib's own rule and the seed's `face_match_threshold`).
- `YuNetFaceBackend`: OpenCV's YuNet detector and SFace recogniser, from .onnx files the user
  configures. A match is a cosine similarity of at least the threshold.

Both report a `distance` (smaller is more alike) so one matching rule serves both: each face
goes to its nearest reference face, and counts when `backend.matches(distance)`.
No Dagster, no store: the backends take RGB arrays and return boxes and vectors.
"""

from __future__ import annotations

import functools
import importlib.util
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import cv2
import numpy as np

Box = tuple[int, int, int, int]  # x1, y1, x2, y2 in pixels, exclusive end

INSTALL_HINT = "install the faces extra: pip install '.[faces]'"
DLIB_MODEL_FILES = {
    "landmarks": "shape_predictor_5_face_landmarks.dat",
    "descriptor": "dlib_face_recognition_resnet_model_v1.dat",
}
# HOG cost grows with the pixel count: larger images are scaled down to this longer side
# before detection (a face then needs ~40 px here, ~60 px in a 1080p frame).
DLIB_MAX_DETECT_SIDE = 1280


@dataclass(frozen=True)
class Face:
    """One detected face: its box in the image, the detector's score, and the backend's own
    detection record (needed to align the face for its descriptor)."""

    box: Box
    score: float
    raw: Any = None


class FaceBackend(ABC):
    """Detect faces -> boxes, describe a face -> vector, and the match rule."""

    name: str
    threshold: float

    @abstractmethod
    def detect(self, image: np.ndarray) -> list[Face]:
        """Faces in an RGB uint8 image, boxes clipped to the image."""

    @abstractmethod
    def descriptor(self, image: np.ndarray, face: Face) -> np.ndarray:
        """The face's identity vector (float32)."""

    @abstractmethod
    def distance(self, a: np.ndarray, b: np.ndarray) -> float:
        """How unlike two descriptors are (smaller is more alike)."""

    @abstractmethod
    def matches(self, distance: float) -> bool:
        """Whether two faces at this distance are the same person."""

    @abstractmethod
    def confidence(self, distance: float) -> float:
        """A match's confidence in 0..1."""

    @abstractmethod
    def model_files(self) -> dict[str, str]:
        """Role -> model file, for metadata."""

    @abstractmethod
    def rule(self) -> str:
        """The match rule in words."""

    def describe(self) -> str:
        files = ", ".join(f"{role} {Path(path).name}" for role, path in self.model_files().items())
        return f"backend {self.name} ({files}); match: {self.rule()}"

    def faces(self, image: np.ndarray) -> list[tuple[Face, np.ndarray]]:
        """Every face in the image with its descriptor."""
        image = as_rgb(image)
        return [(face, self.descriptor(image, face)) for face in self.detect(image)]


def as_rgb(image: np.ndarray) -> np.ndarray:
    """A contiguous RGB uint8 view of a grey, RGB or RGBA image (detectors take nothing else)."""
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    elif image.shape[2] == 4:
        image = image[:, :, :3]
    return np.ascontiguousarray(image, dtype=np.uint8)


def _clip_box(x1: float, y1: float, x2: float, y2: float, width: int, height: int) -> Box | None:
    box = (max(0, int(round(x1))), max(0, int(round(y1))), min(width, int(round(x2))), min(height, int(round(y2))))
    return box if box[2] > box[0] and box[3] > box[1] else None


# ---------------------------------------------------------------------------- dlib


def dlib_models_dir() -> Path | None:
    """The `face_recognition_models` package's model folder, found without importing the
    package (its __init__ needs pkg_resources, which recent setuptools no longer ships)."""
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]) / "models"


def dlib_problem() -> str | None:
    """Why the dlib backend cannot run here, or None when it can."""
    if importlib.util.find_spec("dlib") is None:
        return f"dlib is not installed ({INSTALL_HINT})"
    try:
        import dlib  # noqa: F401  (a wheel built for another platform fails here, not mid-run)
    except (ImportError, OSError) as exc:
        return f"dlib does not load: {exc}"
    models = dlib_models_dir()
    if models is None:
        return f"the face-recognition-models package is not installed ({INSTALL_HINT})"
    absent = [name for name in DLIB_MODEL_FILES.values() if not (models / name).is_file()]
    return f"dlib model file(s) missing in {models}: {', '.join(absent)}" if absent else None


@functools.lru_cache(maxsize=1)
def _hog_detector() -> Any:
    """dlib's frontal face detector, kept per process: building it takes 2+ s (it
    deserialises its HOG filters) and it holds no state between calls."""
    import dlib

    return dlib.get_frontal_face_detector()


@functools.lru_cache(maxsize=2)
def _dlib_models(landmarks: str, descriptor: str) -> tuple[Any, Any]:
    """The landmark and descriptor models, kept per process like the detector."""
    import dlib

    loaded = []
    for load, path in ((dlib.shape_predictor, landmarks), (dlib.face_recognition_model_v1, descriptor)):
        try:
            loaded.append(load(path))
        except RuntimeError as exc:
            raise RuntimeError(f"cannot load dlib model file {path}: {exc}") from None
    return loaded[0], loaded[1]


class DlibFaceBackend(FaceBackend):
    """dlib HOG detector + 5-point alignment + ResNet 128-d descriptor.

    Confidence = max(0, 1 - distance / (2 * threshold)): 1.0 for identical descriptors,
    0.5 exactly at the match threshold (a coin flip by dlib's own rule), 0 at twice it.
    So every match has a confidence in 0.5..1.
    """

    name = "dlib"

    def __init__(self, threshold: float = 0.6, models_dir: Path | None = None, upsample: int = 1,
                 max_side: int = DLIB_MAX_DETECT_SIDE):
        import dlib

        self.threshold = float(threshold)
        self.upsample = upsample
        self.max_side = max_side
        models = Path(models_dir) if models_dir is not None else dlib_models_dir()
        if models is None:
            raise RuntimeError(f"the face-recognition-models package is not installed ({INSTALL_HINT})")
        self.files = {role: str(models / name) for role, name in DLIB_MODEL_FILES.items()}
        self._landmarks, self._encoder = _dlib_models(self.files["landmarks"], self.files["descriptor"])
        self._detector = _hog_detector()
        self._dlib = dlib

    def _scaled(self, image: np.ndarray) -> tuple[np.ndarray, float]:
        """The image the detector sees (at most `max_side` long) and its scale."""
        height, width = image.shape[:2]
        scale = min(1.0, self.max_side / max(height, width))
        if scale == 1.0:
            return np.ascontiguousarray(image), 1.0
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        return np.ascontiguousarray(cv2.resize(image, size, interpolation=cv2.INTER_AREA)), scale

    def _detect_scaled(self, small: np.ndarray, scale: float, width: int, height: int) -> list[Face]:
        rects, scores, _ = self._detector.run(small, self.upsample, 0.0)
        found = []
        for rect, score in zip(rects, scores):
            # dlib's right and bottom are inclusive
            box = _clip_box(rect.left() / scale, rect.top() / scale, (rect.right() + 1) / scale,
                            (rect.bottom() + 1) / scale, width, height)
            if box is not None:
                found.append(Face(box, float(score), rect))
        return found

    def _describe_scaled(self, small: np.ndarray, face: Face) -> np.ndarray:
        # Landmarks and the 150 px aligned chip need no more pixels than the detector saw.
        shape = self._landmarks(small, face.raw)
        return np.asarray(self._encoder.compute_face_descriptor(small, shape, 0), dtype=np.float32)

    def detect(self, image):
        image = as_rgb(image)
        small, scale = self._scaled(image)
        return self._detect_scaled(small, scale, image.shape[1], image.shape[0])

    def descriptor(self, image, face):
        return self._describe_scaled(self._scaled(as_rgb(image))[0], face)

    def faces(self, image):
        image = as_rgb(image)
        small, scale = self._scaled(image)  # one downscale for detection and every descriptor
        return [(face, self._describe_scaled(small, face))
                for face in self._detect_scaled(small, scale, image.shape[1], image.shape[0])]

    def distance(self, a, b):
        return float(np.linalg.norm(np.asarray(a, np.float32) - np.asarray(b, np.float32)))

    def matches(self, distance):
        return distance <= self.threshold

    def confidence(self, distance):
        return float(min(1.0, max(0.0, 1.0 - distance / (2.0 * self.threshold))))

    def model_files(self):
        return dict(self.files)  # the HOG detector is built into dlib

    def rule(self):
        return f"Euclidean distance <= {self.threshold:g}"

    def describe(self):
        return (f"backend dlib {self._dlib.__version__} (HOG detector, upsample {self.upsample}; "
                f"landmarks {Path(self.files['landmarks']).name}, descriptor {Path(self.files['descriptor']).name}); "
                f"match: {self.rule()}")


# ---------------------------------------------------------------------------- YuNet / SFace


class YuNetFaceBackend(FaceBackend):
    """OpenCV YuNet detector + SFace recogniser from configured .onnx files.

    distance = 1 - cosine similarity; a match is cosine >= threshold; confidence = the cosine
    (clipped to 0..1).
    """

    name = "yunet"

    def __init__(self, detector_model: Path, recognizer_model: Path, threshold: float = 0.6):
        self.threshold = float(threshold)
        self.files = {"detector": str(detector_model), "recognizer": str(recognizer_model)}
        self._detector = cv2.FaceDetectorYN.create(str(detector_model), "", (320, 320))
        self._recognizer = cv2.FaceRecognizerSF.create(str(recognizer_model), "")

    def detect(self, image):
        bgr = cv2.cvtColor(as_rgb(image), cv2.COLOR_RGB2BGR)
        height, width = bgr.shape[:2]
        self._detector.setInputSize((width, height))
        _, detected = self._detector.detect(bgr)
        found = []
        for row in detected if detected is not None else []:
            x, y, w, h = (float(v) for v in row[:4])
            box = _clip_box(x, y, x + w, y + h, width, height)
            if box is not None:
                found.append(Face(box, float(row[-1]), row))
        return found

    def descriptor(self, image, face):
        bgr = cv2.cvtColor(as_rgb(image), cv2.COLOR_RGB2BGR)
        feature = self._recognizer.feature(self._recognizer.alignCrop(bgr, face.raw)).ravel().astype(np.float32)
        return feature / (np.linalg.norm(feature) or 1.0)

    def distance(self, a, b):
        return 1.0 - float(np.dot(a, b))

    def matches(self, distance):
        return 1.0 - distance >= self.threshold

    def confidence(self, distance):
        return float(min(1.0, max(0.0, 1.0 - distance)))

    def model_files(self):
        return dict(self.files)

    def rule(self):
        return f"cosine similarity >= {self.threshold:g}"


# ---------------------------------------------------------------------------- matching


@dataclass(frozen=True)
class ReferenceFace:
    asset_id: int
    code: str
    descriptor: np.ndarray
    box: Box  # where the face is in the reference image


@dataclass(frozen=True)
class FaceMatch:
    asset_id: int
    code: str
    box: Box
    distance: float
    confidence: float


def reference_faces(backend: FaceBackend, images: Mapping[int, tuple[str, np.ndarray]]) -> list[ReferenceFace]:
    """The face of each reference image (the detector's most confident one); images with
    no face (props, locations) are left out."""
    out = []
    for asset_id, (code, image) in images.items():
        detected = backend.faces(image)
        if detected:
            face, vector = max(detected, key=lambda fv: fv[0].score)
            out.append(ReferenceFace(asset_id, code, vector, face.box))
    return out


def match_faces(backend: FaceBackend, image: np.ndarray, known: Sequence[ReferenceFace]) -> list[FaceMatch]:
    """The reference faces found in an image (no detection at all when none is known)."""
    return assign_faces(backend, backend.faces(image), known) if known else []


def assign_faces(backend: FaceBackend, described: Sequence[tuple[Face, np.ndarray]],
                 known: Sequence[ReferenceFace]) -> list[FaceMatch]:
    """Each described face goes to its nearest reference face and counts when the backend's
    rule says they match; at most one match per asset (its nearest face)."""
    best: dict[int, FaceMatch] = {}
    for face, vector in described if known else []:
        distances = [backend.distance(vector, ref.descriptor) for ref in known]
        k = int(np.argmin(distances))
        d = distances[k]
        if not backend.matches(d):
            continue
        ref = known[k]
        if ref.asset_id not in best or d < best[ref.asset_id].distance:
            best[ref.asset_id] = FaceMatch(ref.asset_id, ref.code, face.box, d, backend.confidence(d))
    return sorted(best.values(), key=lambda m: m.asset_id)
