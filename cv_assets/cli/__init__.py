"""The `cv-assets` command.

    cv-assets demo-data [DIR]          write the demo project and security events
    cv-assets run-demo                 register, materialise everything, print a summary
    cv-assets projects list|validate   what the project sensor would see
    cv-assets serve-reports            serve the HTML reports over http (make ui starts it)
    cv-assets db upgrade               apply database migrations
    cv-assets events ...               event status, similar, search, import, backfill
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from cv_assets.settings import CONFIG_ENV, ConfigError, load_settings
from cv_assets.text import printable


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cv-assets", description="Video key frames, CLIP embeddings, appearances and security events.")
    parser.add_argument("--config", help="config file (default: $CV_ASSETS_CONFIG or ./config.yaml)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser("demo-data", help="write the deterministic demo project and security events")
    demo.add_argument("dir", nargs="?", default="data", help="output directory (default: data)")
    demo.set_defaults(handler=_demo_data)

    run = sub.add_parser("run-demo", help="register projects, import events, materialise every asset, print a summary")
    run.add_argument("--json", action="store_true", help="print the summary as JSON")
    run.set_defaults(handler=_run_demo)

    projects = sub.add_parser("projects", help="list or validate project manifests under storage.projects_root",
                              description="list / validate: what the project sensor would see. reassign KEY: a "
                                          "project folder that moved (or a repository checkout that moved) takes "
                                          "over its key from the folder that registered it.")
    projects.add_argument("action", choices=["list", "validate", "reassign"])
    projects.add_argument("key", nargs="?", help="with reassign: the project key (its folder under projects_root)")
    projects.add_argument("--json", action="store_true", help="machine-readable output")
    projects.set_defaults(handler=_projects)

    serve = sub.add_parser("serve-reports", help="serve storage.reports_dir over http at storage.reports_base_url "
                                                 "(started by `make ui` beside the Dagster UI)")
    serve.set_defaults(handler=_serve_reports)

    db = sub.add_parser("db", help="application database maintenance")
    db.add_argument("action", choices=["upgrade", "current"])
    db.add_argument("--revision", default="head", help="target revision (default: head)")
    db.set_defaults(handler=_db)

    from cv_assets.cli.events import add_events_parser

    add_events_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.config:
        # --config wins over $CV_ASSETS_CONFIG for everything this process (and any step
        # process it starts) loads, including cv_assets.definitions at import.
        os.environ[CONFIG_ENV] = str(Path(args.config).expanduser().resolve())
    try:
        return int(args.handler(args) or 0)
    except ConfigError as exc:
        return _fail(exc, 2)
    except _setup_errors() as exc:
        return _fail(exc, 1)


def _setup_errors() -> tuple[type[BaseException], ...]:
    """Errors of the user's setup (an unwritable or damaged store): one line, no traceback."""
    from cv_assets.store.database import DatabaseUnavailableError
    from cv_assets.store.warehouse import WarehouseError

    return DatabaseUnavailableError, WarehouseError


def _serve_reports(args) -> int:
    from cv_assets.cli.serve_reports import start_report_server

    storage = load_settings().storage
    try:
        server = start_report_server(storage.reports_dir, storage.reports_base_url)
    except (OSError, ValueError) as exc:
        print(f"error: cannot serve reports at {storage.reports_base_url}: {printable(exc)}", file=sys.stderr)
        return 1
    print(f"serving {storage.reports_dir} at {storage.reports_base_url.rstrip('/')}/", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        return 0
    finally:
        server.shutdown()


def _fail(exc: BaseException, status: int) -> int:
    print(f"error: {printable(exc)}", file=sys.stderr)
    return status


def _demo_data(args) -> int:
    from cv_assets.demo import write_demo_data

    started = time.perf_counter()
    summary = write_demo_data(Path(args.dir))
    print(summary)
    print(f"demo data written to {printable(Path(args.dir).resolve())} in {time.perf_counter() - started:.1f}s")
    return 0


def _db(args) -> int:
    from cv_assets.store import AppDatabase

    settings = load_settings(args.config)
    db = AppDatabase(settings.storage.database_url, migrate=False)
    if args.action == "upgrade":
        db.upgrade(args.revision)
    print(f"{printable(db.engine.url.render_as_string(hide_password=True))}: revision {db.current_revision()}")
    return 0


def _projects(args) -> int:
    from cv_assets.manifest import discover_manifests

    settings = load_settings(args.config)
    if args.action == "reassign":
        return _reassign(settings, args.key)
    root = settings.storage.projects_root
    good, bad = discover_manifests(root, settings.manifests)
    good, taken = _check_owners(settings, good)
    bad.update(taken)
    if args.json:
        print(json.dumps({"valid": [{"key": m.key, "scenes": len(m.spec.scenes), "assets": len(m.spec.assets),
                                     "hash": m.content_hash} for m in good], "invalid": bad}, indent=2))
    else:
        for m in good:
            print(f"ok       {m.key:<20} {len(m.spec.scenes)} scenes, {len(m.spec.assets)} assets  ({printable(m.root)})")
        for folder, reason in bad.items():
            print(f"INVALID  {printable(folder):<20} {printable(reason)}")
        if not good and not bad:
            print(f"no project folders under {printable(root)}")
    return 1 if (args.action == "validate" and bad) else 0


def _reassign(settings, key: str | None) -> int:
    """Give `key` to the folder `projects_root/<key>` (valid manifest required); its rows are
    kept and synced from that folder on the next sensor tick or run."""
    from cv_assets.manifest import ManifestError, load_manifest
    from cv_assets.store import AppDatabase
    from cv_assets.store.projects import reassign_project

    if not key:
        print("error: projects reassign needs the project KEY", file=sys.stderr)
        return 2
    try:
        manifest = load_manifest(settings.storage.projects_root / key, settings.manifests)
    except ManifestError as exc:
        return _fail(exc, 1)
    previous = reassign_project(AppDatabase(settings.storage.database_url), manifest.key, manifest.root)
    if previous is None:
        print(f"project {key} is not registered yet; the sensor or run-demo will register {printable(manifest.root)}")
    else:
        print(f"project {key} now belongs to {printable(manifest.root)} (was {printable(previous)})")
    return 0


def _check_owners(settings, manifests):
    """Keys registered to another folder are invalid here too, as in the sensor and run-demo.
    Reads the application database only when it exists (validate never creates it)."""
    from cv_assets.store import AppDatabase
    from cv_assets.store.projects import check_owners

    db = AppDatabase(settings.storage.database_url, migrate=False)
    if db.path is None or not db.path.is_file():
        return manifests, {}
    try:
        return check_owners(db, manifests)
    finally:
        db.dispose()


def _run_demo(args) -> int:
    from cv_assets.cli.run_demo import Interrupted, run_everything

    try:
        summary = run_everything(args.config)
    except Interrupted as exc:
        print(f"interrupted: {printable(exc)}", file=sys.stderr)
        return exc.exit_status
    print(json.dumps(summary, indent=2, default=str) if args.json else summary.pop("text"))
    return 0 if summary.get("ok", True) else 1


if __name__ == "__main__":
    sys.exit(main())
