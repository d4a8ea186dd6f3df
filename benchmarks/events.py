"""Security events: similar-event latency and embedding-backfill throughput.

Similar events (top 10, random unit 512-d vectors stored through the store code in a
temp SQLite database, at 10k and 100k events):
  ours   - `similar_events`: per-process index refreshed incrementally, one
           matrix-vector product + argpartition (median over many queries; the one-time
           index load is reported separately);
  anchor - the inherited approach: read every JSON row, json.loads, brute-force numpy
           (target < 100 ms at 10k);
  floor  - the matrix-vector product and argpartition alone on the in-memory matrix.

Backfill (160x120 JPEG thumbnails as base64, full ViT-B/32 architecture at random
weights, the same FLOPs as the real model):
  ours   - `embed_next_batch` (one scheduled run's work): SQLite select, base64 + JPEG
           decode, preprocessing, forward, JSON encoding and SQLite writes, per batch of
           events.max_batch;
  floor  - the embedder's forward pass alone on the same number of ready tensors;
  also   - the embedder's embed_sources alone on the same JPEG bytes (where a gap lies).
The three are interleaved batch by batch, so changes in machine load hit them alike.

Pixel bombs (peak memory of a backfill over hostile but small thumbnails: RGBA and
16-bit PNGs just under `events.thumbnail_max_pixels`, a 16 Mpx JPEG, a 64 Mpx PNG of
250 KB and a header declaring 900 Mpx; full ViT-B/32, run in a fresh child process):
  ours   - `run_event_backfill` over them: the peak resident size above the process
           after the model is loaded and warm (target < 1 GB), and the absolute peak;
  floor  - the same backfill over as many ordinary 160x120 thumbnails;
  also   - a full-size `load_image` of the 64 Mpx PNG (how a reference image is read for
           appearance matching), peak above the process (target < 1 GB).
A process's memory over a long scheduled backfill (thousands of events, many runs) is
the backfill benchmark's "peak RSS" line.

    python benchmarks/events.py [--quick] [--only similar|backfill|bombs]
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from datetime import datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import build_vit_b32, ready_batch  # noqa: E402

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402
from sqlalchemy import select  # noqa: E402

from cv_assets.events.backfill import BackfillLimits, embed_next_batch, run_event_backfill  # noqa: E402
from cv_assets.events.search import (  # noqa: E402
    clear_vector_indexes,
    similar_events,
    snapshot_path,
    top_k,
    vector_index,
)
from cv_assets.store import AppDatabase  # noqa: E402
from cv_assets.store.events import (  # noqa: E402
    EMBEDDINGS,
    EVENTS,
    count_remaining,
    insert_events,
    write_event_embeddings,
)

T0 = datetime(2026, 9, 1)
SPAN = timedelta(days=60)
CAMERAS = [f"camera_{i}" for i in range(8)]
VERSION = "bench-random-v1"


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---------------------------------------------------------------- similar events


def grow_store(db: AppDatabase, start: int, stop: int, rng: np.random.Generator, total: int) -> float:
    """Add events start..stop-1 with random unit vectors; returns seconds spent."""
    began = time.perf_counter()
    step = SPAN / total
    for chunk_start in range(start, stop, 5000):
        chunk = range(chunk_start, min(stop, chunk_start + 5000))
        vectors = rng.standard_normal((len(chunk), 512)).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        with db.write() as session:
            insert_events(session, [
                {"id": f"bench-{i:07d}", "camera_id": CAMERAS[i % len(CAMERAS)], "started_at": T0 + i * step,
                 "label": "person", "thumbnail_base64": "-"} for i in chunk])
            write_event_embeddings(session, VERSION, {f"bench-{i:07d}": v for i, v in zip(chunk, vectors)})
    return time.perf_counter() - began


def brute_force_json(db: AppDatabase, event_id: str, limit: int = 10) -> list[str]:
    """The inherited way: decode every stored JSON vector on every query."""
    with db.read() as session:
        rows = session.execute(
            select(EMBEDDINGS.c.event_id, EMBEDDINGS.c.embedding).where(EMBEDDINGS.c.model_version == VERSION)
        ).all()
    ids = [row[0] for row in rows]
    matrix = np.array([json.loads(row[1]) for row in rows], dtype=np.float32)
    scores = matrix @ matrix[ids.index(event_id)]
    scores[ids.index(event_id)] = -np.inf
    return [ids[i] for i in np.argsort(-scores)[:limit]]


def measure_similar(db: AppDatabase, n: int, queries: int, anchor_runs: int, rng) -> dict:
    ids = [f"bench-{i:07d}" for i in rng.integers(0, n, queries + 1)]
    shutil.rmtree(snapshot_path(db, VERSION).parent, ignore_errors=True)
    clear_vector_indexes()
    began = time.perf_counter()
    similar_events(db, ids[0], limit=10, min_similarity=-1.0, days=30)
    warmup = time.perf_counter() - began  # JSON parsing of every row, plus writing the snapshot
    clear_vector_indexes()  # as a new process would start
    began = time.perf_counter()
    similar_events(db, ids[0], limit=10, min_similarity=-1.0, days=30)
    warmup_snapshot = time.perf_counter() - began
    assert vector_index(db, VERSION).loaded_from_snapshot
    index = vector_index(db, VERSION)
    times, floor = [], []
    for i, event_id in enumerate(ids[1:]):
        # Interleaved (alternating order) so a change in machine load hits both sides alike.
        for side in ((0, 1) if i % 2 else (1, 0)):
            began = time.perf_counter()
            if side == 0:
                result = similar_events(db, event_id, limit=10, min_similarity=-1.0, days=30)
                times.append(time.perf_counter() - began)
                assert len(result.matches) == 10 and event_id not in [m.event_id for m in result.matches]
            else:
                top_k(index.vectors @ index.vectors[index.position[event_id]], 11)
                floor.append(time.perf_counter() - began)
    assert index.n == n and index.full_loads == 0
    index_mb = (index.matrix.nbytes + index.row_ids.nbytes + index.started_us.nbytes) / 2**20
    rss_before_anchor = peak_rss_mb()  # the anchor's Python lists of floats dwarf everything else
    anchor = []
    for event_id in ids[1:anchor_runs + 1]:
        began = time.perf_counter()
        expected = brute_force_json(db, event_id)
        anchor.append(time.perf_counter() - began)
        got = similar_events(db, event_id, limit=10, min_similarity=-1.0, days=0)
        assert [m.event_id for m in got.matches] == expected, "index and brute force disagree"
    return {
        "ours_ms": statistics.median(times) * 1e3,
        "ours_p95_ms": float(np.percentile(times, 95)) * 1e3,
        "floor_ms": statistics.median(floor) * 1e3,
        "anchor_ms": statistics.median(anchor) * 1e3 if anchor else None,
        "warmup_s": warmup,
        "warmup_snapshot_s": warmup_snapshot,
        "index_mb": index_mb,
        "rss_before_anchor_mb": rss_before_anchor,
    }


def run_similar(quick: bool) -> float:
    rng = np.random.default_rng(0)
    queries = 100 if quick else 300
    with tempfile.TemporaryDirectory(prefix="bench-events-") as tmp:
        db = AppDatabase(f"sqlite:///{Path(tmp) / 'events.sqlite'}")
        sizes = (10_000, 100_000)
        figures = {}
        stored = 0
        for n in sizes:
            seconds = grow_store(db, stored, n, rng, sizes[-1])
            stored = n
            print(f"stored {n} events + JSON vectors in {seconds:.1f}s (through write_event_embeddings)")
            anchor_runs = 3 if n <= 10_000 else (0 if quick else 1)
            figures[n] = measure_similar(db, n, queries, anchor_runs, rng)
            f = figures[n]
            anchor = f"{f['anchor_ms']:.0f} ms" if f["anchor_ms"] is not None else "skipped (--quick)"
            print(f"similar top-10 @ {n:>6}: ours median {f['ours_ms']:.2f} ms (p95 {f['ours_p95_ms']:.2f}) | "
                  f"in-memory floor {f['floor_ms']:.2f} ms | JSON brute force (anchor) {anchor} | "
                  f"one-time index load {f['warmup_s']:.1f}s from JSON, {f['warmup_snapshot_s']:.2f}s from snapshot")
            print(f"  index in memory {f['index_mb']:.0f} MB; peak RSS {f['rss_before_anchor_mb']:.0f} MB "
                  "before the anchor ran")
        print(f"  anchor target at 10k: < 100 ms -> brute force {figures[10_000]['anchor_ms']:.0f} ms, "
              f"ours {figures[10_000]['ours_ms']:.2f} ms")
        print(f"  peak RSS after similar: {peak_rss_mb():.0f} MB")
        clear_vector_indexes()
        db.dispose()
    return figures[100_000]["ours_ms"]


# ---------------------------------------------------------------- backfill throughput


def thumbnail_b64(rng: np.random.Generator) -> str:
    """A 160x120 camera-like JPEG: textured background with a few coloured blobs."""
    image = rng.integers(60, 120, (120, 160, 3), dtype=np.uint8)
    for _ in range(3):
        y, x = rng.integers(0, 100), rng.integers(0, 140)
        image[y:y + 20, x:x + 20] = rng.integers(0, 255, 3, dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, "JPEG", quality=85)
    return base64.b64encode(buffer.getvalue()).decode()


def forward_floor(embedder, n: int) -> float:
    size = embedder.preprocess_config.crop_height
    batches = [ready_batch(embedder, min(embedder.batch_size, n - s), size) for s in range(0, n, embedder.batch_size)]
    began = time.perf_counter()
    for pixels in batches:
        embedder.forward(pixels)
    return time.perf_counter() - began


def run_backfill(quick: bool) -> float:
    from cv_assets.embedding import get_embedder
    from cv_assets.settings import EmbedderSettings, EventsSettings

    n = 200 if quick else 1000
    events = EventsSettings()
    rng = np.random.default_rng(1)
    with tempfile.TemporaryDirectory(prefix="bench-backfill-") as tmp:
        tmp = Path(tmp)
        model_dir = build_vit_b32(tmp / "vit-b32-random")
        embedder = get_embedder(EmbedderSettings(model=str(model_dir), device="cpu", fallback="none"))
        began = time.perf_counter()
        embedder.ensure_ready()
        print(f"ViT-B/32 (random weights) loaded in {time.perf_counter() - began:.1f}s; "
              f"model_version {embedder.model_version}; embedder batch {embedder.batch_size}")
        # First-call set-up (kernels are prepared per batch shape) at the full batch size,
        # excluded from every side.
        warm = [base64.b64decode(thumbnail_b64(rng)) for _ in range(embedder.batch_size + 4)]
        embedder.embed_sources(warm)
        forward_floor(embedder, embedder.batch_size + 4)

        db = AppDatabase(f"sqlite:///{tmp / 'events.sqlite'}")
        with db.write() as session:
            insert_events(session, [
                {"id": f"thumb-{i:05d}", "camera_id": CAMERAS[i % len(CAMERAS)], "started_at": T0 + timedelta(seconds=i),
                 "label": "person", "thumbnail_base64": thumbnail_b64(rng)} for i in range(n)])
        with db.read() as session:
            encoded = [base64.b64decode(t) for t in
                       session.scalars(select(EVENTS.c.thumbnail_base64).order_by(EVENTS.c.started_at))]
        limits = BackfillLimits(events.max_batch, events.max_attempts, tmp / "thumbs", events.thumbnail_max_bytes,
                                events.thumbnail_max_pixels)
        rss_before = peak_rss_mb()
        # Batch by batch, the three sides interleaved in rotating order, so a change in machine
        # load hits all of them alike: ours (one scheduled run's work: select, base64, decode,
        # embed, JSON, write), the embedder alone on the same bytes, the forward pass alone.
        seconds = {"ours": 0.0, "embedder": 0.0, "forward": 0.0}
        embedded = batches = 0
        for start in range(0, n, events.max_batch):
            count = min(events.max_batch, n - start)
            sides = ["ours", "embedder", "forward"]
            for side in sides[batches % 3:] + sides[:batches % 3]:
                if side == "forward":
                    seconds[side] += forward_floor(embedder, count)
                    continue
                began = time.perf_counter()
                if side == "ours":
                    embedded += embed_next_batch(db, embedder, limits, mode="missing").embedded
                else:
                    assert len(embedder.embed_sources(encoded[start:start + count]).ok) == count
                seconds[side] += time.perf_counter() - began
            batches += 1
        with db.read() as session:
            remaining = count_remaining(session, embedder.model_version, events.max_attempts)
        assert embedded == n and remaining == 0
        ours, floor, alone = seconds["ours"], seconds["forward"], seconds["embedder"]
        ours_rate, floor_rate = n / ours, n / floor
        print(f"backfill {n} thumbnails (160x120 JPEG, base64) in {batches} batches of {events.max_batch}: "
              f"ours {ours:.1f}s = {ours_rate:.1f} images/s | forward-only floor {floor:.1f}s = "
              f"{floor_rate:.1f} images/s")
        print(f"  the embedder's embed_sources alone on the same bytes: {alone:.1f}s = {n / alone:.1f} images/s "
              f"({floor / alone:.3f}x the floor); ours is {alone / ours:.3f}x the embedder alone")
        print(f"  peak RSS: {rss_before:.0f} MB before the backfill, {peak_rss_mb():.0f} MB after")
        db.dispose()
    return ours_rate / floor_rate


# ---------------------------------------------------------------- pixel bombs


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def _header_only_png(width: int, height: int) -> bytes:
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 6, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def bomb_thumbnails(max_pixels: int) -> dict[str, bytes]:
    """Small files that decode to a lot of pixels: the shapes an adversarial review used."""
    side = int(max_pixels ** 0.5)  # just under the cap
    gradient = Image.linear_gradient("L").resize((side, side))
    rgba = Image.merge("RGBA", (gradient, gradient.transpose(Image.Transpose.ROTATE_90), gradient, gradient))
    jpeg = io.BytesIO()
    Image.merge("RGB", (gradient,) * 3).save(jpeg, "JPEG", quality=80)
    return {
        "rgba-png-under-cap": _png(rgba),
        "16bit-png-under-cap": _png(gradient.convert("I").point(lambda v: v * 256).convert("I;16")),
        "jpeg-under-cap": jpeg.getvalue(),
        "rgba-png-64mpx": _png(Image.new("RGBA", (7999, 7999), (200, 30, 30, 128))),
        "header-900mpx": _header_only_png(30_000, 30_000),
    }


def _vm_kb(field: str) -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field + ":"))


def _bomb_child(quick: bool, model_dir: str, results) -> None:
    """In a fresh process: backfill ordinary thumbnails, then bombs; peak RSS of each."""
    from cv_assets.embedding import get_embedder
    from cv_assets.settings import EmbedderSettings, EventsSettings

    events = EventsSettings()
    copies = 1 if quick else 3
    rng = np.random.default_rng(2)
    with tempfile.TemporaryDirectory(prefix="bench-bombs-") as tmp:
        tmp = Path(tmp)
        embedder = get_embedder(EmbedderSettings(model=model_dir, device="cpu", fallback="none"))
        embedder.embed_sources([base64.b64decode(thumbnail_b64(rng)) for _ in range(4)])  # load + warm up
        bombs = bomb_thumbnails(events.thumbnail_max_pixels)
        sizes = {name: len(data) for name, data in bombs.items()}
        limits = BackfillLimits(events.max_batch, events.max_attempts, tmp / "thumbs", events.thumbnail_max_bytes,
                                events.thumbnail_max_pixels)
        figures = {}
        for kind in ("ordinary", "bombs"):
            db = AppDatabase(f"sqlite:///{tmp / (kind + '.sqlite')}")
            if kind == "ordinary":
                payloads = [thumbnail_b64(rng) for _ in range(len(bombs) * copies)]
            else:
                payloads = [base64.b64encode(data).decode() for data in bombs.values()] * copies
            with db.write() as session:
                insert_events(session, [
                    {"id": f"{kind}-{i:03d}", "camera_id": "cam", "started_at": T0 + timedelta(seconds=i),
                     "label": None, "thumbnail_base64": payload} for i, payload in enumerate(payloads)])
            del payloads
            with open("/proc/self/clear_refs", "w") as refs:
                refs.write("5")  # VmHWM := current RSS
            baseline = _vm_kb("VmRSS")
            began = time.perf_counter()
            report = run_event_backfill(db, embedder, limits)
            figures[kind] = {
                "baseline_mb": baseline / 1024, "peak_mb": _vm_kb("VmHWM") / 1024,
                "growth_mb": (_vm_kb("VmHWM") - baseline) / 1024, "seconds": time.perf_counter() - began,
                "embedded": report.embedded, "failed": report.failed,
                "failures": sorted({reason.split(": ", 1)[1][:170] for reason in report.failures.values()}),
            }
            db.dispose()
        # A reference image is also decoded at full size (appearance matching crops it):
        # the same 64 Mpx RGBA PNG through load_image with no reduction.
        from cv_assets.embedding.images import load_image

        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
        baseline = _vm_kb("VmRSS")
        began = time.perf_counter()
        shape = load_image(bombs["rgba-png-64mpx"], "reference").shape
        figures["reference_full_decode"] = {
            "baseline_mb": baseline / 1024, "peak_mb": _vm_kb("VmHWM") / 1024,
            "growth_mb": (_vm_kb("VmHWM") - baseline) / 1024, "seconds": time.perf_counter() - began,
            "shape": shape}
        results.put({"figures": figures, "sizes": sizes})


def run_bombs(quick: bool) -> float:
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    with tempfile.TemporaryDirectory(prefix="bench-bombs-model-") as tmp:
        # Built here, so the child holds only the loaded model, as a backfill run would.
        model_dir = build_vit_b32(Path(tmp) / "vit")
        child = context.Process(target=_bomb_child, args=(quick, str(model_dir), results))
        child.start()
        outcome = results.get()
        child.join()
    for name, size in outcome["sizes"].items():
        print(f"bomb thumbnail {name}: {size / 1024:.0f} KB")
    reference = outcome["figures"].pop("reference_full_decode")
    for kind, f in outcome["figures"].items():
        print(f"backfill over {kind:>8}: {f['embedded']} embedded, {f['failed']} refused in {f['seconds']:.1f}s; "
              f"RSS {f['baseline_mb']:.0f} MB with the model loaded, peak {f['peak_mb']:.0f} MB "
              f"(+{f['growth_mb']:.0f} MB)")
        for reason in f["failures"]:
            print(f"  refused: {reason}")
    print(f"full-size decode of the 64 Mpx RGBA PNG (a reference image) to {reference['shape']}: "
          f"{reference['seconds']:.1f}s, peak +{reference['growth_mb']:.0f} MB (the 64 Mpx RGB result alone is 192 MB)")
    return outcome["figures"]["bombs"]["growth_mb"], reference["growth_mb"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer thumbnails and queries")
    parser.add_argument("--only", choices=("similar", "backfill", "bombs"), help="run one part only")
    args = parser.parse_args()
    print(f"load average at start: {', '.join(f'{x:.1f}' for x in os.getloadavg())} on {os.cpu_count()} cores "
          "(other work on the machine slows both sides of every comparison)")
    # Backfill first, so its peak memory is not the 100k index's.
    bomb_growth_mb, reference_growth_mb = run_bombs(args.quick) if args.only in (None, "bombs") else (None, None)
    backfill_ratio = run_backfill(args.quick) if args.only in (None, "backfill") else None
    similar_ms = run_similar(args.quick) if args.only in (None, "similar") else None
    print(f"load average at end: {', '.join(f'{x:.1f}' for x in os.getloadavg())}")
    if similar_ms is not None:
        print(f"RATIO similar_ms_100k {similar_ms:.2f} target <= 20")
    if backfill_ratio is not None:
        print(f"RATIO backfill_vs_forward {backfill_ratio:.3f} target >= 0.85")
    if bomb_growth_mb is not None:
        print(f"RATIO bomb_backfill_peak_growth_mb {bomb_growth_mb:.0f} target < 1024")
        print(f"RATIO bomb_reference_decode_peak_growth_mb {reference_growth_mb:.0f} target < 1024")


if __name__ == "__main__":
    main()
