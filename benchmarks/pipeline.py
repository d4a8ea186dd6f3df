"""The demo project (4 scenes) materialised through Dagster vs the sum of its floors.

Floors, measured in the same run on the same machine:
  decode   decode-only of the project's clips with PyAV (frame threading on);
  forward  the embedder's forward passes alone, on ready tensors, for as many images
           as the pipeline embedded (reference images, sampled frames, region crops).
It also runs the same job under the multiprocess executor (`runs.executor: multiprocess`:
every step in its own process, reading what the step before stored); the in-process
executor is the default because the model loads once per run.

The embedder is the full ViT-B/32 architecture with random weights: the same FLOPs as
the real model, whose weights cannot be downloaded here. Random weights make the
references look alike, so clip_match fits boxes for assets that are not there: the
forwards per frame printed here are not the demo's (see benchmarks/quality.py).

    python benchmarks/pipeline.py [--quick]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import av  # noqa: E402
import yaml  # noqa: E402
from dagster import DagsterInstance, execute_job, reconstructable  # noqa: E402

from benchmarks.common import build_vit_b32, ready_batch  # noqa: E402
from cv_assets.definitions import project_job_from_env  # noqa: E402

# The configuration before the speed work: torch fp32 and the exhaustive crop grid.
OLD = {"embedder": {"backend": "torch", "precision": "fp32"},
       "appearances": {"coarse_to_fine": False, "reuse_unchanged_regions": False}}
NEW: dict = {}  # the defaults: backend/precision auto, coarse-to-fine clip_match


def write_config(store: Path, demo: Path, model_dir: Path, variant: dict, executor: str = "in_process",
                 max_frames: int | None = None) -> Path:
    store.mkdir(parents=True)
    config = {
        "runs": {"executor": executor},
        "cv_analysis": {"max_frames_per_clip": max_frames} if max_frames else {},
        "storage": {"database_url": "sqlite:///app.sqlite", "duckdb_path": "wh.duckdb", "frames_dir": "frames",
                    "reports_dir": "reports", "projects_root": str(demo / "projects"),
                    "thumbnails_root": str(demo / "thumbnails")},
        "embedder": {"model": str(model_dir), "fallback": "none", "device": "cpu",
                     **variant.get("embedder", {})},
        "appearances": variant.get("appearances", {}),
    }
    path = store / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def run_in_process(config: Path) -> tuple[float, int, float]:
    from cv_assets.definitions import build_definitions
    from cv_assets.settings import load_settings

    defs = build_definitions(load_settings(config))
    instance = DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("projects", ["demo"])
    started = time.perf_counter()
    result = defs.resolve_job_def("project_reprocess_job").execute_in_process(partition_key="demo", instance=instance)
    elapsed = time.perf_counter() - started
    if not result.success:
        raise SystemExit("in-process pipeline run failed")
    events = result.get_asset_materialization_events()
    return elapsed, images_embedded(events), metadata_value(events, "asset_appearances", "forwards_per_frame")


def metadata_value(events, asset_name: str, key: str):
    for event in events:
        mat = event.event_specific_data.materialization
        if mat.asset_key.path[-1] == asset_name and key in mat.metadata:
            return mat.metadata[key].value
    return float("nan")


def run_multiprocess(config: Path) -> float:
    os.environ["CV_ASSETS_CONFIG"] = str(config)
    home = config.parent / "dagster_home"
    home.mkdir()
    with DagsterInstance.local_temp(str(home)) as instance:
        instance.add_dynamic_partitions("projects", ["demo"])
        started = time.perf_counter()
        with execute_job(reconstructable(project_job_from_env), instance=instance, tags={"dagster/partition": "demo"}) as result:
            elapsed = time.perf_counter() - started
            if not result.success:
                raise SystemExit("multiprocess pipeline run failed")
    return elapsed


def images_embedded(events) -> int:
    """Images that went through the model: reference images, frames and region crops."""
    total = 0
    for event in events:
        mat = event.event_specific_data.materialization
        name, md = mat.asset_key.path[-1], mat.metadata
        if name in ("reference_embeddings", "frame_embeddings"):
            total += int(md["embedded"].value)
        if name == "asset_appearances":
            total += int(md["regions_embedded"].value)
    return total


def decode_floor(clips: list[Path]) -> float:
    started = time.perf_counter()
    for clip in clips:
        with av.open(str(clip)) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            for _ in container.decode(stream):
                pass
    return time.perf_counter() - started


def forward_floor(model_dir: Path, n_images: int, batch: int, variant: dict) -> float:
    """The forward passes alone of `n_images` in the variant's backend and precision."""
    from cv_assets.embedding import get_embedder
    from cv_assets.settings import EmbedderSettings

    embedder = get_embedder(EmbedderSettings(model=str(model_dir), device="cpu", batch_size=batch,
                                             **variant.get("embedder", {})))
    embedder.ensure_ready()  # load and warm up outside the timing
    pixels = ready_batch(embedder, batch, embedder.preprocess_config.crop_height)
    embedder.forward(pixels[:2])
    started = time.perf_counter()
    for start in range(0, n_images, batch):
        embedder.forward(pixels[: min(batch, n_images - start)])
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="3 s demo scenes, 3 key frames each, one repeat")
    parser.add_argument("--repeats", type=int, default=None, help="runs per measurement (default 3, quick 1)")
    parser.add_argument("--skip-multiprocess", action="store_true", help="only the in-process executor")
    args = parser.parse_args()
    repeats = args.repeats or (1 if args.quick else 3)

    from cv_assets.demo import write_demo_data
    from cv_assets.settings import load_settings

    with tempfile.TemporaryDirectory(prefix="cv_assets_bench_") as tmp:
        root = Path(tmp)
        write_demo_data(root / "demo", scene_seconds=3.0 if args.quick else 8.0, n_events=30)
        model_dir = build_vit_b32(root / "vit-b32")
        clips = sorted((root / "demo" / "projects" / "demo" / "clips").glob("*.mp4"))
        batch = load_settings(write_config(root / "probe", root / "demo", model_dir, OLD)).embedder.batch_size

        frames = 3 if args.quick else None  # both configurations embed the same frames
        old, new, decode, forward, new_forward = [], [], [], [], []
        for i in range(repeats):  # interleaved, so load on the shared machine hits both alike
            old.append(run_in_process(write_config(root / f"old{i}", root / "demo", model_dir, OLD, max_frames=frames)))
            new.append(run_in_process(write_config(root / f"new{i}", root / "demo", model_dir, NEW, max_frames=frames)))
            decode.append(decode_floor(clips))
            forward.append(forward_floor(model_dir, old[-1][1], batch, OLD))
            new_forward.append(forward_floor(model_dir, new[-1][1], batch, NEW))
            print(f"run {i + 1}/{repeats}: old {old[-1][0]:.1f}s ({old[-1][1]} images, {old[-1][2]:.0f} forwards/frame)  "
                  f"new {new[-1][0]:.1f}s ({new[-1][1]} images, {new[-1][2]:.0f} forwards/frame)  "
                  f"decode {decode[-1]:.2f}s  forward old {forward[-1]:.1f}s new {new_forward[-1]:.1f}s")

        o, n = statistics.median(r[0] for r in old), statistics.median(r[0] for r in new)
        d, f, nf = statistics.median(decode), statistics.median(forward), statistics.median(new_forward)
        runtime = load_settings(write_config(root / "probe_new", root / "demo", model_dir, NEW)).embedder
        from cv_assets.embedding.runtime import choose_runtime, probe_capabilities

        chosen = choose_runtime("cpu", runtime.backend, runtime.precision, probe_capabilities())
        print(f"\ndemo project: {len(clips)} scenes")
        print(f"  old configuration (torch fp32, exhaustive grid)   {o:8.1f} s, {old[-1][2]:.0f} forwards/frame")
        print(f"  new default (backend/precision auto, coarse-to-fine) {n:8.1f} s, {new[-1][2]:.0f} forwards/frame")
        print(f"  floor of the old run: decode {d:.2f} s + torch fp32 forward {f:.1f} s = {d + f:8.1f} s")
        print(f"  floor of the new run: decode {d:.2f} s + {chosen.backend} {chosen.precision} forward {nf:.1f} s "
              f"= {d + nf:8.1f} s")

        mp = None
        if not args.skip_multiprocess:
            mp = run_multiprocess(write_config(root / "multiproc", root / "demo", model_dir, NEW, "multiprocess"))
            print(f"  new default, multiprocess executor               {mp:8.1f} s  ({mp / n:.2f}x the in-process run)")
        print(f"RATIO pipeline_old_vs_floor {o / (d + f):.2f} target <= 1.3")
        print(f"RATIO pipeline_new_vs_floor {n / (d + nf):.2f} target <= 1.3")
        print(f"RATIO pipeline_new_vs_old_speedup {o / n:.2f} target >= 5.0")
        # Random weights score the references alike against any region, so assets seed box
        # fits where nothing of them shows: the <= 40 target is quality.py's.
        print(f"# forwards per frame, new default with random weights: {new[-1][2]:.1f} "
              f"(old {old[-1][2]:.0f}); the <= 40 target is measured by benchmarks/quality.py")
        if mp is not None:
            print(f"RATIO multiprocess_vs_in_process {mp / n:.2f} target >= 1.0")


if __name__ == "__main__":
    main()
