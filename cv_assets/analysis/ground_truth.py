"""Ground truth written beside a project (`ground_truth.json`, as the demo data has it):
which asset is visible in which frame, and where."""

from __future__ import annotations

import json
from pathlib import Path

from cv_assets.analysis.appearances import Box

GROUND_TRUTH_NAME = "ground_truth.json"


def load_ground_truth(project_root: Path, min_visible: float = 0.3) -> dict[tuple[int, int], dict[str, Box]] | None:
    """`{(scene, frame): {code: box}}` for assets at least `min_visible` inside the frame,
    or None when the project has no ground truth file."""
    path = Path(project_root) / GROUND_TRUTH_NAME
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    truth: dict[tuple[int, int], dict[str, Box]] = {}
    for scene_key, scene in data.get("scenes", {}).items():
        for frame_key, items in scene.get("frames", {}).items():
            visible = {
                item["code"]: tuple(int(v) for v in item["bbox"])
                for item in items
                if item.get("visible_fraction", 1.0) >= min_visible
            }
            truth[(int(scene_key), int(frame_key))] = visible
    return truth


def quality_against_truth(project_root: Path, appearances, frame_keys, codes, min_iou: float) -> dict[str, dict] | None:
    """Precision and recall per asset over the evaluated (scene, frame) keys, when the
    project has ground truth; None otherwise."""
    from cv_assets.analysis.appearances import evaluate_against_truth

    truth = load_ground_truth(project_root)
    if truth is None:
        return None
    scores = evaluate_against_truth(appearances, truth, list(frame_keys), list(codes), min_iou)
    return {c: vars(s) | {"precision": s.precision, "recall": s.recall} for c, s in scores.items()}
