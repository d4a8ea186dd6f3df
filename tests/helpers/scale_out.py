"""For tests/test_scale_out.py: tiny distinct projects cut from the demo, the scale-out
configuration (PostgreSQL application database, DuckLake warehouse, a PostgreSQL Dagster
instance from deploy/dagster.yaml), event backfills through `event_embedding_backfill_job`,
and row snapshots of what the project snapshot (`reliability.snapshot`) leaves out
(continuity history, event vectors and failures, recurring visitors).

Also a child-process script (always started with a timeout by the test):

    python tests/helpers/scale_out.py backfill CONFIG IDS_LOG [--hold MARKER] [--go GO_FILE]

runs `event_embedding_backfill_job` against DAGSTER_HOME's instance, run after run, until
no event is left to embed, printing one `RESULT` JSON line per run and appending the event
ids each successful run stored to IDS_LOG (one JSON list per run). With --hold it starts one
run that claims its batch, writes the claimed ids to MARKER.ids.json and its pid to MARKER
from inside the embedder (the batch's transaction open, its rows locked) and sleeps there
until the test SIGKILLs it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
import uuid
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import yaml

if __package__ in (None, ""):  # run as a child-process script: make `helpers` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from helpers import reliability as h  # noqa: E402

HERE = Path(__file__).resolve()
DEPLOY_DAGSTER_YAML = h.REPO / "deploy" / "dagster.yaml"
BACKFILL_DEADLINE_SEC = 150
HOLD_MAX_SEC = 180

# Two projects cut from the demo (one session copy, scenes of 1 s): different scenes and
# reference assets, so rows written under the wrong partition could never match.
PROJECT_PLAN = {
    "north": {"scenes": [0, 1], "assets": ["CHAR_01", "PROP_01"]},
    "south": {"scenes": [2, 3], "assets": ["CHAR_02", "PROP_02"]},
}


# ------------------------------------------------------------------ inputs

_tiny_demo: dict[str, Path] = {}


def tiny_demo_source(tmp_path_factory) -> Path:
    """The demo data with 1-second scenes (24 frames each), written once per test session."""
    if "root" not in _tiny_demo:
        from cv_assets.demo import write_demo_data

        root = tmp_path_factory.mktemp("tiny_demo_source")
        write_demo_data(root, scene_seconds=1.0, n_events=30)
        _tiny_demo["root"] = root
    return _tiny_demo["root"]


def write_projects(demo_root: Path, projects_root: Path, plan: dict = PROJECT_PLAN) -> list[str]:
    """One project folder per key of `plan`, each with the chosen demo scenes (re-indexed
    from 0, clips renamed) and reference assets; expected assets limited to those, no
    ground truth. Returns the keys."""
    source = demo_root / "projects" / "demo"
    demo = yaml.safe_load((source / "project.yaml").read_text())
    assets = {a["code"]: a for a in demo["assets"]}
    scenes = {s["index"]: s for s in demo["scenes"]}
    for key, spec in plan.items():
        target = projects_root / key
        (target / "refs").mkdir(parents=True)
        (target / "clips").mkdir()
        for code in spec["assets"]:
            shutil.copy2(source / assets[code]["reference_image"], target / "refs" / f"{code}.png")
        manifest_scenes = []
        for index, demo_index in enumerate(spec["scenes"]):
            scene = scenes[demo_index]
            clip = f"clips/scene_{index:02d}.mp4"
            shutil.copy2(source / scene["clip"], target / clip)
            manifest_scenes.append({"index": index, "clip": clip,
                                    "expected_assets": [c for c in scene["expected_assets"] if c in spec["assets"]]})
        manifest = {"project": key, "name": f"Scale-out {key}",
                    "assets": [{**assets[c], "reference_image": f"refs/{c}.png"} for c in spec["assets"]],
                    "scenes": manifest_scenes}
        (target / "project.yaml").write_text(yaml.safe_dump(manifest, sort_keys=False))
    return list(plan)


def add_test_events(db, n_good: int, bad_at: tuple[int, ...]) -> tuple[list[str], list[str]]:
    """`n_good` colour events (four colours in turn, base64 JPEG thumbnails, 10 min apart)
    and, at the given positions in time, events whose thumbnail is not an image.
    Returns (good ids, bad ids)."""
    from datetime import timedelta

    from helpers.events import T0, add_events, b64, colour_events

    colours = ["red", "green", "blue", "yellow"]
    good = colour_events(db, [colours[i % 4] for i in range(n_good)])
    bad_rows = [{"id": f"bad-{i}", "camera_id": "front_door", "started_at": T0 + timedelta(minutes=10 * p + 5),
                 "label": "broken", "thumbnail_base64": b64(b"not an image at all")} for i, p in enumerate(bad_at)]
    add_events(db, bad_rows)
    return good, [row["id"] for row in bad_rows]


# ------------------------------------------------------------------ configurations and servers


def socket_dir(pg_server) -> str:
    return parse_qs(urlparse(pg_server.get_uri()).query)["host"][0]


def create_database(pg_server, prefix: str) -> str:
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    pg_server.psql(f"CREATE DATABASE {name};")
    return name


def drop_database(pg_server, name: str) -> None:
    pg_server.psql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE);")


def scale_out_storage(root: Path, database_url: str, lake_catalog_url: str) -> dict:
    """The storage section at scale: application database and DuckLake catalog in
    PostgreSQL, DuckLake data files, frames and reports on a path every worker shares."""
    storage = {k: v for k, v in h.storage_section(root).items() if k != "sqlite_url"}
    return {**storage, "database_url": database_url, "warehouse": "ducklake",
            "ducklake_catalog_url": lake_catalog_url, "ducklake_data_path": str(root / "lake")}


def write_postgres_dagster_home(path: Path, postgres_url: str) -> Path:
    """DAGSTER_HOME with the deployed instance configuration (deploy/dagster.yaml: storage in
    PostgreSQL, queued runs, retries, monitoring), storage pointed at `postgres_url`
    (pgserver listens on a Unix socket, which `postgres_db.hostname` cannot name) and
    without the Docker launcher (an image dependency; these runs execute in their process)."""
    config = yaml.safe_load(DEPLOY_DAGSTER_YAML.read_text())
    config.pop("run_launcher", None)
    config["storage"] = {"postgres": {"postgres_url": postgres_url}}
    path.mkdir(parents=True, exist_ok=True)
    (path / "dagster.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def attach_new_lake(lake: dict, start, errors) -> None:
    """A process's first use of a DuckLake whose catalog nobody has created yet (spawned by
    the test several at once: they all try to create it)."""
    import traceback

    from cv_assets.store.warehouse import Warehouse

    try:
        start.wait(timeout=60)
        Warehouse(**lake)
    except BaseException:
        errors.put(traceback.format_exc())
        raise


# ------------------------------------------------------------------ the backfill through Dagster


def _metadata_value(materialization, key: str):
    value = materialization.metadata[key]
    return getattr(value, "value", value)


def backfill_until_done(job, instance, *, on_run=None, deadline_sec: float = BACKFILL_DEADLINE_SEC,
                        idle_sleep_sec: float = 0.2) -> list[dict]:
    """Run `event_embedding_backfill_job` (missing mode: one batch per run, as the schedule
    launches it) until its report says no event is left, or a run fails. A run that finds
    nothing to claim while events remain (another worker holds them) waits a moment before
    the next. Returns one dict per run."""
    runs = []
    deadline = time.monotonic() + deadline_sec
    while True:
        result = job.execute_in_process(instance=instance, raise_on_error=False)
        line = {"run_id": result.run_id, "success": result.success}
        found = result.asset_materializations_for_node("event_embeddings") if result.success else []
        if found:
            line.update({k: _metadata_value(found[-1], k) for k in ("embedded", "failed", "remaining")})
        runs.append(line)
        if on_run is not None:
            on_run(line)
        if not result.success or not found or line["remaining"] == 0:
            return runs
        if line["embedded"] + line["failed"] == 0:
            time.sleep(idle_sleep_sec)
        if time.monotonic() > deadline:
            raise TimeoutError(f"events still left after {deadline_sec:g} s of backfill runs: {runs[-3:]}")


class _RecordingEmbedder:
    """The configured embedder, recording which events it embedded (for the worker's log),
    or, holding, pausing inside the first batch it is given."""

    embedded: list[str] = []

    def __init__(self, inner, hold_marker: Path | None):
        self._inner = inner
        self._hold = hold_marker

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def embed_sources(self, sources, names=None):
        ids = [name.removeprefix("event ") for name in names or []]
        if self._hold is not None:
            ids_file = self._hold.with_name(self._hold.name + ".ids.json")
            ids_file.write_text(json.dumps(ids))
            partial = self._hold.with_name(self._hold.name + ".tmp")
            partial.write_text(str(os.getpid()))
            partial.replace(self._hold)  # the pid, as reliability.wait_for_marker reads it
            time.sleep(HOLD_MAX_SEC)  # killed by the test long before
            raise SystemExit("the holding worker was never killed")
        outcome = self._inner.embed_sources(sources, names)
        _RecordingEmbedder.embedded.extend(ids[i] for i in outcome.ok)
        return outcome


def _backfill_worker(config: str, ids_log: str, hold: str | None, go_file: str | None) -> int:
    from dagster import DagsterInstance

    import cv_assets.embedding as embedding
    from cv_assets.definitions import build_definitions
    from cv_assets.settings import load_settings

    settings = load_settings(config)
    job = build_definitions(settings).resolve_job_def("event_embedding_backfill_job")
    get_embedder = embedding.get_embedder
    embedding.get_embedder = lambda s=None: _RecordingEmbedder(get_embedder(s), Path(hold) if hold else None)
    instance = DagsterInstance.get()
    if hold:
        job.execute_in_process(instance=instance, raise_on_error=False)
        return 3  # never reached: the run pauses inside its batch until killed
    h._wait_for_go(go_file)

    def on_run(line: dict) -> None:
        if line["success"]:  # the batch's transaction committed: these ids are stored
            with open(ids_log, "a") as out:
                out.write(json.dumps(_RecordingEmbedder.embedded) + "\n")
        _RecordingEmbedder.embedded = []
        print("RESULT " + json.dumps(line), flush=True)

    runs = backfill_until_done(job, instance, on_run=on_run)
    return 0 if all(r["success"] for r in runs) else 1


def start_backfill_worker(config: Path, dagster_home: Path, ids_log: Path, log_path: Path, *,
                          hold: Path | None = None, go_file: Path | None = None) -> h.Child:
    args = [str(HERE), "backfill", str(config), str(ids_log)]
    if hold:
        args += ["--hold", str(hold)]
    if go_file:
        args += ["--go", str(go_file)]
    return h.start_child(args, h.child_env(config, DAGSTER_HOME=str(dagster_home)), log_path)


def logged_batches(ids_log: Path) -> list[list[str]]:
    return [json.loads(line) for line in ids_log.read_text().splitlines()] if ids_log.exists() else []


# ------------------------------------------------------------------ rows the project snapshot leaves out


def continuity_rows(settings, project: str) -> list[tuple]:
    """The project's continuity_history rows without run id and time."""
    from cv_assets.store import Warehouse

    rows = Warehouse.from_settings(settings.storage).query(
        "SELECT scene_index, model_version, score, adherence, identity, boundary, intra_scene, needs_review, "
        "CAST(details AS VARCHAR) AS details FROM continuity_history WHERE project = ?", [project])

    def num(value):
        return None if value is None or value != value else round(float(value), 6)

    return sorted(
        (int(r.scene_index), r.model_version, num(r.score), num(r.adherence), num(r.identity), num(r.boundary),
         num(r.intra_scene), None if r.needs_review is None else bool(r.needs_review),
         json.dumps(json.loads(r.details), sort_keys=True) if r.details else None)
        for r in rows.itertuples(index=False))


def event_rows(database_url: str) -> dict[str, list[tuple]]:
    """Event vectors (vector to 1e-6) and event failures, without row ids and times."""
    from sqlalchemy import select

    from cv_assets.store import AppDatabase
    from cv_assets.store.models import EmbeddingFailure, EventEmbedding
    from cv_assets.store.vectors import vector_from_json

    db = AppDatabase(database_url)
    with db.read() as session:
        vectors = session.execute(select(EventEmbedding.event_id, EventEmbedding.model_version,
                                         EventEmbedding.embedding)).all()
        failures = session.execute(select(EmbeddingFailure.item_kind, EmbeddingFailure.item_id,
                                          EmbeddingFailure.model_version, EmbeddingFailure.attempts,
                                          EmbeddingFailure.reason)).all()
    db.dispose()
    return {
        "event_embeddings": sorted((e, v, h._vector_digest(vector_from_json(blob))) for e, v, blob in vectors),
        "embedding_failures": sorted(tuple(row) for row in failures),
    }


def visitor_groups(database_url: str) -> list[tuple[str, ...]]:
    """Recurring visitors as groups of event ids (entity ids differ from store to store)."""
    from collections import defaultdict

    from sqlalchemy import select

    from cv_assets.store import AppDatabase
    from cv_assets.store.models import EntityEvent

    db = AppDatabase(database_url)
    with db.read() as session:
        members = session.execute(select(EntityEvent.entity_id, EntityEvent.event_id)).all()
    db.dispose()
    groups = defaultdict(list)
    for entity, event_id in members:
        groups[entity].append(event_id)
    return sorted(tuple(sorted(g)) for g in groups.values())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scale_out")
    sub = parser.add_subparsers(dest="command", required=True)
    backfill = sub.add_parser("backfill", help="event backfill runs against DAGSTER_HOME's instance until none is left")
    backfill.add_argument("config")
    backfill.add_argument("ids_log")
    backfill.add_argument("--hold", default=None, help="pause inside the first batch, claimed, until killed")
    backfill.add_argument("--go", default=None, help="wait for this file to exist before the first run")
    args = parser.parse_args(argv)
    return _backfill_worker(args.config, args.ids_log, args.hold, args.go)


if __name__ == "__main__":
    sys.exit(main())
