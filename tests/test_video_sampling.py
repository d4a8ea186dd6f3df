"""Key-frame selection (pure), motion measurement, and one-pass sampling of real clips."""

from __future__ import annotations

import gc
import hashlib
import math
import random
import weakref

import av
import cv2
import numpy as np
import pytest

from cv_assets.settings import CvAnalysisSettings, SamplingSettings
from cv_assets.video import (
    KeyFrameSelector,
    detect_motion_deltas,
    extract_frame,
    extract_frames,
    motion_ratio,
    sample_video_frames,
    select_key_frames,
)
from cv_assets.video import decoder as decoder_module
from cv_assets.video import sampler as sampler_module
from cv_assets.video.decoder import ClipDecoder
from cv_assets.video.pixels import frame_to_rgb
from cv_assets.video.errors import VideoInputError
from cv_assets.video.motion import shrink_luma
from helpers.video import write_clip

SAMPLING = SamplingSettings()
CV = CvAnalysisSettings()


def picks_by_index(picks):
    return {p.frame_index: p.reasons for p in picks}


# -- selection: a pure function of per-frame scores ------------------------------------------


def test_early_motion_never_pushes_out_base_and_last_frames():
    # 8 s at 25 fps with strong motion in the first 1.9 s: the naive "top 8 by motion" keeps
    # only early frames. Coverage must hold: 0, 2, 4, 6 s and the last frame.
    rng = random.Random(3)
    scores = [0.0] + [0.5 + 0.4 * rng.random() for _ in range(47)] + [0.0] * 152
    naive = sorted(range(200), key=lambda i: -scores[i])[:8]
    assert max(naive) < 48

    picks = select_key_frames(scores, fps=25)
    chosen = picks_by_index(picks)
    assert {i: chosen.get(i) for i in (0, 50, 100, 150, 199)} == {
        0: ("base",), 50: ("base",), 100: ("base",), 150: ("base",), 199: ("last",)
    }
    motion = [p for p in picks if p.reasons == ("motion",)]
    assert len(picks) == 5 + len(motion) <= 8
    assert 1 <= len(motion) and all(0.5 <= p.timestamp_sec <= 1.5 for p in motion)
    assert all(p.motion_score == scores[p.frame_index] > 0.15 for p in motion)
    times = sorted(p.timestamp_sec for p in picks)
    assert all(b - a >= 0.5 for a, b in zip(times, times[1:])), times


def test_motion_fills_the_budget_when_there_is_room():
    scores = [0.0] * 250  # 10 s at 25 fps
    for second in (1.0, 3.0, 5.0, 7.0, 8.6, 9.0):
        scores[round(second * 25)] = 0.5 + second / 100
    picks = select_key_frames(scores, fps=25)
    motion = [p.frame_index for p in picks if p.reasons == ("motion",)]
    # Three slots, strongest first: 9.0 s, then 8.6 s is skipped (0.4 s from 9.0 s), 7.0 s, 5.0 s.
    assert motion == [125, 175, 225]
    assert len(picks) == 8


def test_total_is_capped_at_max_frames_for_an_all_motion_clip():
    scores = [0.0] + [0.5 + (i % 7) * 0.01 for i in range(1, 300)]
    picks = select_key_frames(scores, fps=25, max_frames=8)
    assert len(picks) == 8
    assert {0, 50, 100, 150, 299} <= set(picks_by_index(picks))
    picks = select_key_frames(scores, fps=25, max_frames=6)
    assert len(picks) == 6


def test_motion_candidates_respect_min_spacing_and_go_strongest_first():
    fps = 25
    scores = [0.0] * 250  # 10 s
    scores[int(7.0 * fps)] = 0.9  # 7.00 s
    scores[int(7.2 * fps)] = 0.95  # 7.20 s, strongest, 0.2 s away from the 7.00 s one
    scores[int(8.6 * fps)] = 0.5
    scores[int(1.0 * fps)] = 0.3
    picks = select_key_frames(scores, fps=fps, max_frames=8, min_spacing_sec=0.5)
    motion = [p.frame_index for p in picks if "motion" in p.reasons]
    assert motion == [25, 180, 215]  # 7.0 s lost to its stronger neighbour at 7.2 s
    # Only one slot left: the strongest wins.
    picks = select_key_frames(scores, fps=fps, max_frames=6, min_spacing_sec=0.5)
    assert [p.frame_index for p in picks if "motion" in p.reasons] == [180]


def test_candidate_too_close_to_a_base_frame_is_skipped():
    scores = [0.0] * 200
    scores[55] = 0.99  # 2.2 s: 0.2 s from the 2 s base frame
    scores[75] = 0.40  # 3.0 s
    picks = select_key_frames(scores, fps=25, min_spacing_sec=0.5)
    motion = [p.frame_index for p in picks if "motion" in p.reasons]
    assert motion == [75]
    assert len(picks) == 6


@pytest.mark.parametrize("fps", [25, 30, 23.976, 60])
def test_base_offsets_use_the_real_frame_rate(fps):
    n = int(8 * fps)
    picks = select_key_frames([0.0] * n, fps=fps)
    expected = {round(t * fps) for t in (0, 2, 4, 6)}
    assert picks_by_index(picks) == {**{i: ("base",) for i in expected}, n - 1: ("last",)}


def test_short_clip_drops_offsets_past_its_end():
    picks = select_key_frames([0.0] * 90, fps=30)  # 3 s
    assert picks_by_index(picks) == {0: ("base",), 60: ("base",), 89: ("last",)}


def test_one_frame_clip_is_base_and_last():
    picks = select_key_frames([0.0], fps=25)
    assert [(p.frame_index, p.reasons, p.timestamp_sec) for p in picks] == [(0, ("base", "last"), 0.0)]


def test_still_clip_keeps_only_coverage_frames():
    picks = select_key_frames([0.0] * 400, fps=25)
    assert [p.frame_index for p in picks] == [0, 50, 100, 150, 399]
    assert all("motion" not in p.reasons for p in picks)


def test_variable_frame_rate_uses_timestamps():
    # 25 fps for 3 s, then 5 fps: frame numbers no longer map to seconds by one rate.
    timestamps = [i * 0.04 for i in range(75)] + [3.0 + k * 0.2 for k in range(26)]
    picks = select_key_frames([0.0] * len(timestamps), timestamps=timestamps)
    by_time = {p.frame_index: round(p.timestamp_sec, 3) for p in picks}
    assert by_time == {0: 0.0, 50: 2.0, 80: 4.0, 90: 6.0, 100: 8.0}


def test_base_frame_is_the_nearest_frame_even_before_the_offset():
    timestamps = [0.0, 1.0, 1.98, 2.5, 3.9, 4.3]
    picks = select_key_frames([0.0] * 6, timestamps=timestamps, base_offsets_sec=[0, 2, 4])
    assert picks_by_index(picks) == {0: ("base",), 2: ("base",), 4: ("base",), 5: ("last",)}


def test_base_frames_beyond_the_cap_are_still_kept():
    picks = select_key_frames([0.0] + [0.9] * 199, fps=25, max_frames=3)
    assert [p.frame_index for p in picks] == [0, 50, 100, 150, 199]


def test_include_last_false_and_zero_spacing():
    scores = [0.0] * 100
    scores[10] = scores[11] = scores[12] = 0.8
    picks = select_key_frames(scores, fps=25, include_last=False, min_spacing_sec=0.0, max_frames=5)
    assert [p.frame_index for p in picks] == [0, 10, 11, 12, 50]


def _reference_selection(scores, fps, spacing, max_frames, threshold=0.15, offsets=(0, 2, 4, 6)):
    """Independent statement of the rule, over the whole clip at once."""
    n = len(scores)
    times = [i / fps for i in range(n)]
    kept = set()
    for t in offsets:
        index = next((i for i in range(n) if times[i] >= t), None)
        if index is not None:
            kept.add(index - 1 if index > 0 and t - times[index - 1] < times[index] - t else index)
    kept.add(n - 1)
    winners = {}
    for i, s in enumerate(scores):
        if s > threshold:
            window = math.floor(times[i] / (spacing / 2))
            if window not in winners or s > scores[winners[window]]:
                winners[window] = i
    budget = max_frames - len(kept)
    for i in sorted(winners.values(), key=lambda i: (-scores[i], i)):
        if budget <= 0:
            break
        if i in kept or any(abs(times[i] - times[k]) < spacing for k in kept):
            continue
        kept.add(i)
        budget -= 1
    return sorted(kept)


@pytest.mark.parametrize("seed", range(40))
def test_bounded_streaming_pool_gives_the_same_picks_as_the_whole_clip(seed):
    rng = random.Random(seed)
    fps = rng.choice([24, 25, 30])
    n = rng.randint(1, 900)
    density = rng.choice([0.02, 0.2, 0.9, 1.0])
    scores = [0.0] + [rng.random() if rng.random() < density else 0.0 for _ in range(n - 1)]
    spacing = rng.choice([0.3, 0.5, 1.0])
    max_frames = rng.choice([5, 8, 12])
    picks = select_key_frames(scores, fps=fps, min_spacing_sec=spacing, max_frames=max_frames)
    assert [p.frame_index for p in picks] == _reference_selection(scores, fps, spacing, max_frames)


def test_selector_holds_a_bounded_number_of_frames():
    selector = KeyFrameSelector(
        base_offsets_sec=[0, 2, 4, 6], include_last=True, motion_threshold=0.15, max_frames=8, min_spacing_sec=0.5
    )

    class Payload:  # stands in for a decoded frame
        pass

    refs = []
    for i in range(3000):  # 2 minutes of nothing but motion
        payload = Payload()
        refs.append(weakref.ref(payload))
        selector.offer(i, i / 25, 0.2 + (i % 11) / 100, payload)
        del payload
    gc.collect()
    held = sum(r() is not None for r in refs)
    # base frames (4) + the most recent frame + the current window's best + the pool
    assert selector.pool_capacity == 40
    assert held <= 4 + 1 + 1 + selector.pool_capacity
    assert len(selector.finish()) == 8


# -- motion ---------------------------------------------------------------------------------------


def test_motion_ratio_counts_pixels_changed_by_more_than_the_delta():
    a = np.zeros((10, 10), np.uint8)
    b = a.copy()
    b[:2, :] = 31  # 20 pixels changed by 31
    b[2, :5] = 30  # not more than the delta
    assert motion_ratio(a, b, 30) == pytest.approx(0.20)
    assert motion_ratio(None, b, 30) == 0.0
    assert motion_ratio(a, np.zeros((5, 5), np.uint8), 30) == 1.0


def test_shrink_luma_keeps_aspect_and_averages():
    luma = np.tile(np.array([0, 255], np.uint8), (1080, 960))
    small = shrink_luma(luma[:, :1920], 160)
    assert small.shape == (90, 160) and small.flags["C_CONTIGUOUS"]
    tiny = np.arange(12, dtype=np.uint8).reshape(3, 4)
    assert shrink_luma(tiny, 160).tolist() == tiny.tolist()


def test_detect_motion_deltas_finds_the_cuts(tmp_path):
    clip = write_clip(tmp_path / "cuts.mp4", n_frames=60, cuts=[10, 35])
    deltas = detect_motion_deltas(clip)
    assert len(deltas) == 60 and deltas[0] == 0.0
    assert deltas[10] > 0.9 and deltas[35] > 0.9
    assert np.delete(deltas, [10, 35]).max() < 0.05


# -- sampling real clips ---------------------------------------------------------------------------


@pytest.mark.parametrize("fps", [25, 30])
def test_sampling_a_clip_reads_the_rate_from_the_stream(tmp_path, fps):
    clip = write_clip(tmp_path / "c.mp4", fps=fps, n_frames=8 * fps, cuts=[int(0.6 * fps), int(3.2 * fps)])
    result = sample_video_frames(clip, SAMPLING, CV)
    probe = result.probe
    assert (probe.status, probe.codec, probe.width, probe.height) == ("ok", "h264", 160, 90)
    assert probe.fps == pytest.approx(fps)
    assert probe.declared_frames == probe.decoded_frames == 8 * fps
    assert probe.duration_sec == pytest.approx(8.0)
    chosen = picks_by_index(result.frames)
    assert chosen == {
        0: ("base",), int(0.6 * fps): ("motion",), 2 * fps: ("base",), int(3.2 * fps): ("motion",),
        4 * fps: ("base",), 6 * fps: ("base",), 8 * fps - 1: ("last",),
    }
    for frame in result.frames:
        assert frame.image.shape == (90, 160, 3) and frame.image.dtype == np.uint8
        assert frame.timestamp_sec == pytest.approx(frame.frame_index / fps)
        assert frame.content_hash == hashlib.sha256(frame.image.tobytes()).hexdigest()
    assert result.motion_candidates == 2 and isinstance(result.motion_candidates, int)
    assert result.decode_ms > 0


def test_picked_frames_are_the_right_pictures(tmp_path):
    # Pattern switches at 30: frame 29 is dark, frame 30 (motion) is bright.
    clip = write_clip(tmp_path / "c.mp4", n_frames=75, cuts=[30])
    result = sample_video_frames(clip, SAMPLING, CV)
    by_index = {f.frame_index: f for f in result.frames}
    assert by_index[30].reasons == ("motion",)
    assert by_index[0].image.mean() < 80 and by_index[30].image.mean() > 150
    assert np.array_equal(by_index[30].image, extract_frame(clip, 30))


def test_short_one_frame_still_and_all_motion_clips(tmp_path):
    short = sample_video_frames(write_clip(tmp_path / "short.mp4", n_frames=75), SAMPLING, CV)
    assert picks_by_index(short.frames) == {0: ("base",), 50: ("base",), 74: ("last",)}

    single = sample_video_frames(write_clip(tmp_path / "one.mp4", n_frames=1), SAMPLING, CV)
    assert single.probe.status == "ok" and single.probe.decoded_frames == 1
    assert picks_by_index(single.frames) == {0: ("base", "last")}

    still = sample_video_frames(write_clip(tmp_path / "still.mp4", n_frames=175), SAMPLING, CV)
    assert still.motion_candidates == 0
    assert picks_by_index(still.frames) == {0: ("base",), 50: ("base",), 100: ("base",), 150: ("base",), 174: ("last",)}

    busy = sample_video_frames(write_clip(tmp_path / "busy.mp4", n_frames=200, all_motion=True), SAMPLING, CV)
    assert busy.motion_candidates == 199
    assert len(busy.frames) == 8
    assert {0, 50, 100, 150, 199} <= {f.frame_index for f in busy.frames}
    times = sorted(f.timestamp_sec for f in busy.frames)
    assert all(b - a >= 0.5 - 1e-9 for a, b in zip(times, times[1:]))


def test_variable_frame_rate_clip_keeps_stream_timestamps(tmp_path):
    pts = [i * 20 for i in range(100)] + [2000 + i * 250 for i in range(1, 21)]  # 50 fps for 2 s, then 4 fps
    clip = write_clip(tmp_path / "vfr.mkv", n_frames=len(pts), pts_ms=pts)
    result = sample_video_frames(clip, SAMPLING, CV)
    assert result.probe.status == "ok" and result.probe.decoded_frames == 120
    stamps = {f.frame_index: round(f.timestamp_sec, 6) for f in result.frames}
    # 2 s is nearest frame 99 (1.98 s); 4 s and 6 s fall on frames of the 4 fps part.
    assert stamps == {0: 0.0, 99: 1.98, 107: 4.0, 115: 6.0, 119: 7.0}


@pytest.mark.parametrize(
    "codec, pix_fmt, name",
    [
        ("libx264", "yuv444p", "odd.mp4"),
        ("mpeg4", "yuv420p", "odd.avi"),
        ("ffv1", "yuv420p", "odd.mkv"),
        ("ffv1", "yuv420p10le", "ten_bit.mkv"),  # luma is 16-bit: converted, not read from the plane
        ("libx264rgb", "rgb24", "rgb.mkv"),  # decodes to planar GBR, no luma plane at all
    ],
)
def test_odd_frame_sizes_and_pixel_formats(tmp_path, codec, pix_fmt, name):
    clip = write_clip(tmp_path / name, width=161, height=91, codec=codec, pix_fmt=pix_fmt, n_frames=60, cuts=[20])
    result = sample_video_frames(clip, SAMPLING, CV)
    assert result.probe.status == "ok", result.probe.reason
    assert (result.probe.width, result.probe.height) == (161, 91)
    assert all(f.image.shape == (91, 161, 3) for f in result.frames)
    assert picks_by_index(result.frames)[20] == ("motion",)


def test_large_frame_is_measured_on_a_small_luma(tmp_path):
    clip = write_clip(tmp_path / "wide.mp4", width=1280, height=720, n_frames=40, cuts=[20])
    result = sample_video_frames(clip, SAMPLING, CV)
    assert picks_by_index(result.frames) == {0: ("base",), 20: ("motion",), 39: ("last",)}
    assert result.frames[0].image.shape == (720, 1280, 3)


# -- one pass: one open, no seek, RGB only for what is kept ------------------------------------------


class _SpyContainer:
    def __init__(self, container, log):
        self._container, self._log = container, log

    def seek(self, *args, **kwargs):
        self._log.append("seek")
        raise AssertionError("the sampler must never seek")

    def demux(self, *args, **kwargs):
        self._log.append("demux")
        return self._container.demux(*args, **kwargs)

    def decode(self, *args, **kwargs):
        self._log.append("decode")
        return self._container.decode(*args, **kwargs)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._container.close()

    def __getattr__(self, name):
        return getattr(self._container, name)


@pytest.fixture
def decode_spy(monkeypatch):
    """Call the returned function (after writing clips) to start recording opens, seeks and frames."""
    log: list[str] = []
    real_open = av.open

    def spy_open(*args, **kwargs):
        log.append("open")
        return _SpyContainer(real_open(*args, **kwargs), log)

    real_frames = ClipDecoder.frames

    def counting_frames(self):
        for decoded in real_frames(self):
            log.append("frame")
            yield decoded

    def counting_rgb(frame):
        log.append("rgb")
        return frame_to_rgb(frame)

    def no_capture(*args, **kwargs):
        raise AssertionError("cv2.VideoCapture must not be used")

    def start() -> list[str]:
        monkeypatch.setattr(decoder_module.av, "open", spy_open)
        monkeypatch.setattr(ClipDecoder, "frames", counting_frames)
        monkeypatch.setattr(cv2, "VideoCapture", no_capture)
        monkeypatch.setattr(sampler_module, "frame_to_rgb", counting_rgb)
        return log

    return start


def test_sampling_opens_once_decodes_each_frame_once_and_never_seeks(tmp_path, decode_spy):
    clip = write_clip(tmp_path / "c.mp4", n_frames=250, cuts=[20, 75, 210])
    log = decode_spy()
    result = sample_video_frames(clip, SAMPLING, CV)
    assert result.probe.status == "ok"
    assert log.count("open") == 1
    assert log.count("demux") == 1 and "decode" not in log
    assert "seek" not in log
    assert log.count("frame") == 250
    assert log.count("rgb") == len(result.frames) == 8


def test_extract_frames_is_one_pass_and_stops_after_the_last_wanted(tmp_path, decode_spy):
    clip = write_clip(tmp_path / "c.mp4", n_frames=100, cuts=[40])
    out = tmp_path / "out"
    log = decode_spy()
    frames = extract_frames(clip, [40, 5, 39], out)
    assert [f.frame_index for f in frames] == [5, 39, 40]
    assert log.count("open") == 1 and "seek" not in log
    assert log.count("frame") == 41
    assert sorted(p.name for p in out.iterdir()) == ["frame_000005.jpg", "frame_000039.jpg", "frame_000040.jpg"]
    decoded_jpeg = cv2.cvtColor(cv2.imread(str(out / "frame_000040.jpg")), cv2.COLOR_BGR2RGB)
    assert np.abs(decoded_jpeg.astype(int) - frames[2].image.astype(int)).mean() < 4
    assert frames[2].content_hash == hashlib.sha256(frames[2].image.tobytes()).hexdigest()


def test_extract_frames_names_indices_past_the_end(tmp_path):
    clip = write_clip(tmp_path / "c.mp4", n_frames=10)
    with pytest.raises(VideoInputError, match=r"frames \[12, 99\] are past the end of the clip \(10 frames decoded\)"):
        extract_frames(clip, [3, 12, 99])


def test_extracted_and_sampled_pixels_match(tmp_path):
    clip = write_clip(tmp_path / "c.mp4", n_frames=60, cuts=[30])
    sampled = {f.frame_index: f for f in sample_video_frames(clip, SAMPLING, CV).frames}
    extracted = extract_frames(clip, sampled)
    assert {f.frame_index: f.content_hash for f in extracted} == {i: f.content_hash for i, f in sampled.items()}


# -- frame cache ---------------------------------------------------------------------------------------
