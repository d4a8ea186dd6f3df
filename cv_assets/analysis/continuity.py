"""Scene continuity: a 0-10 score per scene, with the reasons behind it.

Three components, each in 0..1:
- adherence: expected assets found / expected (missing and unexpected listed by code);
- identity: for assets seen in an earlier scene, cosine similarity of their best
  appearance here to their best appearance in the last scene that showed them;
- boundary: first sampled frame of this scene vs last sampled frame of the previous one.
A component with nothing to measure (scene 0's boundary, no recurring asset, no expected
asset) is neutral: it is left out and the other weights are renormalised.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Sequence

import numpy as np

from cv_assets.analysis.appearances import Appearance


@dataclass(frozen=True)
class SceneInput:
    scene_index: int
    expected_codes: list[str]
    first_frame_vector: np.ndarray | None
    last_frame_vector: np.ndarray | None


@dataclass
class SceneContinuity:
    scene_index: int
    score: float
    adherence: float | None
    identity: float | None
    boundary: float | None
    needs_review: bool
    found: list[str]
    missing: list[str]
    unexpected: list[str]
    identity_by_asset: dict[str, float] = field(default_factory=dict)
    reasons: list[str] = field(default_factory=list)

    def as_json(self) -> dict:
        return asdict(self)


def _cosine01(a: np.ndarray, b: np.ndarray) -> float:
    denom = float(np.linalg.norm(a) * np.linalg.norm(b))
    return float(np.clip(np.dot(a, b) / denom, 0.0, 1.0)) if denom else 0.0


def _best_by_asset(appearances: Sequence[Appearance]) -> dict[str, Appearance]:
    best: dict[str, Appearance] = {}
    for app in appearances:
        if app.asset_code not in best or app.confidence > best[app.asset_code].confidence:
            best[app.asset_code] = app
    return best


def score_scenes(
    scenes: Sequence[SceneInput],
    appearances: Sequence[Appearance],
    weights: dict[str, float],
    quality_gate: float,
) -> list[SceneContinuity]:
    """Score scenes in story order; identity compares with the last earlier sighting."""
    by_scene: dict[int, list[Appearance]] = {}
    for app in appearances:
        by_scene.setdefault(app.scene_index, []).append(app)
    last_seen: dict[str, Appearance] = {}
    previous: SceneInput | None = None
    results = []
    for scene in sorted(scenes, key=lambda s: s.scene_index):
        best = _best_by_asset(by_scene.get(scene.scene_index, []))
        result = _score_one(scene, previous, best, last_seen, weights, quality_gate)
        results.append(result)
        last_seen.update(best)
        previous = scene
    return results


def _score_one(scene, previous, best, last_seen, weights, quality_gate) -> SceneContinuity:
    found = sorted(best)
    expected = sorted(set(scene.expected_codes))
    missing = [c for c in expected if c not in best]
    unexpected = [c for c in found if c not in expected]
    reasons = []

    adherence = (len(expected) - len(missing)) / len(expected) if expected else None
    if adherence is None:
        reasons.append("adherence neutral: the manifest expects no asset")
    else:
        reasons.append(f"adherence {len(expected) - len(missing)}/{len(expected)} expected assets found")
    if missing:
        reasons.append(f"missing: {', '.join(missing)}")
    if unexpected:
        reasons.append(f"unexpected: {', '.join(unexpected)}")

    identity_by_asset = {
        code: round(_cosine01(app.embedding, last_seen[code].embedding), 4)
        for code, app in best.items()
        if code in last_seen and app.embedding is not None and last_seen[code].embedding is not None
    }
    identity = float(np.mean(list(identity_by_asset.values()))) if identity_by_asset else None
    if identity is None:
        reasons.append("identity neutral: no asset seen in an earlier scene")
    else:
        low = [c for c, v in identity_by_asset.items() if v < 0.5]
        reasons.append(f"identity {identity:.2f} over {len(identity_by_asset)} recurring asset(s)" + (f"; drifted: {', '.join(low)}" if low else ""))

    boundary = None
    if previous is not None and previous.last_frame_vector is not None and scene.first_frame_vector is not None:
        boundary = _cosine01(scene.first_frame_vector, previous.last_frame_vector)
        reasons.append(f"boundary {boundary:.2f} (first frame vs previous scene's last frame)")
    else:
        reasons.append("boundary neutral: first scene" if previous is None else "boundary neutral: no frames to compare")

    parts = {"adherence": adherence, "identity": identity, "boundary": boundary}
    used = {k: v for k, v in parts.items() if v is not None and weights.get(k, 0) > 0}
    total_weight = sum(weights[k] for k in used)
    score = 10.0 * sum(weights[k] * v for k, v in used.items()) / total_weight if total_weight else 10.0
    score = round(score, 2)
    needs_review = score < quality_gate
    if needs_review:
        reasons.append(f"needs_review: score {score:.2f} below quality gate {quality_gate:.2f}")
    return SceneContinuity(
        scene_index=scene.scene_index,
        score=score,
        adherence=adherence,
        identity=identity,
        boundary=boundary,
        needs_review=needs_review,
        found=found,
        missing=missing,
        unexpected=unexpected,
        identity_by_asset=identity_by_asset,
        reasons=reasons,
    )
