"""Appearance matching and continuity scoring, through the core functions."""

import numpy as np
import pytest

from cv_assets.analysis.appearances import (
    Appearance,
    FrameInput,
    ReferenceAsset,
    candidate_regions,
    evaluate_against_truth,
    iou,
    locate,
    match_frames,
)
from cv_assets.analysis.continuity import SceneInput, score_scenes

RED, BLUE, GREEN = (220, 30, 30), (30, 60, 220), (40, 200, 40)


def colour_embed(crops):
    """A transparent stand-in for the embedder: the share of red, blue and green pixels,
    one-hot-ish in 512-d and unit-normalised (grey background counts as 'other')."""
    out = np.zeros((len(crops), 512), np.float32)
    for i, crop in enumerate(crops):
        flat = crop.reshape(-1, 3).astype(int)
        for k, colour in enumerate((RED, BLUE, GREEN)):
            out[i, k] = np.mean(np.all(np.abs(flat - colour) < 10, axis=1))
        out[i, 3] = np.mean(np.all(np.abs(flat - 128) < 10, axis=1))
        out[i] /= np.linalg.norm(out[i]) or 1.0
    return out


def unit(k):
    v = np.zeros(512, np.float32)
    v[k] = 1.0
    return v


def frame_with(boxes, size=(360, 640)):
    img = np.full((*size, 3), 128, np.uint8)
    for (x1, y1, x2, y2), colour in boxes:
        img[y1:y2, x1:x2] = colour
    return img


def test_candidate_regions_cover_the_frame_edges():
    boxes = candidate_regions(640, 360, [1.0, 0.4], 0.5)
    assert boxes[0] == (0, 0, 640, 360)
    side = 144
    assert all(b[2] - b[0] == b[3] - b[1] for b in boxes[1:])
    assert max(b[2] for b in boxes) == 640 and max(b[3] for b in boxes) == 360
    small = [b for b in boxes if b[2] - b[0] == side]
    xs = sorted({b[0] for b in small})
    assert xs[0] == 0 and xs[-1] == 640 - side and all(b - a <= side for a, b in zip(xs, xs[1:]))


def test_iou():
    assert iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0
    assert iou((0, 0, 10, 10), (20, 20, 30, 30)) == 0.0
    assert iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(50 / 150)


def test_locate_merges_overlapping_regions_into_the_area_they_agree_on():
    # Four crops all contain the object at (100..150, 100..150); their votes meet there.
    boxes = [(0, 0, 640, 360), (50, 50, 200, 200), (100, 100, 250, 250), (0, 90, 160, 250), (90, 0, 250, 160), (400, 0, 640, 240)]
    scores = np.array([0.80, 0.90, 0.90, 0.90, 0.90, 0.20])
    box, representative = locate(boxes, scores, threshold=0.7, vote_fraction=0.9, tie_margin=0.03)
    assert box == (100, 100, 160, 160)  # only where all four agree
    looser, _ = locate(boxes, scores, threshold=0.7, vote_fraction=0.7, tie_margin=0.03)
    assert looser == (90, 90, 200, 200)  # where at least three agree
    assert representative in (1, 2)  # tightest of the best-scoring regions
    assert locate(boxes, scores, threshold=0.95, vote_fraction=0.7, tie_margin=0.03) is None


def test_locate_ignores_matching_regions_that_do_not_touch_the_best_one():
    boxes = [(0, 0, 100, 100), (500, 200, 600, 300)]
    box, representative = locate(boxes, np.array([0.9, 0.85]), 0.7, 0.7, 0.03)
    assert box == (0, 0, 100, 100) and representative == 0


def test_match_frames_finds_present_assets_with_boxes_and_skips_absent_ones():
    red_box, blue_box = (40, 60, 140, 160), (400, 150, 500, 250)
    frames = [
        FrameInput(0, 0, 0.0, frame_with([(red_box, RED), (blue_box, BLUE)])),
        FrameInput(0, 48, 2.0, frame_with([(red_box, RED)])),
    ]
    refs = [ReferenceAsset(1, "CHAR_01", unit(0)), ReferenceAsset(2, "CHAR_02", unit(1)), ReferenceAsset(3, "PROP_01", unit(2))]
    found = match_frames(frames, refs, colour_embed, threshold=0.5, scales=[1.0, 0.6, 0.4], overlap=0.5, vote_fraction=0.7, tie_margin=0.03)
    got = {(a.frame_index, a.asset_code): a for a in found}
    assert set(got) == {(0, "CHAR_01"), (0, "CHAR_02"), (48, "CHAR_01")}  # no green anywhere, no blue in frame 48
    for (frame, code), app in got.items():
        truth = red_box if code == "CHAR_01" else blue_box
        assert iou(app.bbox, truth) > 0.3, (code, app.bbox)
        assert 0.5 <= app.confidence <= 1.0
        assert app.source == "clip_match" and app.embedding.shape == (512,)
    assert got[(48, "CHAR_01")].timestamp_sec == 2.0


def test_one_appearance_per_asset_and_frame_even_with_many_overlapping_hits():
    frames = [FrameInput(0, 0, 0.0, frame_with([((100, 50, 300, 300), RED)]))]
    found = match_frames(frames, [ReferenceAsset(1, "CHAR_01", unit(0))], colour_embed, threshold=0.3,
                         scales=[1.0, 0.6, 0.4], overlap=0.75, vote_fraction=0.7, tie_margin=0.03)
    assert len(found) == 1


def test_evaluate_against_truth_counts_tp_fp_fn():
    truth = {(0, 0): {"A": (0, 0, 100, 100)}, (0, 1): {"A": (0, 0, 100, 100), "B": (200, 200, 300, 300)}}
    apps = [
        Appearance(1, "A", 0, 0, 0.0, (0, 0, 100, 100), 0.9),       # TP
        Appearance(1, "A", 0, 1, 0.1, (400, 300, 500, 360), 0.8),   # wrong place: FP
        Appearance(2, "B", 0, 0, 0.0, (0, 0, 50, 50), 0.7),         # not there: FP
    ]
    scores = evaluate_against_truth(apps, truth, [(0, 0), (0, 1)], ["A", "B"], 0.1)
    assert (scores["A"].true_positives, scores["A"].predicted, scores["A"].actual) == (1, 2, 2)
    assert scores["A"].precision == 0.5 and scores["A"].recall == 0.5
    assert scores["B"].precision == 0.0 and scores["B"].recall == 0.0


def _app(code, scene, vec, conf=0.9):
    return Appearance(1, code, scene, scene * 10, float(scene), (0, 0, 10, 10), conf, embedding=vec)


def test_continuity_components_and_review_flag():
    weights = {"adherence": 0.5, "identity": 0.3, "boundary": 0.2}
    a = unit(0)
    drifted = unit(1)
    scenes = [
        SceneInput(0, ["A", "B"], unit(5), unit(5)),
        SceneInput(1, ["A", "B"], unit(5), unit(6)),   # same look as scene 0's end: boundary 1.0
        SceneInput(2, ["A", "B", "C"], unit(7), unit(7)),  # hard visual break: boundary 0
    ]
    apps = [_app("A", 0, a), _app("B", 0, a), _app("A", 1, a), _app("B", 1, a), _app("D", 1, a), _app("A", 2, drifted)]
    results = score_scenes(scenes, apps, weights, quality_gate=5.0)
    s0, s1, s2 = results
    assert s0.boundary is None and s0.identity is None and s0.adherence == 1.0 and s0.score == 10.0
    assert s1.adherence == 1.0 and s1.identity == pytest.approx(1.0) and s1.boundary == pytest.approx(1.0)
    assert s1.unexpected == ["D"] and s1.score == 10.0 and not s1.needs_review
    assert s2.missing == ["B", "C"] and s2.adherence == pytest.approx(1 / 3)
    assert s2.identity_by_asset == {"A": 0.0} and s2.boundary == 0.0
    assert s2.score == pytest.approx(10 * 0.5 * (1 / 3), abs=0.01)
    assert s2.needs_review and any("needs_review" in r for r in s2.reasons)
    assert any("missing: B, C" in r for r in s2.reasons)
