"""Scene continuity: a 0-10 score per scene, with the reasons behind it.

Four components, each in 0..1:
- adherence: expected assets found / expected (missing and unexpected listed by code);
- identity: for assets seen in an earlier scene, cosine similarity of their best
  appearance here to their best appearance in the last scene that showed them;
- boundary: first sampled frame of this scene vs last sampled frame of the previous one
  (generated clips are chained); neutral when the scene declares `continues_previous: false`;
- intra_scene: 1 with no hard cut inside the clip, 1 / (1 + n) with n cuts the manifest
  does not announce (declared cuts are neutral).
A component with nothing to measure (scene 0's boundary, no recurring asset, no expected
asset) is neutral: it is left out and the other weights are renormalised.

A scene whose clip failed to decode has no score (None) and needs review; a partial clip
is scored on what decoded and needs review too; so does a scene with an unannounced cut.
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
    clip_status: str = "ok"  # ok | partial | failed
    clip_reason: str | None = None
    cuts: Sequence[dict] = ()  # detected: {frame_index, timestamp_sec, ...}
    declared_cuts: Sequence[float] = ()  # seconds the manifest announces
    continues_previous: bool = True


@dataclass
class SceneContinuity:
    scene_index: int
    score: float | None  # None: the clip failed, there is nothing to score
    adherence: float | None
    identity: float | None
    boundary: float | None
    needs_review: bool
    found: list[str]
    missing: list[str]
    unexpected: list[str]
    identity_by_asset: dict[str, float] = field(default_factory=dict)
    reasons: list[str] = field(default_factory=list)
    intra_scene: float | None = None
    clip_status: str = "ok"
    cuts: list[dict] = field(default_factory=list)  # each detected cut, with `declared`

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
    cut_tolerance_sec: float = 0.5,
) -> list[SceneContinuity]:
    """Score scenes in story order; identity compares with the last earlier sighting."""
    by_scene: dict[int, list[Appearance]] = {}
    for app in appearances:
        by_scene.setdefault(app.scene_index, []).append(app)
    last_seen: dict[str, Appearance] = {}
    previous: SceneInput | None = None
    results = []
    for scene in sorted(scenes, key=lambda s: s.scene_index):
        if scene.clip_status == "failed":
            results.append(_failed(scene))
            previous = scene
            continue
        best = _best_by_asset(by_scene.get(scene.scene_index, []))
        result = _score_one(scene, previous, best, last_seen, weights, quality_gate, cut_tolerance_sec)
        results.append(result)
        last_seen.update(best)
        previous = scene
    return results


def _failed(scene: SceneInput) -> SceneContinuity:
    """No score for a clip that could not be decoded: it is never a perfect scene."""
    return SceneContinuity(
        scene_index=scene.scene_index, score=None, adherence=None, identity=None, boundary=None, needs_review=True,
        found=[], missing=sorted(set(scene.expected_codes)), unexpected=[],
        reasons=[f"clip failed: {scene.clip_reason or 'not decodable'}", "needs_review: the clip has no usable frames"],
        clip_status="failed",
    )


def _cut_label(cut: dict) -> str:
    return f"hard cut at {cut['timestamp_sec']:.2f} s (frame {cut['frame_index']})"


def _intra_scene(scene: SceneInput, tolerance_sec: float) -> tuple[float, list[dict], list[str]]:
    """The intra-scene component, each detected cut marked declared or not, and reasons."""
    cuts = [dict(cut, declared=any(abs(cut["timestamp_sec"] - t) <= tolerance_sec for t in scene.declared_cuts))
            for cut in scene.cuts]
    surprises = [c for c in cuts if not c["declared"]]
    reasons = [_cut_label(c) + " not announced by the manifest" for c in surprises]
    reasons += [_cut_label(c) + " (declared in the manifest)" for c in cuts if c["declared"]]
    reasons += [f"declared cut at {t:.2f} s not found in the clip" for t in scene.declared_cuts
                if not any(abs(c["timestamp_sec"] - t) <= tolerance_sec for c in cuts)]
    if not cuts:
        reasons.append("intra-scene: no hard cut inside the clip")
    return 1.0 / (1 + len(surprises)), cuts, reasons


def _boundary(scene: SceneInput, previous: SceneInput | None) -> tuple[float | None, str]:
    if previous is None:
        return None, "boundary neutral: first scene"
    if not scene.continues_previous:
        return None, "boundary neutral: the scene declares continues_previous: false (a deliberate change of place or time)"
    if previous.clip_status == "failed":
        return None, f"boundary neutral: the previous scene's clip ({previous.scene_index}) failed"
    if previous.last_frame_vector is None or scene.first_frame_vector is None:
        return None, "boundary neutral: no frames to compare"
    boundary = _cosine01(scene.first_frame_vector, previous.last_frame_vector)
    return boundary, f"boundary {boundary:.2f} (first frame vs previous scene's last frame)"


def _score_one(scene, previous, best, last_seen, weights, quality_gate, cut_tolerance_sec) -> SceneContinuity:
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

    boundary, boundary_reason = _boundary(scene, previous)
    reasons.append(boundary_reason)
    intra_scene, cuts, cut_reasons = _intra_scene(scene, cut_tolerance_sec)
    reasons += cut_reasons

    parts = {"adherence": adherence, "identity": identity, "boundary": boundary, "intra_scene": intra_scene}
    used = {k: v for k, v in parts.items() if v is not None and weights.get(k, 0) > 0}
    total_weight = sum(weights[k] for k in used)
    score = 10.0 * sum(weights[k] * v for k, v in used.items()) / total_weight if total_weight else 10.0
    score = round(score, 2)
    review = []
    if score < quality_gate:
        review.append(f"score {score:.2f} below quality gate {quality_gate:.2f}")
    if scene.clip_status != "ok":
        review.append(f"clip {scene.clip_status}: {scene.clip_reason}")
    if any(not c["declared"] for c in cuts):
        review.append("a hard cut the manifest does not announce")
    needs_review = bool(review)
    if needs_review:
        reasons.append("needs_review: " + "; ".join(review))
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
        intra_scene=intra_scene,
        clip_status=scene.clip_status,
        cuts=cuts,
    )
