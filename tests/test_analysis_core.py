"""Appearance matching and continuity scoring, through the core functions."""

import numpy as np
import pytest

from cv_assets.analysis.appearances import (
    Appearance,
    FrameInput,
    ReferenceAsset,
    candidate_regions,
    evaluate_against_truth,
    RegionSearch,
    iou,
    match_frames,
    unchanged,
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


EXHAUSTIVE = dict(scales=[1.0, 0.6, 0.4], overlap=0.5, coarse_to_fine=False)


def colour_only_embed(crops):
    """Like the colour-histogram embedder: grey does not count, so any crop holding a piece
    of a flat red object scores alike (the fit must find the edges from what is *outside*)."""
    out = colour_embed(crops)
    out[:, 3] = 0.0
    return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-9)


def test_box_is_the_extent_of_a_flat_object_not_the_tightest_square_crop():
    # A tall object no square crop fits: the fitted box follows its edges.
    truth = (300, 60, 360, 220)
    frames = [FrameInput(0, 0, 0.0, frame_with([(truth, RED)]))]
    outcome = match_frames(frames, [ReferenceAsset(1, "CHAR_01", unit(0))], colour_only_embed,
                           RegionSearch(threshold=0.5, **EXHAUSTIVE))
    (app,) = outcome.appearances
    assert iou(app.bbox, truth) >= 0.6, app.bbox
    # Every grid crop is embedded once, plus the fit's split parts and the fitted box.
    assert outcome.forwards > len(candidate_regions(640, 360, [1.0, 0.6, 0.4], 0.5))
    assert outcome.forwards_per_frame == outcome.forwards


@pytest.mark.parametrize("coarse_to_fine", [False, True])
def test_match_frames_finds_present_assets_with_boxes_and_skips_absent_ones(coarse_to_fine):
    red_box, blue_box = (40, 60, 140, 160), (400, 150, 500, 250)
    frames = [
        FrameInput(0, 0, 0.0, frame_with([(red_box, RED), (blue_box, BLUE)])),
        FrameInput(0, 48, 2.0, frame_with([(red_box, RED)])),
    ]
    refs = [ReferenceAsset(1, "CHAR_01", unit(0)), ReferenceAsset(2, "CHAR_02", unit(1)), ReferenceAsset(3, "PROP_01", unit(2))]
    search = RegionSearch(threshold=0.5, scales=[1.0, 0.6, 0.4], overlap=0.5, coarse_to_fine=coarse_to_fine)
    outcome = match_frames(frames, refs, colour_embed, search)
    got = {(a.frame_index, a.asset_code): a for a in outcome.appearances}
    assert set(got) == {(0, "CHAR_01"), (0, "CHAR_02"), (48, "CHAR_01")}  # no green anywhere, no blue in frame 48
    for (frame, code), app in got.items():
        truth = red_box if code == "CHAR_01" else blue_box
        assert iou(app.bbox, truth) > 0.5, (code, app.bbox)
        assert 0.5 <= app.confidence <= 1.0
        assert app.source == "clip_match" and app.embedding.shape == (512,)
    assert got[(48, "CHAR_01")].timestamp_sec == 2.0
    assert outcome.frames == 2 and outcome.forwards > 0


def test_coarse_to_fine_embeds_far_fewer_regions_than_the_exhaustive_grid():
    frames = [FrameInput(0, 0, 0.0, frame_with([((100, 50, 300, 300), RED)]))]
    refs = [ReferenceAsset(1, "CHAR_01", unit(0)), ReferenceAsset(2, "CHAR_02", unit(1))]
    full = match_frames(frames, refs, colour_embed, RegionSearch(threshold=0.5, coarse_to_fine=False))
    fast = match_frames(frames, refs, colour_embed, RegionSearch(threshold=0.5))
    assert full.forwards >= len(candidate_regions(640, 360, RegionSearch(0.5).scales, 0.5))
    assert fast.forwards < full.forwards / 2
    assert [a.asset_code for a in fast.appearances] == [a.asset_code for a in full.appearances] == ["CHAR_01"]


def test_no_seed_no_fit_and_nothing_to_do_without_frames_or_references():
    frames = [FrameInput(0, 0, 0.0, frame_with([]))]
    refs = [ReferenceAsset(1, "CHAR_01", unit(0))]
    coarse = RegionSearch(threshold=0.5)
    outcome = match_frames(frames, refs, colour_embed, coarse)
    assert outcome.appearances == []
    assert outcome.forwards == len(candidate_regions(640, 360, coarse.coarse_scales, coarse.coarse_overlap))
    assert match_frames([], refs, colour_embed, coarse).forwards == 0
    assert match_frames(frames, [], colour_embed, coarse).appearances == []


def counting(embed):
    """`embed` that also records every crop it is given."""
    seen = []

    def run(crops):
        seen.extend(crops)
        return embed(crops)

    run.seen = seen
    return run


def codec_noise(image, seed=0):
    """What re-encoding does to a still region: most pixels off by a grey level or so."""
    noise = np.random.default_rng(seed).integers(-1, 2, image.shape)
    return np.clip(image.astype(int) + noise, 0, 255).astype(np.uint8)


def test_unchanged_accepts_codec_noise_and_refuses_a_small_object_entering():
    still = frame_with([((100, 100, 200, 220), RED)])[0:216, 0:216]
    assert unchanged(still, codec_noise(still))
    entered = still.copy()
    entered[10:22, 10:22] = BLUE  # 144 pixels, 0.3% of the crop: a mean change under 1 level
    assert np.abs(entered.astype(int) - still).mean() < 1.0
    assert not unchanged(still, entered)
    assert not unchanged(still, still[:, :100])


def test_a_frame_unchanged_since_the_previous_one_of_its_scene_costs_no_forward():
    image = frame_with([((300, 60, 360, 220), RED)])
    frames = [FrameInput(0, 0, 0.0, image), FrameInput(0, 24, 1.0, codec_noise(image)),
              FrameInput(1, 0, 0.0, image)]  # another scene never borrows
    refs = [ReferenceAsset(1, "CHAR_01", unit(0))]
    search = RegionSearch(threshold=0.5, coarse_to_fine=True)
    embed = counting(colour_only_embed)
    outcome = match_frames(frames, refs, embed, search)
    first = match_frames(frames[:1], refs, colour_only_embed, search)
    assert outcome.forwards == len(embed.seen) == 2 * first.forwards
    assert outcome.reused == first.forwards
    boxes = [a.bbox for a in outcome.appearances]
    assert boxes == [first.appearances[0].bbox] * 3
    assert np.allclose(outcome.appearances[1].embedding, outcome.appearances[0].embedding)
    off = match_frames(frames, refs, colour_only_embed, RegionSearch(threshold=0.5, reuse_unchanged=False))
    assert off.reused == 0 and off.forwards == 3 * first.forwards


def test_an_object_entering_a_still_scene_is_found_and_only_changed_crops_are_embedded():
    still = frame_with([((40, 40, 100, 200), RED)])
    entered = frame_with([((40, 40, 100, 200), RED), ((480, 150, 540, 300), BLUE)])
    refs = [ReferenceAsset(1, "CHAR_01", unit(0)), ReferenceAsset(2, "CHAR_02", unit(1))]
    search = RegionSearch(threshold=0.5)
    outcome = match_frames([FrameInput(0, 0, 0.0, still), FrameInput(0, 24, 1.0, entered)], refs,
                           colour_only_embed, search)
    alone = match_frames([FrameInput(0, 24, 1.0, entered)], refs, colour_only_embed, search)
    assert [(a.frame_index, a.asset_code) for a in outcome.appearances] == [(0, "CHAR_01"), (24, "CHAR_01"), (24, "CHAR_02")]
    assert [a.bbox for a in outcome.appearances[1:]] == [a.bbox for a in alone.appearances]
    assert 0 < outcome.reused < alone.forwards  # the red object's fit is reused, the blue one's is not


@pytest.mark.parametrize("truth", [(300, 60, 360, 220), (40, 150, 200, 330), (500, 10, 620, 100)])
def test_later_fit_rounds_embed_one_part_per_edge(truth):
    # Grid (whole frame + 8 coarse crops), then 2 axes x 3 splits x 2 parts, then one part
    # per edge per round for 2 rounds, then the box itself.
    frames = [FrameInput(0, 0, 0.0, frame_with([(truth, RED)]))]
    search = RegionSearch(threshold=0.5)
    outcome = match_frames(frames, [ReferenceAsset(1, "CHAR_01", unit(0))], colour_only_embed, search)
    grid = len(candidate_regions(640, 360, search.coarse_scales, search.coarse_overlap))
    assert outcome.forwards == grid + 2 * search.extent_steps * 2 + 4 * (search.extent_rounds - 1) + 1 == 30
    assert iou(outcome.appearances[0].bbox, truth) >= 0.65


def test_an_object_leaving_the_frame_is_followed_below_the_seed_level_and_a_gone_one_costs_nothing():
    # Half cut by the frame's edge, the red object fills too little of any coarse crop to
    # seed (best 0.23 < 0.35), but it was found in the scene's frame searched before.
    whole, cut = (0, 150, 120, 300), (0, 150, 60, 300)
    frames = [FrameInput(0, 0, 0.0, frame_with([(whole, RED)])), FrameInput(0, 24, 1.0, frame_with([(cut, RED)]))]
    refs = [ReferenceAsset(1, "CHAR_01", unit(0))]
    tracking, plain = RegionSearch(threshold=0.8), RegionSearch(threshold=0.8, track_found=False)
    followed = match_frames(frames, refs, colour_embed, tracking, frames_per_batch=1)
    assert [a.frame_index for a in followed.appearances] == [0, 24]
    assert iou(followed.appearances[1].bbox, cut) >= 0.6
    assert [a.frame_index for a in match_frames(frames, refs, colour_embed, plain, frames_per_batch=1).appearances] == [0]
    # Where nothing of it is left, no fit is spent looking for it.
    gone = [frames[0], FrameInput(0, 24, 1.0, frame_with([]))]
    assert (match_frames(gone, refs, colour_embed, tracking, frames_per_batch=1).forwards
            == match_frames(gone, refs, colour_embed, plain, frames_per_batch=1).forwards)


def test_one_appearance_per_asset_and_frame_even_with_many_overlapping_hits():
    frames = [FrameInput(0, 0, 0.0, frame_with([((100, 50, 300, 300), RED)]))]
    found = match_frames(frames, [ReferenceAsset(1, "CHAR_01", unit(0))], colour_embed,
                         RegionSearch(threshold=0.3, scales=[1.0, 0.6, 0.4], overlap=0.75, coarse_to_fine=False)).appearances
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
    # Box IoU over the frames where the asset is predicted and visible, hit or miss.
    assert scores["A"].boxes_compared == 2 and scores["A"].mean_iou == pytest.approx((1.0 + 0.0) / 2)
    assert scores["B"].mean_iou is None


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


def test_clip_match_source_reports_forwards_per_frame_from_settings():
    from cv_assets.analysis.sources import build_sources
    from cv_assets.settings import AppearanceSettings, CvAnalysisSettings

    settings = AppearanceSettings(thresholds={"colour": 0.5})
    (clip, *_) = build_sources(settings, CvAnalysisSettings(), colour_embed, "colour", lambda: {})
    assert clip.search.coarse_to_fine and clip.threshold == 0.5
    frames = [FrameInput(0, i, float(i), frame_with([((100, 50, 300, 300), RED)])) for i in range(2)]
    found = clip.find(frames, [ReferenceAsset(1, "CHAR_01", unit(0))])
    assert len(found) == 2 and clip.frames_searched == 2
    assert clip.forwards_per_frame == clip.regions_embedded / 2 > 0
    assert f"{clip.forwards_per_frame:.1f} per frame" in clip.describe() and "coarse to fine" in clip.describe()
