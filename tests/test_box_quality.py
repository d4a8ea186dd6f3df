"""Box quality on real photographs and on the demo, with the colour-histogram embedder:
frame-level precision and recall, mean box IoU against the true extent, and the
coarse-to-fine search against the exhaustive grid on the same frames.

The real-photo set (cv_assets/demo/photo_scenes.py) pastes photographs that
scikit-image and matplotlib ship onto others and pans/zooms a camera over them, so every
frame's true box is known; references are the object photos themselves.

Measured when this was written (benchmarks/quality.py --quick, micro over assets; both
searches fit boxes alike, reuse crops unchanged since the previous frame and follow found
assets): demo exhaustive P/R 1.00/1.00, mean IoU 0.56 at 137 forwards per frame; coarse to
fine 1.00/1.00, 0.59 at 33; real photos exhaustive 0.98/0.98, 0.58 at 221; coarse to fine
0.98/0.98, 0.64 at 63.
"""

import pytest

from cv_assets.analysis.sources import region_search
from cv_assets.demo.photo_scenes import demo_set, evaluate_set, real_photo_set
from cv_assets.embedding.histogram import ColorHistogramEmbedder
from cv_assets.settings import AppearanceSettings

pytest.importorskip("skimage")
pytest.importorskip("matplotlib")

SETTINGS = AppearanceSettings()
THRESHOLD = SETTINGS.thresholds["color_histogram"]
# Issue targets: precision and recall >= 0.9, mean IoU >= 0.5.
MIN_PR, MIN_IOU = 0.9, 0.5
# Issue 14: coarse to fine no worse than the exhaustive grid, and <= 40 forwards per frame
# on the demo.
MAX_DEMO_FORWARDS = 40


def _search(coarse_to_fine: bool):
    return region_search(SETTINGS.model_copy(update={"coarse_to_fine": coarse_to_fine}), THRESHOLD)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    embedder = ColorHistogramEmbedder()
    sets = {"demo": demo_set(tmp_path_factory.mktemp("demo")), "real": real_photo_set()}
    return {(name, c2f): evaluate_set(s, embedder, _search(c2f), SETTINGS.eval_iou)
            for name, s in sets.items() for c2f in (False, True)}


def test_real_photo_set_has_known_boxes_and_frames_without_the_objects():
    quality_set = real_photo_set()
    assert len(quality_set.frames) >= 24 and set(quality_set.references) == {
        "CHAR_ASTRONAUT", "CHAR_HOPPER", "PROP_CAT", "PROP_COFFEE"}
    visible = [box for boxes in quality_set.truth.values() for box in boxes.values()]
    assert all(0 <= b[0] < b[2] <= 640 and 0 <= b[1] < b[3] <= 360 for b in visible)
    assert any(len(boxes) < 4 for boxes in quality_set.truth.values())


@pytest.mark.parametrize("name", ["demo", "real"])
def test_exhaustive_grid_meets_the_targets(results, name):
    q = results[(name, False)]
    assert q.precision >= MIN_PR and q.recall >= MIN_PR, (q.precision, q.recall)
    assert q.mean_iou >= MIN_IOU, {c: s.mean_iou for c, s in q.scores.items()}


@pytest.mark.parametrize("name", ["demo", "real"])
def test_coarse_to_fine_is_no_worse_than_the_exhaustive_grid(results, name):
    fast, full = results[(name, True)], results[(name, False)]
    assert fast.mean_iou >= full.mean_iou, (fast.mean_iou, full.mean_iou)
    # Precision as false positives: one fewer true hit moves the ratio without a new mistake.
    assert _false_positives(fast) <= _false_positives(full)
    assert fast.forwards_per_frame < full.forwards_per_frame / 3


def _false_positives(quality) -> int:
    return sum(s.predicted - s.true_positives for s in quality.scores.values())


def test_coarse_to_fine_meets_the_forwards_target_on_the_demo(results):
    assert results[("demo", True)].forwards_per_frame <= MAX_DEMO_FORWARDS


@pytest.mark.parametrize("name", ["demo", "real"])
def test_coarse_to_fine_recall_is_no_worse_than_the_exhaustive_grid(results, name):
    # On the real photos this needs tracking: the astronaut leaving the frame's left edge in
    # two frames stays under the seed level in every coarse crop (0.94 vs 0.98 without).
    fast, full = results[(name, True)], results[(name, False)]
    assert fast.recall >= full.recall, (fast.recall, full.recall)
