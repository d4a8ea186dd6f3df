"""Optional appearance sources beside clip_match: `face_match` (OpenCV YuNet + SFace) and
`yolo` (ultralytics). Each is enabled only when its model files are configured (and,
for yolo, the package is installed); otherwise it reports why it is disabled. Both
return the same `Appearance` records as clip_match.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import cv2
import numpy as np

from cv_assets.analysis.appearances import Appearance, FrameInput, ReferenceAsset


@dataclass
class PluginStatus:
    name: str
    enabled: bool
    detail: str
    appearances: list[Appearance] = field(default_factory=list)

    def summary(self) -> str:
        state = f"enabled, {len(self.appearances)} appearance(s)" if self.enabled else "disabled"
        return f"{state}: {self.detail}"


def _missing_files(paths: dict[str, Path | None]) -> str | None:
    unset = [k for k, p in paths.items() if p is None]
    if unset:
        return f"not configured (set appearances.{' and appearances.'.join(unset)})"
    absent = [f"{k}={p}" for k, p in paths.items() if not Path(p).is_file()]
    return f"model file not found: {', '.join(absent)}" if absent else None


def run_face_match(
    frames: Sequence[FrameInput],
    reference_images: dict[int, tuple[str, np.ndarray]],
    detector_model: Path | None,
    recognizer_model: Path | None,
    threshold: float,
) -> PluginStatus:
    """Detect faces with YuNet, embed them with SFace and match them to each asset's
    reference face (cosine >= `threshold`). `reference_images` maps asset id -> (code, RGB)."""
    problem = _missing_files({"face_detector_model": detector_model, "face_recognizer_model": recognizer_model})
    if problem:
        return PluginStatus("face_match", False, problem)
    detector = cv2.FaceDetectorYN.create(str(detector_model), "", (320, 320))
    recognizer = cv2.FaceRecognizerSF.create(str(recognizer_model), "")

    def faces(image_rgb: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
        bgr = cv2.cvtColor(image_rgb, cv2.COLOR_RGB2BGR)
        detector.setInputSize((bgr.shape[1], bgr.shape[0]))
        _, found = detector.detect(bgr)
        out = []
        for face in found if found is not None else []:
            feature = recognizer.feature(recognizer.alignCrop(bgr, face)).ravel()
            out.append((face, feature / (np.linalg.norm(feature) or 1.0)))
        return out

    references = {}
    for asset_id, (code, image) in reference_images.items():
        detected = faces(image)
        if detected:
            references[asset_id] = (code, max(detected, key=lambda f: f[0][-1])[1])
    status = PluginStatus("face_match", True, f"{len(references)} asset(s) with a reference face")
    for frame in frames:
        for face, feature in faces(frame.image):
            best = max(references.items(), key=lambda kv: float(feature @ kv[1][1]), default=None)
            if best is None:
                continue
            score = float(feature @ best[1][1])
            if score >= threshold:
                x, y, w, h = (int(v) for v in face[:4])
                status.appearances.append(
                    Appearance(best[0], best[1][0], frame.scene_index, frame.frame_index, frame.timestamp_sec,
                               (max(0, x), max(0, y), x + w, y + h), score, source="face_match")
                )
    return status


def run_yolo(
    frames: Sequence[FrameInput],
    references: Sequence[ReferenceAsset],
    weights: Path | None,
    embed_images: Callable[[list[np.ndarray]], np.ndarray],
    threshold: float,
) -> PluginStatus:
    """Boxes from an ultralytics YOLO model, each matched to the most similar asset by embedding."""
    if importlib.util.find_spec("ultralytics") is None:
        return PluginStatus("yolo", False, "the ultralytics package is not installed")
    problem = _missing_files({"yolo_weights": weights})
    if problem:
        return PluginStatus("yolo", False, problem)
    from ultralytics import YOLO

    model = YOLO(str(weights))
    status = PluginStatus("yolo", True, f"weights {weights}")
    if not references:
        return status
    ref_matrix = np.stack([r.vector for r in references])
    for frame in frames:
        result = model(frame.image[:, :, ::-1], verbose=False)[0]
        boxes = [tuple(int(v) for v in b) for b in result.boxes.xyxy.cpu().numpy()]
        crops = [frame.image[y1:y2, x1:x2] for x1, y1, x2, y2 in boxes if x2 > x1 and y2 > y1]
        if not crops:
            continue
        similarity = embed_images(crops) @ ref_matrix.T
        for box, row in zip(boxes, similarity):
            k = int(np.argmax(row))
            if row[k] >= threshold:
                ref = references[k]
                status.appearances.append(
                    Appearance(ref.asset_id, ref.code, frame.scene_index, frame.frame_index, frame.timestamp_sec, box, float(row[k]), source="yolo")
                )
    return status
