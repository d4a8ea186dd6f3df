"""Scale-out: concurrent backfill workers on PostgreSQL, pgvector search, and what the
server backends cost against the local default. PostgreSQL is a real server started
here from the `pgserver` pip package (with pgvector).

Backfill workers (160x120 JPEG thumbnails as base64, the full ViT-B/32 architecture at
random weights, torch fp32; each worker pinned to one core, as a one-core pod, so 4
workers on 2 cores share them two by two):
  ours   - 1, 2 and 4 worker processes running `embed_next_batch` (claims with SKIP LOCKED)
           until no event is left; wall time from a common start signal (models loaded);
  report - events/s, speed-up over 1 worker and efficiency (speed-up / workers); this
           machine's core count bounds the speed-up (2 cores: at most ~2x).
  check  - every event embedded exactly once (rows == events == largest row id).

pgvector (clustered unit 512-d vectors, like image embeddings: 1,000 centres plus noise;
one event in 100 on a rare camera):
  ours   - `similar_events` on PostgreSQL, i.e. `nearest_events` through the HNSW index (m 16,
           ef_construction 64, ef_search 100), unfiltered and for the rare camera: recall@10
           against exact search in numpy and median latency; `nearest_events` alone too;
  anchor - exact search in PostgreSQL (sequential scan of the same column).

Overhead of the server backends against the local default (same machine):
  backfill  - one worker, the same events: PostgreSQL vs the SQLite file (target <= 1.2);
  warehouse - a project's partitions written and read back (8 scenes x 8 frames with
              vectors, clips, frames): DuckLake on PostgreSQL vs the DuckDB file.

    python benchmarks/scale.py [--quick] [--only workers|overhead|warehouse|pgvector ...] [--vectors N]
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timedelta
from pathlib import Path
from urllib.parse import parse_qs, urlparse

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from benchmarks.common import build_vit_b32  # noqa: E402

T0 = datetime(2026, 11, 1, 8, 0, 0)
BATCH = 16
TARGET_OVERHEAD = 1.2
TARGET_RECALL = 0.95
TARGET_MEDIAN_MS = 20.0
PARTS = ("workers", "overhead", "warehouse", "pgvector")


# ---------------------------------------------------------------- a worker (run as a child process)


def worker_main(url: str, model_dir: str, go_file: str, out_file: str, index: str = "0") -> int:
    # One core per worker, as a one-core pod: the embedder sizes its threads to the affinity.
    cores = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cores[int(index) % len(cores)]})
    from cv_assets.embedding import get_embedder
    from cv_assets.events.backfill import BackfillLimits, embed_next_batch
    from cv_assets.settings import EmbedderSettings
    from cv_assets.store import AppDatabase

    embedder = get_embedder(EmbedderSettings(model=model_dir, device="cpu", backend="torch", precision="fp32",
                                             fallback="none"))
    embedder.embed_sources([_jpeg(0)])  # load and warm the model before the clock starts
    db = AppDatabase(url)
    limits = BackfillLimits(max_batch=100, max_attempts=3, thumbnails_root=Path(tempfile.gettempdir()),
                            thumbnail_max_bytes=1_000_000)
    Path(out_file + ".ready").touch()
    while not os.path.exists(go_file):
        time.sleep(0.005)
    started, embedded = time.perf_counter(), 0
    while True:
        batch = embed_next_batch(db, embedder, limits, batch_size=BATCH)
        if not batch.outcomes:
            break
        embedded += batch.embedded
    Path(out_file).write_text(json.dumps({"embedded": embedded, "end": time.time(), "seconds": time.perf_counter() - started}))
    return 0


def _jpeg(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    image = (rng.integers(0, 255, (120, 160, 3))).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, "JPEG", quality=85)
    return buffer.getvalue()


# ---------------------------------------------------------------- helpers


def start_postgres(tmp: Path):
    import pgserver

    data = tempfile.mkdtemp(prefix="cv_assets_bench_pg_")
    server = pgserver.get_server(data, cleanup_mode="stop")
    return server, data


def pg_url(server, database: str, driver: str = "postgresql+psycopg") -> str:
    socket_dir = parse_qs(urlparse(server.get_uri()).query)["host"][0]
    return f"{driver}://postgres@/{database}?host={socket_dir}"


def fresh_database(server, name: str) -> str:
    server.psql(f"SET client_min_messages = warning; DROP DATABASE IF EXISTS {name} WITH (FORCE); "
                f"CREATE DATABASE {name};")
    return pg_url(server, name)


def add_events(url: str, count: int) -> None:
    from cv_assets.store import AppDatabase
    from cv_assets.store.models import Event

    db = AppDatabase(url)
    thumbs = [base64.b64encode(_jpeg(i)).decode() for i in range(16)]
    with db.write() as session:
        session.add_all(Event(id=f"evt-{i:06d}", camera_id=f"cam{i % 4}", started_at=T0 + timedelta(seconds=i),
                              thumbnail_base64=thumbs[i % len(thumbs)]) for i in range(count))
    db.dispose()


def vector_rows(url: str) -> tuple[int, int, int]:
    from sqlalchemy import func, select

    from cv_assets.store import AppDatabase
    from cv_assets.store.models import EventEmbedding

    db = AppDatabase(url)
    with db.read() as session:
        return tuple(session.execute(select(func.count(), func.count(EventEmbedding.event_id.distinct()),
                                            func.max(EventEmbedding.id))).one())


def run_workers(url: str, model_dir: Path, workers: int, tmp: Path) -> float:
    """Wall seconds for `workers` processes to embed every event, from a common start."""
    go = tmp / f"go-{workers}-{time.time_ns()}"
    outs = [tmp / f"out-{workers}-{i}-{time.time_ns()}.json" for i in range(workers)]
    procs = [subprocess.Popen([sys.executable, __file__, "--worker", url, str(model_dir), str(go), str(out), str(i)])
             for i, out in enumerate(outs)]
    while not all(Path(str(o) + ".ready").exists() for o in outs):
        if any(p.poll() not in (None, 0) for p in procs):
            raise SystemExit("a worker failed to start")
        time.sleep(0.05)
    start = time.time()
    go.touch()
    for proc in procs:
        if proc.wait() != 0:
            raise SystemExit("a worker failed")
    return max(json.loads(o.read_text())["end"] for o in outs) - start


# ---------------------------------------------------------------- the three parts


def bench_workers(server, model_dir: Path, events: int, tmp: Path) -> dict[int, float]:
    rates = {}
    for workers in (1, 2, 4):
        url = fresh_database(server, f"bench_workers_{workers}")
        add_events(url, events)
        seconds = run_workers(url, model_dir, workers, tmp)
        rows = vector_rows(url)
        assert rows == (events, events, events), f"not exactly once: {rows}"
        rates[workers] = events / seconds
        print(f"backfill {workers} worker(s): {events} events in {seconds:.2f} s = {rates[workers]:.1f} events/s "
              f"(exactly once: {rows[0]} rows, {rows[1]} events, largest id {rows[2]})")
    return rates


def bench_sqlite_vs_postgres(server, model_dir: Path, events: int, tmp: Path) -> float:
    timings = {}
    for name in ("sqlite", "postgresql"):
        seconds = []
        for repeat in range(2):  # interleaved, best of two
            if name == "sqlite":
                url = f"sqlite:///{tmp / f'overhead-{repeat}.sqlite'}"
            else:
                url = fresh_database(server, f"bench_overhead_{repeat}")
            add_events(url, events)
            seconds.append(run_workers(url, model_dir, 1, tmp))
        timings[name] = min(seconds)
        print(f"backfill on {name}: {events} events in {timings[name]:.2f} s")
    return timings["postgresql"] / timings["sqlite"]


def bench_warehouse(server, tmp: Path, repeats: int) -> float:
    import pandas as pd

    from cv_assets.store.warehouse import Warehouse

    rng = np.random.default_rng(0)
    scenes, frames = 8, 8
    tables = {
        "clips": pd.DataFrame({"project": "demo", "scene_index": range(scenes), "path": "c.mp4", "status": "ok"}),
        "sampled_frames": pd.DataFrame({
            "project": "demo", "scene_index": np.repeat(range(scenes), frames),
            "frame_index": np.tile(range(frames), scenes), "timestamp_sec": 0.5,
            "reasons": [["base"]] * (scenes * frames)}),
        "frame_embeddings": pd.DataFrame({
            "project": "demo", "scene_index": np.repeat(range(scenes), frames),
            "frame_index": np.tile(range(frames), scenes), "content_hash": "h", "model_version": "m",
            "embedding": list(rng.standard_normal((scenes * frames, 512)).astype(np.float32))}),
    }
    lake_url = pg_url(server, "bench_lake", "postgresql")
    server.psql("SET client_min_messages = warning; DROP DATABASE IF EXISTS bench_lake WITH (FORCE); "
                "CREATE DATABASE bench_lake;")
    backends = {"duckdb": Warehouse(tmp / "wh.duckdb"),
                "ducklake": Warehouse(tmp / "unused.duckdb", ducklake_catalog_url=lake_url,
                                      ducklake_data_path=str(tmp / "lake"))}
    timings: dict[str, list[float]] = {name: [] for name in backends}
    for _ in range(repeats):
        for name, wh in backends.items():  # interleaved
            started = time.perf_counter()
            wh.replace_partitions("demo", tables)
            for table in tables:
                wh.query(f"SELECT * FROM {table} WHERE project = ?", ["demo"])
            timings[name].append(time.perf_counter() - started)
    medians = {name: statistics.median(values) * 1000 for name, values in timings.items()}
    print(f"warehouse write+read of one project ({scenes}x{frames} frames): DuckDB file {medians['duckdb']:.1f} ms, "
          f"DuckLake {medians['ducklake']:.1f} ms (median of {repeats})")
    return medians["ducklake"] / medians["duckdb"]


RARE_CAMERA = "attic"  # one event in 100: a filter the HNSW scan alone rarely fills


def _clustered_unit_vectors(rng, count: int) -> np.ndarray:
    """Like image embeddings: 1,000 centres plus noise, unit norm, float32 throughout (1M x 512 is 2 GB)."""
    centres = rng.standard_normal((1000, 512), dtype=np.float32)
    data = rng.standard_normal((count, 512), dtype=np.float32)
    data *= 0.6
    data += centres[rng.integers(0, len(centres), count)]
    data /= np.linalg.norm(data, axis=1, keepdims=True)
    return data


def _load_vectors(db, stored: np.ndarray) -> None:
    """Events (one camera in 100 the rare one, a second apart) and their vectors by COPY, the
    HNSW index built once afterwards, then VACUUM ANALYZE as autovacuum would: without
    statistics the planner takes model_version for selective and sorts every row."""
    row_format = "[" + ",".join(["%.6g"] * stored.shape[1]) + "]"
    raw = db.engine.raw_connection()
    try:
        cursor = raw.cursor()
        cursor.execute("DROP INDEX ix_event_embeddings_vector_hnsw")
        with cursor.copy("COPY events (id, camera_id, started_at, created_at) FROM STDIN") as copy:
            for i in range(len(stored)):
                camera = RARE_CAMERA if i % 100 == 7 else f"cam{i % 4}"
                copy.write_row((f"v{i:07d}", camera, T0 + timedelta(seconds=i), T0))
        with cursor.copy("COPY event_embeddings (id, event_id, embedding, model_version, created_at) FROM STDIN") as copy:
            for i, vector in enumerate(stored):
                copy.write_row((i + 1, f"v{i:07d}", row_format % tuple(vector.tolist()), "m", T0))
        raw.commit()
        # The graph of 1M 512-d vectors needs ~3 GB: a smaller budget spills and builds far slower.
        cursor.execute(f"SET maintenance_work_mem = '{max(1024, len(stored) * 3 // 1000)}MB'")
        cursor.execute("CREATE INDEX ix_event_embeddings_vector_hnsw ON event_embeddings "
                       "USING hnsw (embedding_vector vector_cosine_ops)")
        raw.commit()
    finally:
        raw.close()
    with db.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        connection.exec_driver_sql("VACUUM ANALYZE events")
        connection.exec_driver_sql("VACUUM ANALYZE event_embeddings")


def _exact_top10(stored: np.ndarray, anchors: np.ndarray, allowed: np.ndarray | None = None) -> list[set[str]]:
    """Each anchor's 10 nearest stored vectors (itself left out; only `allowed` rows when
    given), 32 anchors per product so 1M vectors need ~128 MB of scores."""
    truth = []
    for first in range(0, len(anchors), 32):
        chunk = anchors[first:first + 32]
        scores = stored @ stored[chunk].T
        scores[chunk, np.arange(len(chunk))] = -np.inf
        if allowed is not None:
            scores[~allowed] = -np.inf
        for column in range(len(chunk)):
            truth.append({f"v{i:07d}" for i in np.argpartition(-scores[:, column], 10)[:10]})
    return truth


def _timed_searches(search, anchors, truth) -> tuple[float, float, float]:
    """(mean recall@10, median ms, share of queries with 10 results) of `search(anchor)`."""
    recalls, latencies, full = [], [], 0
    for anchor, expected in zip(anchors, truth):
        started = time.perf_counter()
        found = search(int(anchor))
        latencies.append((time.perf_counter() - started) * 1000)
        recalls.append(len(expected & set(found)) / 10)
        full += len(found) == 10
    return statistics.mean(recalls), statistics.median(latencies), full / len(anchors)


def bench_pgvector(server, count: int, queries: int, ef_sweep: list[int]) -> dict[str, float]:
    """Similar-event search through the code path the application runs: the public
    `similar_events` (event lookup, `nearest_events` on the HNSW index, the count of
    vectors searched) and `nearest_events` alone, unfiltered and for a rare camera, against
    exact search in numpy (recall) and in PostgreSQL (latency)."""
    from sqlalchemy import text

    from cv_assets.events.search import similar_events
    from cv_assets.store import AppDatabase
    from cv_assets.settings import EventsSettings
    from cv_assets.store.events import nearest_events, vector_extension_version

    url = fresh_database(server, "bench_vectors")
    db = AppDatabase(url)
    rng = np.random.default_rng(1)
    stored = _clustered_unit_vectors(rng, count)
    started = time.perf_counter()
    _load_vectors(db, stored)
    print(f"pgvector: {count} vectors loaded and indexed (HNSW m 16, ef_construction 64) in "
          f"{time.perf_counter() - started:.1f} s")
    with db.read() as session:
        version = ".".join(map(str, vector_extension_version(session)))
    anchors = rng.choice(count, queries, replace=False)
    rare = np.zeros(count, dtype=bool)
    rare[7::100] = True
    truth, rare_truth = _exact_top10(stored, anchors), _exact_top10(stored, anchors, rare)

    ef_search = EventsSettings().hnsw_ef_search  # what the application uses by default

    def nearest(anchor, ef=ef_search):
        with db.read() as session:
            rows = nearest_events(session, "m", stored[anchor], 10, exclude_event_id=f"v{anchor:07d}", ef_search=ef)
        return [row.event_id for row in rows]

    def similar(anchor, camera=None):
        result = similar_events(db, f"v{anchor:07d}", limit=10, min_similarity=-1.0, days=0, camera=camera,
                                ef_search=ef_search)
        return [match.event_id for match in result.matches]

    for ef in ef_sweep:  # recall against latency: what events.hnsw_ef_search trades
        recall, ms, _ = _timed_searches(lambda anchor: nearest(anchor, ef), anchors, truth)
        print(f"  ef_search {ef:4d}: nearest_events recall@10 {recall:.3f}, median {ms:.2f} ms")
    figures = {}
    figures["store_recall"], figures["store_ms"], _ = _timed_searches(nearest, anchors, truth)
    figures["recall"], figures["median_ms"], _ = _timed_searches(similar, anchors, truth)
    figures["rare_recall"], figures["rare_ms"], figures["rare_full"] = _timed_searches(
        lambda anchor: similar(anchor, RARE_CAMERA), anchors, rare_truth)
    exact_latencies = []
    with db.read() as session:
        session.execute(text("SET LOCAL enable_indexscan = off"))
        for anchor in anchors[: max(5, queries // 10)]:
            started = time.perf_counter()
            session.execute(text("SELECT event_id FROM event_embeddings ORDER BY embedding_vector <=> CAST(:q AS vector) "
                                 "LIMIT 10"), {"q": "[" + ",".join(map(str, stored[anchor].tolist())) + "]"}).all()
            exact_latencies.append((time.perf_counter() - started) * 1000)
    figures["exact_ms"] = statistics.median(exact_latencies)
    print(f"pgvector {version} @ {count} ({queries} queries, ef_search {ef_search}, exact recall from numpy):\n"
          f"  similar_events:            recall@10 {figures['recall']:.3f}, median {figures['median_ms']:.2f} ms "
          f"(with the event lookup and the count of vectors searched)\n"
          f"  nearest_events alone:      recall@10 {figures['store_recall']:.3f}, median {figures['store_ms']:.2f} ms\n"
          f"  camera with 1% of events:  recall@10 {figures['rare_recall']:.3f}, median {figures['rare_ms']:.2f} ms, "
          f"{figures['rare_full']:.0%} of queries with 10 results\n"
          f"  exact search in PostgreSQL (sequential scan): median {figures['exact_ms']:.1f} ms")
    db.dispose()
    return figures


def _size_label(count: int) -> str:
    return f"{count // 1_000_000}M" if count % 1_000_000 == 0 else f"{count // 1000}k"


def main() -> int:
    if sys.argv[1:2] == ["--worker"]:
        return worker_main(*sys.argv[2:7])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", choices=PARTS, action="append", help="run only these parts (repeatable)")
    parser.add_argument("--ef-sweep", type=lambda v: [int(x) for x in v.split(",")], default=[],
                        help="also measure nearest_events at these hnsw.ef_search values, e.g. 100,200,400")
    parser.add_argument("--vectors", type=int, help="pgvector table size (default 20k quick, 200k full; 1000000 for 1M)")
    args = parser.parse_args()
    parts = set(args.only or PARTS)
    events = 64 if args.quick else 256
    vectors = args.vectors or (20_000 if args.quick else 200_000)
    queries = 50 if args.quick else 200
    tmp = Path(tempfile.mkdtemp(prefix="cv_assets_scale_"))
    server, data_dir = start_postgres(tmp)
    ratios: list[str] = []
    try:
        # Worker scaling needs idle cores: the load average says how much else was running.
        print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}; "
              f"{events} events per backfill, batches of {BATCH}")
        model_dir = build_vit_b32(tmp / "vit-b32-random") if parts & {"workers", "overhead"} else None
        if "workers" in parts:
            rates = bench_workers(server, model_dir, events, tmp)
            cores = os.cpu_count() or 1
            for workers in (2, 4):
                speedup = rates[workers] / rates[1]
                print(f"workers {workers}: speed-up {speedup:.2f}x, efficiency {speedup / workers:.2f}")
                ratios.append(f"RATIO backfill_speedup_{workers}_workers {speedup:.2f} "
                              f"target >= {0.8 * min(workers, cores):.1f}")
        if "overhead" in parts:
            overhead = bench_sqlite_vs_postgres(server, model_dir, events, tmp)
            ratios.append(f"RATIO backfill_postgres_vs_sqlite {overhead:.2f} target <= {TARGET_OVERHEAD}")
        if "warehouse" in parts:
            warehouse_overhead = bench_warehouse(server, tmp, repeats=5 if args.quick else 20)
            ratios.append(f"RATIO warehouse_ducklake_vs_duckdb {warehouse_overhead:.2f} target <= {TARGET_OVERHEAD}")
        if "pgvector" in parts:
            figures = bench_pgvector(server, vectors, queries, args.ef_sweep)
            size = _size_label(vectors)
            ratios += [f"RATIO pgvector_recall_at_10_{size} {figures['recall']:.3f} target >= {TARGET_RECALL}",
                       f"RATIO pgvector_camera_filter_recall_at_10_{size} {figures['rare_recall']:.3f} "
                       f"target >= {TARGET_RECALL}",
                       f"RATIO pgvector_median_ms_{size} {figures['median_ms']:.2f} target <= {TARGET_MEDIAN_MS}",
                       f"RATIO pgvector_hnsw_vs_exact_{size} {figures['median_ms'] / figures['exact_ms']:.3f} "
                       "target <= 0.25"]
        print(f"load average at the end: {os.getloadavg()[0]:.1f}")
    finally:
        server.cleanup()
        shutil.rmtree(data_dir, ignore_errors=True)
        shutil.rmtree(tmp, ignore_errors=True)
    print("\n".join(ratios))
    return 0


if __name__ == "__main__":
    sys.exit(main())
