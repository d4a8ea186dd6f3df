"""Ground truth for a project, named explicitly by its manifest (`ground_truth: gt.json`):
which asset is visible in which sampled frame, and where. Used only to measure quality
(precision, recall, box IoU); nothing else reads it.

The file (JSON):

    {"scenes": {"<scene index>": {"frames": {"<frame index>": [
        {"code": "CHAR_01", "bbox": [x1, y1, x2, y2], "visible_fraction": 0.8}, ...]}}}}

`bbox` is in pixels with an exclusive end; `visible_fraction` (0..1, default 1) is the
share of the asset inside the frame. Other keys (the demo writes titles, cuts, sizes) are
allowed and ignored. A file that does not fit raises `GroundTruthError` naming the file
and the field.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from cv_assets.analysis.appearances import Box, evaluate_against_truth

MAX_BYTES = 64 * 1024 * 1024


class GroundTruthError(ValueError):
    """A ground truth file that cannot be used; the message names the file and the field."""


class _Open(BaseModel):
    model_config = ConfigDict(extra="ignore")


class TruthItem(_Open):
    code: str
    bbox: Annotated[list[float], Field(min_length=4, max_length=4)]
    visible_fraction: float = Field(1.0, ge=0.0, le=1.0)

    @field_validator("bbox")
    @classmethod
    def _ordered(cls, box: list[float]) -> list[float]:
        if not (box[0] < box[2] and box[1] < box[3]):
            raise ValueError("must be [x1, y1, x2, y2] with x1 < x2 and y1 < y2")
        return box


class TruthScene(_Open):
    frames: dict[int, list[TruthItem]] = {}


class GroundTruthFile(_Open):
    scenes: dict[int, TruthScene]


def load_ground_truth(path: Path, min_visible: float = 0.3) -> dict[tuple[int, int], dict[str, Box]]:
    """`{(scene, frame): {code: box}}` for assets at least `min_visible` inside the frame."""
    path = Path(path)
    parsed = validate_ground_truth(path)
    return {
        (scene_index, frame_index): {item.code: tuple(int(v) for v in item.bbox)
                                     for item in items if item.visible_fraction >= min_visible}
        for scene_index, scene in parsed.scenes.items()
        for frame_index, items in scene.frames.items()
    }


def validate_ground_truth(path: Path) -> GroundTruthFile:
    """Parse and check the file; GroundTruthError names the file and every bad field."""
    try:
        if path.stat().st_size > MAX_BYTES:
            raise GroundTruthError(f"{path}: ground truth file is over {MAX_BYTES // (1024 * 1024)} MiB")
        data = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise GroundTruthError(f"{path}: ground truth file not found") from None
    except (OSError, ValueError, RecursionError) as exc:
        if isinstance(exc, GroundTruthError):
            raise
        raise GroundTruthError(f"{path}: not a readable JSON ground truth file: {exc}") from None
    try:
        return GroundTruthFile.model_validate(data)
    except ValidationError as exc:
        fields = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or '(top level)'}: {e['msg']}" for e in exc.errors()[:10])
        raise GroundTruthError(f"{path}: invalid ground truth: {fields}") from None


def quality_against_truth(truth_path: Path | None, appearances, frame_keys, codes, min_iou: float) -> dict[str, dict] | None:
    """Precision, recall and mean box IoU per asset over the evaluated (scene, frame) keys,
    when the project names a ground truth file; None otherwise."""
    if truth_path is None:
        return None
    truth = load_ground_truth(Path(truth_path))
    scores = evaluate_against_truth(appearances, truth, list(frame_keys), list(codes), min_iou)
    return {c: vars(s) | {"precision": s.precision, "recall": s.recall, "mean_iou": getattr(s, "mean_iou", None)}
            for c, s in scores.items()}
