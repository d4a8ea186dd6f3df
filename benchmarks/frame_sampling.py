"""Key-frame sampling speed: our one-pass sampler beside the decode floor and the naive approach.

Makes two H.264 clips with PyAV/libx264 in a temp dir (720p 8 s; 1080p 60 s, or 12 s
with --quick), then measures on each, interleaved, median of N runs:

  sampler       cv_assets.video.sample_video_frames (decode once, motion on small luma,
                RGB only for the picked frames)
  floor PyAV    decode-only of the same clip with PyAV, frame threading on (the floor)
  floor ffmpeg  `ffmpeg -i clip -f null -` (imageio-ffmpeg's binary; includes process start)
  naive         cv2.VideoCapture full decode to BGR for motion, then one
                CAP_PROP_POS_FRAMES seek + read per picked frame

Targets: sampler <= 1.2x the PyAV floor; naive >= 2x the sampler.
Run from the repo root: python benchmarks/frame_sampling.py [--quick] [--runs N]
"""

from __future__ import annotations

import argparse
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import av
import cv2
import numpy as np

from cv_assets.settings import CvAnalysisSettings, SamplingSettings
from cv_assets.video import motion_ratio, sample_video_frames, select_key_frames

FPS = 25
SAMPLING = SamplingSettings()
CV = CvAnalysisSettings()


def make_clip(path: Path, width: int, height: int, seconds: float) -> Path:
    """A textured, panning picture with a moving block and a hard cut every 3.3 s (motion candidates)."""
    rng = np.random.default_rng(7)
    texture = cv2.GaussianBlur(rng.integers(0, 256, (height, width * 2), dtype=np.uint8), (0, 0), 3)
    texture = cv2.normalize(texture, None, 16, 235, cv2.NORM_MINMAX)
    n_frames = int(seconds * FPS)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=FPS)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"preset": "veryfast", "crf": "23"}
        chroma = np.full((height // 2, width), 128, np.uint8)
        for i in range(n_frames):
            scene = int(i / (3.3 * FPS))
            shift = (i * 6 + scene * width // 3) % width
            luma = np.ascontiguousarray(texture[:, shift : shift + width])
            if scene % 2:
                luma = 255 - luma
            x = (i * 11) % (width - height // 4)
            luma[height // 3 : height // 3 + height // 4, x : x + height // 4] = 235
            frame = av.VideoFrame.from_ndarray(np.vstack([luma, chroma]), format="yuv420p")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def run_sampler(path: Path) -> list[int]:
    result = sample_video_frames(path, SAMPLING, CV)
    if result.probe.status != "ok":
        raise RuntimeError(f"sampler failed on {path}: {result.probe.reason}")
    return [f.frame_index for f in result.frames]


def run_pyav_floor(path: Path) -> int:
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        return sum(1 for _ in container.decode(stream))


def run_ffmpeg_floor(path: Path, ffmpeg: str) -> None:
    subprocess.run(
        [ffmpeg, "-v", "error", "-nostdin", "-threads", "0", "-i", str(path), "-an", "-f", "null", "-"], check=True
    )


def run_naive(path: Path) -> list[int]:
    """What the seed did: decode everything with OpenCV, then seek back for each picked frame."""
    capture = cv2.VideoCapture(str(path))
    fps = capture.get(cv2.CAP_PROP_FPS)
    scores, previous = [], None
    while True:
        ok, frame = capture.read()
        if not ok:
            break
        gray = cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY)
        height = round(gray.shape[0] * SAMPLING.motion_width / gray.shape[1])
        small = cv2.resize(gray, (SAMPLING.motion_width, height), interpolation=cv2.INTER_AREA)
        scores.append(motion_ratio(previous, small, SAMPLING.motion_pixel_delta))
        previous = small
    picks = select_key_frames(
        scores,
        fps=fps,
        base_offsets_sec=SAMPLING.base_offsets_sec,
        include_last=SAMPLING.include_last,
        motion_threshold=CV.motion_delta_threshold,
        max_frames=CV.max_frames_per_clip,
        min_spacing_sec=SAMPLING.min_spacing_sec,
    )
    images = []
    for pick in picks:
        capture.set(cv2.CAP_PROP_POS_FRAMES, pick.frame_index)
        ok, frame = capture.read()
        if ok:
            images.append(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB))
    capture.release()
    return [p.frame_index for p in picks]


def _cpu_seconds() -> float:
    """CPU time of this process and its finished children (ffmpeg), all threads."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def timed(fn):
    """(wall seconds, CPU seconds, value). CPU time is the steadier figure on a shared machine."""
    cpu, started = _cpu_seconds(), time.perf_counter()
    value = fn()
    return time.perf_counter() - started, _cpu_seconds() - cpu, value


def measure(name: str, path: Path, runs: int, ffmpeg: str | None) -> tuple[dict[str, float], dict[str, float]]:
    methods = {
        "sampler": lambda: run_sampler(path),
        "floor_pyav": lambda: run_pyav_floor(path),
        "naive": lambda: run_naive(path),
    }
    if ffmpeg:
        methods["floor_ffmpeg"] = lambda: run_ffmpeg_floor(path, ffmpeg)
    times: dict[str, list[float]] = {k: [] for k in methods}
    cpu: dict[str, list[float]] = {k: [] for k in methods}
    values = {}
    run_pyav_floor(path)  # warm the page cache
    for _ in range(runs):  # interleaved, so load from other processes hits every method alike
        for key, fn in methods.items():
            seconds, cpu_seconds, values[key] = timed(fn)
            times[key].append(seconds)
            cpu[key].append(cpu_seconds)
    medians = {k: statistics.median(v) for k, v in times.items()}
    cpu_medians = {k: statistics.median(v) for k, v in cpu.items()}
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        info = f"{s.codec_context.width}x{s.codec_context.height}, {s.frames} frames at {float(s.average_rate):g} fps"
    frames = values["floor_pyav"]
    print(f"\n{name}: {path.name} ({info}, {path.stat().st_size / 1e6:.1f} MB), median of {runs} runs")
    for key, label in [
        ("sampler", "sampler (one pass)"),
        ("floor_pyav", "decode floor, PyAV threads"),
        ("floor_ffmpeg", "decode floor, ffmpeg -f null"),
        ("naive", "naive cv2 decode + seeks"),
    ]:
        if key in medians:
            runs_txt = ", ".join(f"{t:.3f}" for t in times[key])
            print(
                f"  {label:<30} {medians[key]:8.3f} s  {frames / medians[key]:7.1f} fps"
                f"  cpu {cpu_medians[key]:7.3f} s   wall runs [{runs_txt}]"
            )
    print(f"  picked by sampler: {values['sampler']}")
    print(f"  picked by naive:   {values['naive']}  (motion measured on OpenCV's BGR->gray, so scores differ slightly)")
    return medians, cpu_medians


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1080p clip of 12 s instead of 60 s")
    parser.add_argument("--runs", type=int, help="runs per method, median reported (default 5, 3 with --quick)")
    args = parser.parse_args()
    runs = max(3, args.runs or (3 if args.quick else 5))
    try:
        import imageio_ffmpeg

        ffmpeg = imageio_ffmpeg.get_ffmpeg_exe()
    except Exception as exc:  # the ffmpeg figure is informative only
        print(f"ffmpeg floor skipped: {exc}", file=sys.stderr)
        ffmpeg = None

    long_seconds = 12 if args.quick else 60
    with tempfile.TemporaryDirectory(prefix="bench-frames-") as tmp:
        started = time.perf_counter()
        clip_720 = make_clip(Path(tmp) / "clip_720p_8s.mp4", 1280, 720, 8)
        clip_1080 = make_clip(Path(tmp) / f"clip_1080p_{long_seconds}s.mp4", 1920, 1080, long_seconds)
        print(f"made clips in {time.perf_counter() - started:.1f} s (libx264 veryfast, crf 23, {FPS} fps)")
        results = {"720p": measure("720p", clip_720, runs, ffmpeg), "1080p": measure("1080p", clip_1080, runs, ffmpeg)}

    print()
    for name, (m, c) in results.items():
        if "floor_ffmpeg" in m:
            print(f"INFO sampler_vs_ffmpeg_{name} {m['sampler'] / m['floor_ffmpeg']:.2f}")
        print(f"INFO sampler_vs_decode_cpu_{name} {c['sampler'] / c['floor_pyav']:.2f}")
        print(f"INFO naive_vs_sampler_cpu_{name} {c['naive'] / c['sampler']:.2f}")
    for name, (m, _) in results.items():
        print(f"RATIO sampler_vs_decode_{name} {m['sampler'] / m['floor_pyav']:.2f} target <= 1.2")
        print(f"RATIO naive_vs_sampler_{name} {m['naive'] / m['sampler']:.2f} target >= 2")
    return 0


if __name__ == "__main__":
    sys.exit(main())
