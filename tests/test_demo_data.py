"""The demo data generator: determinism, the manifest and clips, the ground truth and the
scripted features the pipeline must find, and the event set with its broken thumbnails."""

from __future__ import annotations

import base64
import binascii
import io
import json
from collections import Counter, defaultdict
from datetime import datetime
from pathlib import Path

import av
import cv2
import numpy as np
import pytest
import yaml
from PIL import Image

from cv_assets.demo import DemoSummary, write_demo_data
from cv_assets.manifest import ManifestSpec

SMALL = {"scene_seconds": 2.0, "fps": 24, "n_events": 40}
SMALL_FRAMES = 48
CHROMA_S = 60  # HSV saturation (0-255) above which a pixel counts as coloured


@pytest.fixture(scope="module")
def small_pair(tmp_path_factory) -> tuple[DemoSummary, DemoSummary]:
    first = write_demo_data(tmp_path_factory.mktemp("demo_a"), **SMALL)
    second = write_demo_data(tmp_path_factory.mktemp("demo_b"), **SMALL)
    return first, second


@pytest.fixture(scope="module")
def small(small_pair) -> DemoSummary:
    return small_pair[0]


@pytest.fixture(scope="module")
def truth(small) -> dict:
    return json.loads(small.ground_truth_path.read_text())


@pytest.fixture(scope="module")
def decoded(small) -> dict[int, list[np.ndarray]]:
    return {i: decode(path) for i, path in enumerate(small.clip_paths)}


def decode(path: Path) -> list[np.ndarray]:
    with av.open(str(path)) as container:
        return [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]


def files_under(root: Path) -> dict[str, Path]:
    return {str(p.relative_to(root)): p for p in sorted(root.rglob("*")) if p.is_file()}


def moved_share(a: np.ndarray, b: np.ndarray, width: int = 160, delta: int = 30) -> float:
    """Share of pixels whose luma changed by more than `delta` at `width` (the sampler's measure)."""
    def luma(x):
        return cv2.resize(cv2.cvtColor(x, cv2.COLOR_RGB2GRAY), (width, width * x.shape[0] // x.shape[1]),
                          interpolation=cv2.INTER_AREA).astype(np.int16)
    return float((np.abs(luma(a) - luma(b)) > delta).mean())


def saturation(image: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(image, cv2.COLOR_RGB2HSV)[..., 1]


# --- determinism -------------------------------------------------------------------------


def test_two_runs_write_the_same_files_and_bytes(small_pair):
    a, b = small_pair
    files_a, files_b = files_under(a.root), files_under(b.root)
    assert list(files_a) == list(files_b)
    assert len(files_a) >= 4 + 4 + 2 + 2  # refs, clips, manifest + truth, events + truth
    for name, path in files_a.items():
        if path.suffix == ".mp4" and path.read_bytes() != files_b[name].read_bytes():
            # Another libx264 build may differ in bytes; the pictures must not.
            assert all(np.array_equal(x, y) for x, y in zip(decode(path), decode(files_b[name], )))
        else:
            assert path.read_bytes() == files_b[name].read_bytes(), name


def test_rerun_replaces_the_demo_but_keeps_other_data(tmp_path):
    other = tmp_path / "projects" / "mine" / "project.yaml"
    other.parent.mkdir(parents=True)
    other.write_text("project: mine\n")
    write_demo_data(tmp_path, scene_seconds=1.0, n_events=60)
    summary = write_demo_data(tmp_path, scene_seconds=1.0, n_events=40)
    assert other.read_text() == "project: mine\n"
    events = [json.loads(line) for line in summary.events_path.read_text().splitlines()]
    referenced = {e["thumbnail_path"] for e in events if "thumbnail_path" in e}
    on_disk = {str(p.relative_to(summary.thumbnails_dir)) for p in summary.thumbnails_dir.rglob("*.jpg")}
    assert on_disk <= referenced  # nothing left over from the larger first run
    assert len(events) == 40


def test_bad_sizes_are_refused_with_the_reason(tmp_path):
    with pytest.raises(ValueError, match="n_events must be at least"):
        write_demo_data(tmp_path, scene_seconds=1.0, n_events=10)
    with pytest.raises(ValueError, match="at least 12 frames"):
        write_demo_data(tmp_path, scene_seconds=0.2)


# --- the video project -------------------------------------------------------------------


def test_manifest_parses_and_every_referenced_file_exists(small):
    manifest = yaml.safe_load(small.manifest_path.read_text())
    assert manifest["project"] == "demo"
    assert len(manifest["assets"]) >= 3
    assert {a["kind"] for a in manifest["assets"]} >= {"character", "prop"}
    for asset in manifest["assets"]:
        assert (small.project_dir / asset["reference_image"]).is_file()
    codes = {a["code"] for a in manifest["assets"]}
    assert [s["index"] for s in manifest["scenes"]] == list(range(len(manifest["scenes"])))
    assert len(manifest["scenes"]) >= 4
    for scene in manifest["scenes"]:
        assert (small.project_dir / scene["clip"]).is_file()
        assert set(scene["expected_assets"]) <= codes


def test_manifest_passes_the_projects_validation(small):
    spec = ManifestSpec.model_validate(yaml.safe_load(small.manifest_path.read_text()))
    assert spec.project == "demo" and len(spec.scenes) == small.scenes


def test_reference_images_show_the_asset_tightly_on_grey(small):
    for path in small.reference_paths:
        image = np.array(Image.open(path))
        assert image.shape[2] == 3 and image.shape[0] == image.shape[1]
        assert tuple(image[0, 0]) == (128, 128, 128) and tuple(image[-1, -1]) == (128, 128, 128)
        ys, xs = np.nonzero(saturation(image) > CHROMA_S)
        span = max(ys.max() - ys.min(), xs.max() - xs.min()) + 1
        assert span >= 0.8 * image.shape[0], path.name


def test_clips_decode_with_the_expected_size_rate_and_frame_count(small, decoded):
    for path in small.clip_paths:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            assert stream.codec_context.name == "h264"
            assert stream.codec_context.pix_fmt == "yuv420p"
            assert float(stream.average_rate) == 24.0
    for frames in decoded.values():
        assert len(frames) == SMALL_FRAMES
        assert frames[0].shape == (360, 640, 3)
    assert small.frames == SMALL_FRAMES * small.scenes


def test_ground_truth_covers_every_frame_with_boxes_inside_it(small, truth):
    assert (truth["fps"], truth["width"], truth["height"]) == (24, 640, 360)
    assert len(truth["scenes"]) == small.scenes
    for scene in truth["scenes"].values():
        assert list(scene["frames"]) == [str(i) for i in range(SMALL_FRAMES)]
        for assets in scene["frames"].values():
            for asset in assets:
                x1, y1, x2, y2 = asset["bbox"]
                assert 0 <= x1 < x2 <= 640 and 0 <= y1 < y2 <= 360
                assert 0.3 <= asset["visible_fraction"] <= 1.0


def test_ground_truth_boxes_hold_the_colour_and_the_background_is_grey(truth, decoded):
    """The boxes are where the saturated pixels are: inside, a good share is coloured;
    outside every box (with a margin for chroma blur), the background stays near grey."""
    for index, frames in decoded.items():
        for frame_index in (0, SMALL_FRAMES // 3, SMALL_FRAMES - 1):
            image = frames[frame_index]
            sat = saturation(image)
            outside = np.ones(sat.shape, dtype=bool)
            for asset in truth["scenes"][str(index)]["frames"][str(frame_index)]:
                x1, y1, x2, y2 = asset["bbox"]
                share = (sat[y1:y2, x1:x2] > CHROMA_S).mean()
                assert share >= 0.25 * asset["visible_fraction"], (index, frame_index, asset)
                outside[max(0, y1 - 8):y2 + 8, max(0, x1 - 8):x2 + 8] = False
            assert np.percentile(sat[outside], 99) < 40, (index, frame_index)


def test_there_is_a_hard_cut_recorded_in_the_ground_truth(truth, decoded):
    cut_scenes = {int(i): s["cuts"] for i, s in truth["scenes"].items() if s["cuts"]}
    assert cut_scenes, "no scene has a cut"
    for index, cuts in cut_scenes.items():
        frames = decoded[index]
        for cut in cuts:
            assert 0 < cut < len(frames)
            jump = np.abs(frames[cut].astype(np.int16) - frames[cut - 1]).mean()
            calm = np.median([np.abs(frames[i + 1].astype(np.int16) - frames[i]).mean()
                              for i in range(len(frames) - 1) if i + 1 != cut])
            assert jump > 20 and jump > 10 * calm
            before = {a["code"] for a in truth["scenes"][str(index)]["frames"][str(cut - 1)]}
            after = {a["code"] for a in truth["scenes"][str(index)]["frames"][str(cut)]}
            assert before != after  # the layout changes with the shot


def test_the_large_motion_scene_moves_many_pixels_every_frame(truth, decoded):
    flagged = [int(i) for i, s in truth["scenes"].items() if s["large_motion"]]
    calm = [int(i) for i, s in truth["scenes"].items() if not s["large_motion"] and not s["cuts"]]
    assert flagged and calm
    for index in flagged:
        frames = decoded[index]
        shares = [moved_share(frames[i], frames[i + 1]) for i in range(len(frames) - 1)]
        assert np.median(shares) > 0.15  # above cv_analysis.motion_delta_threshold
    for index in calm:
        frames = decoded[index]
        assert np.median([moved_share(frames[i], frames[i + 1]) for i in range(len(frames) - 1)]) < 0.02


def test_expected_assets_missing_and_unexpected_ones_present(small, truth):
    manifest = yaml.safe_load(small.manifest_path.read_text())
    expected = {s["index"]: set(s["expected_assets"]) for s in manifest["scenes"]}
    missing_cases, unexpected_cases = [], []
    for index, scene in truth["scenes"].items():
        seen = Counter(a["code"] for assets in scene["frames"].values() for a in assets)
        assert sorted(seen) == scene["present_assets"]
        missing = sorted(expected[int(index)] - set(seen))
        unexpected = sorted(set(seen) - expected[int(index)])
        assert missing == scene["missing_expected"] and unexpected == scene["unexpected"]
        missing_cases += missing
        # "briefly": the unexpected asset shows in under half of the scene's frames
        unexpected_cases += [c for c in unexpected if 0 < seen[c] < SMALL_FRAMES / 2]
    assert missing_cases and unexpected_cases
    assert len(truth["assets"]) >= 3


def test_assets_enter_and_leave_the_frame(truth):
    entered = left = False
    for scene in truth["scenes"].values():
        frames = [{a["code"] for a in scene["frames"][str(i)]} for i in range(SMALL_FRAMES)]
        for code in set().union(*frames):
            shown = [code in f for f in frames]
            first, last = shown.index(True), len(shown) - 1 - shown[::-1].index(True)
            entered |= first > 0 and not scene["cuts"]
            left |= last < SMALL_FRAMES - 1 and not scene["cuts"]
    assert entered and left


# --- the event set -----------------------------------------------------------------------


def read_events(summary: DemoSummary) -> list[dict]:
    return [json.loads(line) for line in summary.events_path.read_text().splitlines()]


def strict_thumbnail(event: dict, thumbnails_root: Path) -> np.ndarray:
    """What an importer must do: accept the four base64 spellings and contained files only."""
    if "thumbnail_path" in event:
        root = thumbnails_root.resolve()
        path = (root / event["thumbnail_path"]).resolve()
        if root not in path.parents:
            raise ValueError("path escapes the thumbnails root")
        data = path.read_bytes()
    else:
        text = event["thumbnail_base64"]
        if text.startswith("data:"):
            text = text.split(",", 1)[1]
        text = "".join(text.split()).replace("-", "+").replace("_", "/")
        data = base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    image = Image.open(io.BytesIO(data))
    image.load()
    return np.array(image.convert("RGB"))


def test_events_file_is_sorted_with_unique_ids_and_one_thumbnail_each(small):
    events = read_events(small)
    assert len(events) == SMALL["n_events"] == small.events
    assert len({e["id"] for e in events}) == len(events)
    starts = [datetime.fromisoformat(e["started_at"]) for e in events]
    assert starts == sorted(starts)
    for event in events:
        assert set(event) - {"thumbnail_base64", "thumbnail_path"} == {"id", "camera_id", "started_at", "label"}
        assert ("thumbnail_base64" in event) != ("thumbnail_path" in event)
    assert len({e["camera_id"] for e in events}) >= 3


def test_every_thumbnail_decodes_except_the_listed_corrupted_ones(small):
    events = read_events(small)
    truth = json.loads(small.events_truth_path.read_text())
    assert set(truth["visitors"]) == {e["id"] for e in events}
    failed = {}
    for event in events:
        try:
            image = strict_thumbnail(event, small.thumbnails_dir)
        except (ValueError, OSError, binascii.Error) as exc:
            failed[event["id"]] = str(exc)
            continue
        assert image.shape == (120, 160, 3)
    assert sorted(failed) == truth["corrupted"] and len(failed) == small.corrupted == 5
    assert set(truth["corruption"].values()) == {"truncated_jpeg", "not_an_image", "invalid_base64",
                                                 "missing_file", "path_escape"}
    assert all(truth["visitors"][i] is None for i in truth["corrupted"])


def test_thumbnails_come_as_base64_in_every_spelling_and_as_files(small):
    events = read_events(small)
    spelled = json.loads(small.events_truth_path.read_text())["thumbnail_encoding"]
    kinds = Counter(spelled.values())
    assert {"base64", "data_uri", "base64url_nopad", "base64_wrapped", "file"} <= set(kinds)
    by_id = {e["id"]: e for e in events}
    assert all(by_id[i]["thumbnail_base64"].startswith("data:image/jpeg;base64,")
               for i, k in spelled.items() if k == "data_uri")
    assert all("\n" in by_id[i]["thumbnail_base64"] for i, k in spelled.items() if k == "base64_wrapped")
    assert all(not by_id[i]["thumbnail_base64"].endswith("=") and "+" not in by_id[i]["thumbnail_base64"]
               for i, k in spelled.items() if k == "base64url_nopad")
    files = [e for e in events if "thumbnail_path" in e and spelled[e["id"]] == "file"]
    assert 0.1 <= len(files) / len(events) <= 0.2 and len(files) == small.file_thumbnails
    for event in files:
        assert event["thumbnail_path"] == f"{event['camera_id']}/{event['id']}.jpg"
        assert (small.thumbnails_dir / event["thumbnail_path"]).is_file()


def hue_histogram(image: np.ndarray) -> np.ndarray:
    hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV)
    coloured = (hsv[..., 1] > CHROMA_S) & (hsv[..., 2] > 40)
    hist = np.bincount(hsv[..., 0][coloured] // 10, minlength=18).astype(np.float64)
    return hist / (np.linalg.norm(hist) or 1.0)


def test_each_visitor_has_its_own_colour(small):
    """Recurring visitors look alike across their events and unlike the other visitors."""
    truth = json.loads(small.events_truth_path.read_text())
    vectors = defaultdict(list)
    for event in read_events(small):
        name = truth["visitors"][event["id"]]
        if name is not None:
            vectors[name].append(hue_histogram(strict_thumbnail(event, small.thumbnails_dir)))
    assert len(vectors) == small.visitors == 5
    for name, own in vectors.items():
        own = np.array(own)
        others = np.array([v for other, vs in vectors.items() if other != name for v in vs])
        within = own @ own.T
        assert np.median(within[~np.eye(len(own), dtype=bool)]) > 0.7, name
        assert np.median(own @ others.T) < 0.2, name


# --- full size ---------------------------------------------------------------------------


def test_full_default_size(tmp_path):
    summary = write_demo_data(tmp_path)
    assert (summary.scenes, summary.frames, summary.assets) == (4, 4 * 192, 4)
    truth = json.loads(summary.ground_truth_path.read_text())
    assert all(len(s["frames"]) == 192 for s in truth["scenes"].values())
    events = read_events(summary)
    assert len(events) >= 200 and summary.events == len(events)
    assert {e["camera_id"] for e in events} == {"front_door", "driveway", "backyard", "garage"}
    days = {e["started_at"][:10] for e in events}
    assert len(days) >= 10 and min(days) >= "2026-10-20" and max(days) <= "2026-11-05"
    visitors = json.loads(summary.events_truth_path.read_text())["visitors"]
    per_visitor = Counter(v for v in visitors.values() if v is not None)
    assert len(per_visitor) == 5 and all(10 <= n <= 40 for n in per_visitor.values())
    cameras = defaultdict(set)
    for event in events:
        if visitors[event["id"]]:
            cameras[visitors[event["id"]]].add(event["camera_id"])
    assert all(len(c) >= 2 for c in cameras.values())
    text = str(summary)
    assert f"{len(events)} events" in text and "5 corrupted" in text and "4 scenes" in text
