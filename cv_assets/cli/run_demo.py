"""Run everything for the data on disk, as `make run` does: sync project manifests, import
demo events, materialise each project's chain and the event backfill until nothing is left.

SIGINT (Ctrl-C) or SIGTERM stops it promptly: Dagster interrupts the step in flight, that
run is marked canceled (its store writes are transactions, so nothing is half-written),
nothing further starts, and `Interrupted` carries the exit status (130 / 143)."""

from __future__ import annotations

import json
import signal
import socket
import threading
import time
import uuid
from pathlib import Path

from dagster import DagsterInstance, DagsterRunStatus, RunsFilter

from cv_assets.manifest import ProjectKeyConflict, discover_manifests
from cv_assets.defs.partitions import projects_partitions
from cv_assets.settings import load_settings
from cv_assets.store import AppDatabase
from cv_assets.store.projects import project_outcome, upsert_project
from cv_assets.text import printable


# Step-by-step DEBUG logs stay in the run's log (visible in `make ui`); the terminal gets the summary.
QUIET = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}
SESSION_TAG = "cv_assets/run_demo_session"
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(Exception):
    """run-demo was stopped by a signal; `exit_status` is 128 + the signal number."""

    def __init__(self, signum: int, detail: str = ""):
        self.signum = signum
        self.exit_status = 128 + signum
        self.detail = detail
        super().__init__(f"run-demo stopped by {signal.Signals(signum).name}{detail}; nothing further was started")


class StopSignals:
    """SIGINT and SIGTERM end the command. Outside a Dagster run the handler raises
    `Interrupted` at once. During a run Dagster installs its own handler (it interrupts the
    step and the run fails); the wakeup socket records that the signal came, and `check()`
    raises `Interrupted` when the run returns."""

    def __init__(self):
        self.received: int | None = None
        self.in_run = False

    def __enter__(self) -> "StopSignals":
        self._old = {}
        self._read, self._write = socket.socketpair()
        self._read.setblocking(False)
        self._write.setblocking(False)
        if threading.current_thread() is threading.main_thread():  # (signals reach the main thread only)
            self._old_fd = signal.set_wakeup_fd(self._write.fileno(), warn_on_full_buffer=False)
            self._old = {s: signal.signal(s, self._handle) for s in STOP_SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        if self._old:
            for signum, handler in self._old.items():
                signal.signal(signum, handler)
            signal.set_wakeup_fd(self._old_fd)
        self._read.close()
        self._write.close()

    def _handle(self, signum, _frame) -> None:
        if self.received is None:
            self.received = signum
            raise Interrupted(signum)

    def check(self) -> None:
        """Raise `Interrupted` if a stop signal arrived since the last check."""
        try:
            arrived = self._read.recv(256)
        except (BlockingIOError, InterruptedError):
            arrived = b""
        for signum in arrived:
            if signum in STOP_SIGNALS and self.received is None:
                self.received = signum
        if self.received is not None:
            raise Interrupted(self.received)


def _instance() -> DagsterInstance:
    try:
        return DagsterInstance.get()  # DAGSTER_HOME (the Makefile sets it): runs show in `make ui`
    except Exception:
        return DagsterInstance.ephemeral()


def run_everything(config_path: str | None = None) -> dict:
    settings = load_settings(config_path)
    instance = _instance()
    session = uuid.uuid4().hex[:12]
    with StopSignals() as stop:
        try:
            return _run_all(settings, instance, stop, session)
        except Interrupted as exc:
            canceled = _cancel_in_flight(instance, session, stop.in_run)
            raise Interrupted(exc.signum, canceled) from None


def _run_all(settings, instance: DagsterInstance, stop: StopSignals, session: str) -> dict:
    from cv_assets.definitions import build_definitions
    from cv_assets.events.importer import import_events_file

    defs = build_definitions(settings)
    db = AppDatabase(settings.storage.database_url)
    lines, summary = [], {"projects": {}, "events": {}, "ok": True}

    def execute(job_name: str, **kwargs):
        stop.check()
        stop.in_run = True
        result = defs.resolve_job_def(job_name).execute_in_process(
            instance=instance, raise_on_error=False, run_config=QUIET, tags={SESSION_TAG: session}, **kwargs)
        stop.check()  # a signal during the run: the run is canceled below, nothing more starts
        stop.in_run = False
        summary["ok"] &= result.success
        return result

    keys = _register_projects(settings, db, instance, lines)
    lines.append(_embedder_line(settings))
    for key in keys:
        started = time.perf_counter()
        result = execute("project_reprocess_job", partition_key=key)
        summary["projects"][key] = {"success": result.success, "seconds": round(time.perf_counter() - started, 1)}
        line, clips_ok = _project_line(db, settings, key, result, time.perf_counter() - started)
        lines.append(line)
        summary["ok"] &= clips_ok  # a scene whose clip failed is never a finished project

    events_file = settings.storage.thumbnails_root.parent / "events" / "events.jsonl"
    if events_file.is_file():
        stop.check()
        report = import_events_file(db, events_file, settings)
        lines.append(f"events imported from {printable(events_file)}: {report.summary()}")
    runs, failure = 0, None
    while True:
        result = execute("event_embedding_backfill_job")
        runs += 1
        failure = failure or _failure_text(result)
        remaining = _metadata_value(result, "event_embeddings", "remaining")
        if not result.success or not remaining or runs >= 1000:
            break
    failure = failure or _failure_text(execute("recurring_visitors_job"))
    summary["events"] = _events_summary(db)
    lines.append(f"event backfill: {runs} run(s); " + (f"FAILED: {failure}" if failure else json.dumps(summary["events"])))
    summary["text"] = "\n".join(["cv_assets run summary", "=" * 21, *lines, "OK" if summary["ok"] else "SOME RUNS OR CLIPS FAILED"])
    return summary


def _embedder_line(settings) -> str:
    """Which embedder the runs use: model version, device, backend and precision (the
    colour-histogram fallback says so here, not only on stderr)."""
    from cv_assets.embedding import ModelUnavailableError, get_embedder

    embedder = get_embedder(settings.embedder)
    try:
        described = embedder.describe()
    except ModelUnavailableError as exc:
        return f"embedder: unavailable: {printable(exc)}"
    return (f"embedder: {described['family']} {described['model_version']} on {described['device']}, "
            f"{described['backend']} {described['precision']}")


def _register_projects(settings, db: AppDatabase, instance: DagsterInstance, lines: list[str]) -> list[str]:
    """Sync every valid manifest into SQLite and add its partition; report the others. A
    folder declaring a key another folder registered first is skipped, its rows untouched."""
    manifests, bad = discover_manifests(settings.storage.projects_root, settings.manifests)
    keys = []
    for manifest in manifests:
        try:
            upsert_project(db, manifest)
            keys.append(manifest.key)
        except ProjectKeyConflict as exc:
            bad[manifest.key] = str(exc)
    for folder, reason in bad.items():
        lines.append(f"skipped invalid project {printable(folder)}: {printable(reason)}")
    if keys:
        instance.add_dynamic_partitions(projects_partitions.name, keys)
    return keys


def _cancel_in_flight(instance: DagsterInstance, session: str, in_run: bool) -> str:
    """Mark this command's unfinished run (or the one the signal interrupted) canceled."""
    runs = instance.get_runs(filters=RunsFilter(tags={SESSION_TAG: session}), limit=1)
    if not runs:
        return ""
    run = runs[0]
    unfinished = not run.is_finished
    if unfinished or (in_run and run.status == DagsterRunStatus.FAILURE):
        instance.report_run_canceled(run, message="run-demo received a stop signal")
        return f"; run {run.run_id} ({run.job_name}) canceled"
    return ""


def _failure_text(result) -> str | None:
    """`step <key> failed: <message>` for the first failed step (the underlying error, not
    Dagster's "Exceeded max_retries" wrapper), or None when the run succeeded."""
    for event in result.all_events:
        if event.is_step_failure:
            message = _root_message(event.step_failure_data.error)
            return printable(f"step {event.step_key} failed: {message}")
    return None if result.success else "the run failed before any step ran"


def _root_message(error) -> str:
    """The first line of the innermost error that says something (retries wrap the cause)."""
    chain = []
    while error is not None:
        chain.append(error)
        error = error.cause or error.context
    useful = [e for e in chain if "max_retries" not in (e.message or "")] or chain or [None]
    text = (useful[0].message if useful[0] is not None else "") or "failed"
    return text.strip().splitlines()[0] if text.strip() else "failed"


def _metadata_value(result, asset_name: str, key: str):
    for event in result.get_asset_materialization_events():
        mat = event.event_specific_data.materialization
        if mat.asset_key.path[-1] == asset_name and key in mat.metadata:
            return mat.metadata[key].value
    return None


def _project_line(db: AppDatabase, settings, key: str, result, seconds: float) -> tuple[str, bool]:
    """The summary line of a project run, and whether every clip decoded. A failed run shows
    the failing step and its message (the rows in the stores may be the previous run's and
    must not be shown as this one's); a scene whose clip failed has no score and is named."""
    if not result.success:
        return f"project {key}: FAILED in {seconds:.1f}s; {_failure_text(result)}", False
    outcome = project_outcome(db, key)
    scenes = ", ".join(_scene_text(scene) for scene in outcome["scenes"])
    report = Path(settings.storage.reports_dir) / f"{key}.html"
    clips_ok = all(scene["clip_status"] != "failed" for scene in outcome["scenes"])
    state = "ok" if clips_ok else "CLIP FAILED"
    return (f"project {key}: {state} in {seconds:.1f}s; {outcome['appearances']} appearances; continuity {scenes}; "
            f"report {printable(report) if report.exists() else '(not written)'}"), clips_ok


def _scene_text(scene: dict) -> str:
    score = "—" if scene["score"] is None else f"{scene['score']:.1f}"
    concern = f" ({printable(scene['concern'])})" if scene["needs_review"] and scene["concern"] else ""
    return f"scene {scene['scene']}: {score}{concern}"


def _events_summary(db: AppDatabase) -> dict:
    from cv_assets.store.database import table_counts

    return table_counts(db, ["events", "event_embeddings", "embedding_failures", "recognized_entities"])
