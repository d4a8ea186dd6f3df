"""Appearance box quality and search cost: exhaustive grid vs coarse to fine.

On two sets with known boxes, with the colour-histogram embedder (no CLIP weights here):

  demo          the demo project (`write_demo_data`, flat-colour sprites), its clips
                sampled by `sample_video_frames` as the pipeline samples them
  real_photos   photographs shipped by scikit-image and matplotlib pasted onto others,
                with a panning/zooming camera (cv_assets/demo/photo_scenes.py); the
                references are the object photos themselves

For each set and search (exhaustive = every crop of `appearances.region_scales`, the peer;
coarse to fine = the default) it prints per-asset precision, recall and mean box IoU,
and the crops embedded per frame (forwards). Targets (issues 11 and 14): precision and
recall >= 0.9 and mean IoU >= 0.5 with coarse to fine; <= 40 forwards per frame on the
demo; coarse to fine no worse than the exhaustive grid (ratios of precision, recall and
mean IoU >= 1.0). Both searches fit boxes the same way and reuse crops unchanged since the
previous frame of a scene.

Run from the repo root: python benchmarks/quality.py [--quick]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cv_assets.analysis.appearances import candidate_regions  # noqa: E402
from cv_assets.analysis.sources import region_search  # noqa: E402
from cv_assets.demo.photo_scenes import demo_set, evaluate_set, real_photo_set  # noqa: E402
from cv_assets.embedding.histogram import ColorHistogramEmbedder  # noqa: E402
from cv_assets.settings import AppearanceSettings  # noqa: E402

SETTINGS = AppearanceSettings()
THRESHOLD = SETTINGS.thresholds["color_histogram"]
MODES = {"exhaustive": False, "coarse_to_fine": True}


def full_grid_size(settings: AppearanceSettings, width: int = 640, height: int = 360) -> int:
    """Crops of the exhaustive grid on a demo-sized frame (what every frame cost before the box fit)."""
    return len(candidate_regions(width, height, settings.region_scales, settings.region_overlap))


def _fmt(value) -> str:
    return "   —" if value is None else f"{value:.2f}"


def report(set_name: str, mode: str, quality, seconds: float) -> None:
    print(f"\n{set_name} / {mode}: {quality.forwards_per_frame:.1f} forwards per frame, {seconds:.1f} s")
    print(f"  {'asset':16s} {'P':>5s} {'R':>5s} {'IoU':>5s} {'TP':>4s} {'pred':>4s} {'true':>4s}")
    for code, s in quality.scores.items():
        print(f"  {code:16s} {_fmt(s.precision):>5s} {_fmt(s.recall):>5s} {_fmt(s.mean_iou):>5s} "
              f"{s.true_positives:4d} {s.predicted:4d} {s.actual:4d}")
    print(f"  {'all (micro)':16s} {quality.precision:5.2f} {quality.recall:5.2f} {quality.mean_iou:5.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3-second demo scenes instead of 8")
    args = parser.parse_args()
    embedder = ColorHistogramEmbedder()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        sets = {"demo": demo_set(Path(tmp), scene_seconds=3.0 if args.quick else 8.0), "real_photos": real_photo_set()}
        for set_name, quality_set in sets.items():
            print(f"{set_name}: {len(quality_set.frames)} frames, {len(quality_set.references)} assets")
            for mode, c2f in MODES.items():
                search = region_search(SETTINGS.model_copy(update={"coarse_to_fine": c2f}), THRESHOLD)
                started = time.perf_counter()
                results[(set_name, mode)] = evaluate_set(quality_set, embedder, search, SETTINGS.eval_iou)
                report(set_name, mode, results[(set_name, mode)], time.perf_counter() - started)
    print()
    for set_name in ("demo", "real_photos"):
        fast, full = results[(set_name, "coarse_to_fine")], results[(set_name, "exhaustive")]
        print(f"RATIO precision_{set_name} {fast.precision:.2f} target >= 0.9")
        print(f"RATIO recall_{set_name} {fast.recall:.2f} target >= 0.9")
        print(f"RATIO mean_iou_{set_name} {fast.mean_iou:.2f} target >= 0.5")
        print(f"RATIO mean_iou_{set_name}_exhaustive {full.mean_iou:.2f} target >= 0.5")
        for metric in ("precision", "recall", "mean_iou"):
            ours, peer = getattr(fast, metric), getattr(full, metric)
            print(f"RATIO {metric}_coarse_to_fine_vs_exhaustive_{set_name} {ours / peer if peer else 0.0:.2f} "
                  f"target >= 1.0")
        print(f"# forwards per frame on {set_name}: coarse to fine {fast.forwards_per_frame:.1f}, exhaustive "
              f"{full.forwards_per_frame:.1f} (the grid alone: {full_grid_size(SETTINGS)})")
    print(f"RATIO forwards_per_frame_demo {results[('demo', 'coarse_to_fine')].forwards_per_frame:.0f} target <= 40")


if __name__ == "__main__":
    main()
