"""`cv-assets events ...`: status, similar events, text search, import and backfill.

`cv_assets/cli/__init__.py` mounts these with `add_events_parser(subparsers)`; the
module also runs on its own (`python -m cv_assets.cli.events --help`) through `main()`.
Every command takes `--json` for scripts (one JSON document on stdout; errors as
{"error": ...}). Exit status: 0 success, 1 an error (unknown event, no embedding, bad
input, or an import with rejected rows), 2 a usage error.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from datetime import datetime, timedelta, timezone

from cv_assets.settings import ConfigError, Settings, load_settings
from cv_assets.text import printable

EXIT_OK, EXIT_ERROR = 0, 1


# ---------------------------------------------------------------- parser


def add_events_parser(subparsers) -> argparse.ArgumentParser:
    """Add the `events` command (with its subcommands) to a top-level `cv-assets` parser."""
    parser = subparsers.add_parser(
        "events",
        help="security events: embedding status, similar events, text search, import, backfill",
        description="Security events: embedding status, similar events, text search, import and backfill.",
    )
    _add_subcommands(parser)
    # `handler` is what cv_assets/cli/__init__.py dispatches on; `func` for parsers that use that name.
    parser.set_defaults(handler=handle_events_command, func=handle_events_command)
    return parser


def build_parser() -> argparse.ArgumentParser:
    """A stand-alone parser for `cv-assets events` (used by `main`)."""
    parser = argparse.ArgumentParser(
        prog="cv-assets events",
        description="Security events: embedding status, similar events, text search, import and backfill.",
    )
    parser.add_argument("--config", help="config file (default: $CV_ASSETS_CONFIG or ./config.yaml)")
    _add_subcommands(parser)
    return parser


def _json_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print one JSON document (for scripts)")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def _similarity(text: str) -> float:
    value = float(text)
    if not -1.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be between -1 and 1, got {value}")
    return value


def _query_options(parser: argparse.ArgumentParser, *, min_similarity_help: str, days_default: int | None,
                   days_help: str) -> None:
    """The options `similar` and `search` share."""
    parser.add_argument("--limit", type=_positive_int, help="most matches to show (default: events.similar_limit)")
    parser.add_argument("--min-similarity", type=_similarity, help=min_similarity_help)
    parser.add_argument("--days", type=_non_negative_int, default=days_default, help=days_help)
    parser.add_argument("--camera", help="only events from this camera")
    _json_flag(parser)


def _add_subcommands(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="events_command", metavar="COMMAND", required=True)

    p = sub.add_parser("status", help="is an event embedded, and if not, why not",
                       description="Show whether an event has an embedding (model_version, created_at) "
                                   "or why embedding it failed.")
    p.add_argument("event_id", metavar="EVENT_ID")
    _json_flag(p)
    p.set_defaults(events_handler=_status)

    p = sub.add_parser("similar", help="events that look like an event",
                       description="Events whose thumbnails look like EVENT_ID's, best first. Only vectors of "
                                   "the same model_version are compared; the event itself is left out.")
    p.add_argument("event_id", metavar="EVENT_ID")
    _query_options(p, min_similarity_help="cosine similarity floor (default: events.similar_min_similarity)",
                   days_default=None, days_help="only events that started within DAYS days of this one; 0 = any "
                                                "time (default: events.similar_days)")
    p.set_defaults(events_handler=_similar)

    p = sub.add_parser("search", help="find event thumbnails by a text description (CLIP)",
                       description="Text-to-image search over event thumbnails. Needs a CLIP embedder; "
                                   "the colour-histogram fallback cannot embed text.")
    p.add_argument("text", metavar="TEXT")
    _query_options(p, min_similarity_help="cosine floor; CLIP text-image scores are low (~0.2-0.35), so none by "
                                          "default",
                   days_default=0, days_help="only events of the last DAYS days (0 = any)")
    p.set_defaults(events_handler=_search)

    p = sub.add_parser("import", help="import events from JSON Lines or CSV",
                       description="Import events from a JSON Lines or CSV file with the fields id, camera_id, "
                                   "started_at, label and thumbnail_base64 or thumbnail_path (relative to "
                                   "storage.thumbnails_root). Bad rows are reported with their line number and "
                                   "skipped; existing ids are reported and skipped. Exit status 1 when any row "
                                   "was rejected.")
    p.add_argument("file", metavar="FILE")
    p.add_argument("--format", choices=("jsonl", "csv"), help="file format (default: from the extension)")
    _json_flag(p)
    p.set_defaults(events_handler=_import)

    p = sub.add_parser("backfill", help="embed events that have no embedding yet, in batches",
                       description="Embed event thumbnails batch after batch until none is left. "
                                   "missing: events without a vector for the current model (failed ones at most "
                                   "events.max_attempts times); all: re-embed every event.")
    p.add_argument("--mode", choices=("missing", "all"), default="missing")
    p.add_argument("--batch-size", type=_positive_int, help="events per batch (default and most: events.max_batch)")
    p.add_argument("--max-batches", type=_positive_int, help="stop after this many batches")
    _json_flag(p)
    p.set_defaults(events_handler=_backfill)

    p = sub.add_parser("visitors", help="recurring visitors (groups of similar events)",
                       description="List entities seen at least --min-events times; --update folds newly "
                                   "embedded events in first (--full re-clusters everything).")
    p.add_argument("--min-events", type=_positive_int, help="default: events.visitor_min_events")
    p.add_argument("--limit", type=_positive_int, default=20)
    p.add_argument("--update", action="store_true", help="group newly embedded events before listing")
    p.add_argument("--full", action="store_true", help="with --update: re-cluster all events from scratch")
    _json_flag(p)
    p.set_defaults(events_handler=_visitors)


# ---------------------------------------------------------------- running


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return handle_events_command(args)


def handle_events_command(args: argparse.Namespace) -> int:
    """Run a parsed `events` command; returns the exit status."""
    try:
        settings = load_settings(getattr(args, "config", None))
        return args.events_handler(args, settings)
    except Exception as exc:
        if isinstance(exc, _expected_errors()):
            return _fail(args, str(exc))
        raise


def _expected_errors() -> tuple[type[BaseException], ...]:
    """Errors that are the user's input or setup, reported as one line instead of a trace.
    The embedding package is only consulted when loaded (it imports torch, which
    `status` and `similar` never need)."""
    from cv_assets.events.importer import ImportFormatError
    from cv_assets.events.backfill import BatchSizeError, EventNotFoundError
    from cv_assets.events.search import NoEmbeddingError, TextSearchUnavailableError

    errors: tuple[type[BaseException], ...] = (
        ConfigError, EventNotFoundError, NoEmbeddingError, TextSearchUnavailableError, ImportFormatError,
        BatchSizeError, ValueError, OSError,
    )
    embedding = sys.modules.get("cv_assets.embedding")
    for name in ("ModelUnavailableError", "TextSearchUnavailableError", "EmbedderConfigError"):
        if embedding is not None and hasattr(embedding, name):
            errors += (getattr(embedding, name),)
    return errors


def _fail(args, message: str) -> int:
    if getattr(args, "json", False):
        print(json.dumps({"error": message}))
    print(f"error: {printable(message)}", file=sys.stderr)
    return EXIT_ERROR


def _emit(args, document: dict, lines: list[str]) -> None:
    if args.json:
        print(json.dumps(document, indent=2, default=str))
    else:
        print(printable("\n".join(lines)))


def _database(settings: Settings):
    from cv_assets.store import AppDatabase

    return AppDatabase(settings.storage.database_url)


def _embedder(settings: Settings):
    from cv_assets.embedding import get_embedder

    return get_embedder(settings.embedder)


def _table(headers: list[str], rows: list[list]) -> list[str]:
    cells = [[str("" if v is None else v) for v in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    render = lambda row: "  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip()  # noqa: E731
    return [render(headers), render(["-" * w for w in widths])] + [render(r) for r in cells]


# ---------------------------------------------------------------- commands


def _status(args, settings: Settings) -> int:
    from cv_assets.events.backfill import event_status

    status = event_status(_database(settings), args.event_id)
    lines = [f"event {status['event_id']}  camera {status['camera_id']}  started {status['started_at']}"]
    if status["embedded"]:
        stale = f" (not the current {status['current_model_version']})" if status["stale"] else ""
        lines.append(f"embedded: yes  model_version {status['model_version']}{stale}  created {status['created_at']}")
    else:
        lines.append("embedded: no")
    for failure in status["failures"]:
        given_up = " (given up)" if failure["attempts"] >= settings.events.max_attempts else ""
        lines.append(
            f"failed {failure['attempts']}x{given_up} with {failure['model_version']}, last {failure['last_failed_at']}: "
            f"{failure['reason']}"
        )
    if not status["embedded"] and not status["failures"]:
        lines.append("not tried yet: the next backfill will embed it")
    _emit(args, status, lines)
    return EXIT_OK


def _matches_lines(matches) -> list[str]:
    if not matches:
        return ["no matching events"]
    return _table(
        ["similarity", "event", "camera", "started_at", "label"],
        [[f"{m.similarity:.3f}", m.event_id, m.camera_id, m.started_at.isoformat(timespec="seconds"), m.label]
         for m in matches],
    )


def _similar(args, settings: Settings) -> int:
    from cv_assets.events.search import similar_events

    events = settings.events
    result = similar_events(
        _database(settings),
        args.event_id,
        limit=args.limit or events.similar_limit,
        min_similarity=events.similar_min_similarity if args.min_similarity is None else args.min_similarity,
        days=events.similar_days if args.days is None else args.days,
        camera=args.camera,
        ef_search=events.hnsw_ef_search,
    )
    header = f"events like {result.event_id} ({result.model_version}, {result.searched_text}):"
    _emit(args, result.as_dict(), [header, *_matches_lines(result.matches)])
    return EXIT_OK


def _search(args, settings: Settings) -> int:
    from cv_assets.events.search import search_events_by_text

    now_utc = datetime.now(timezone.utc).replace(tzinfo=None)  # events store naive UTC
    since = now_utc - timedelta(days=args.days) if args.days else None
    result = search_events_by_text(
        _database(settings), _embedder(settings), args.text, limit=args.limit or settings.events.similar_limit,
        min_similarity=args.min_similarity, camera=args.camera, since=since,
        ef_search=settings.events.hnsw_ef_search,
    )
    header = f"events matching {result.text!r} ({result.model_version}, {result.searched_text}):"
    _emit(args, result.as_dict(), [header, *_matches_lines(result.matches)])
    return EXIT_OK


def _progress_bar(**kwargs):
    from tqdm import tqdm

    # disable=None: a bar on a terminal, silence when piped (scripts, --json).
    return tqdm(file=sys.stderr, disable=None, dynamic_ncols=True, **kwargs)


def _import(args, settings: Settings) -> int:
    from pathlib import Path

    from cv_assets.events.importer import ImportFormatError, count_lines, import_events_file

    path = Path(args.file)
    if not path.is_file():
        raise ImportFormatError(f"{path}: no such file")
    with _progress_bar(total=count_lines(path), unit="line", desc="import") as bar:
        report = import_events_file(
            _database(settings), path, settings, fmt=args.format,
            on_progress=lambda line: bar.update(max(0, line - bar.n)),
        )
    lines = [f"{report.path} ({report.format}): {report.summary()}"]
    lines += [f"  rejected {problem}" for problem in report.errors]
    lines += [f"  warning  {problem}" for problem in report.thumbnail_warnings]
    lines += [f"  duplicate {problem}" for problem in report.duplicates]
    if report.ignored_fields:
        lines.append(f"  ignored unknown fields: {', '.join(sorted(report.ignored_fields))}")
    _emit(args, report.as_dict(), lines)
    return EXIT_ERROR if report.errors else EXIT_OK


def _backfill(args, settings: Settings) -> int:
    from cv_assets.events.backfill import (
        BackfillLimits,
        events_left,
        remember_embedder_version,
        resolve_batch_size,
        run_event_backfill,
    )

    limits = BackfillLimits.from_settings(settings)
    batch_size = resolve_batch_size(args.batch_size, limits.max_batch)  # refuse before loading the model
    db = _database(settings)
    embedder = _embedder(settings)
    total, remaining = events_left(db, embedder.model_version, limits.max_attempts)
    with _progress_bar(total=total if args.mode == "all" else remaining or 0, unit="event",
                       desc=f"embed ({args.mode})") as bar:
        report = run_event_backfill(
            db, embedder, limits, mode=args.mode, batch_size=batch_size, max_batches=args.max_batches,
            on_batch=lambda batch: bar.update(len(batch.outcomes)),
        )
    remember_embedder_version(db, settings.embedder, report.model_version)
    lines = [
        f"{report.model_version} ({report.mode}): {report.summary()} in {report.batches} batches",
        f"coverage {report.coverage_pct:.1f}% of {report.total_events} events, {report.images_per_sec:.1f} images/s",
    ]
    lines += [f"  failed {reason}" for reason in report.failures.values()]
    _emit(args, report.as_dict(), lines)
    return EXIT_OK


def _visitors(args, settings: Settings) -> int:
    from cv_assets.events.visitors import list_recurring_visitors, update_recurring_visitors

    events = settings.events
    db = _database(settings)
    min_events = args.min_events or events.visitor_min_events
    document: dict = {}
    lines: list[str] = []
    if args.update:
        report = update_recurring_visitors(
            db, threshold=events.visitor_similarity_threshold, min_events=min_events, full_recluster=args.full
        )
        document["update"] = {k: v for k, v in report.as_dict().items() if k != "top"}
        lines.append(
            f"{report.mode} grouping of {report.events_considered} events ({report.model_version}): "
            f"{report.new_events} new, {report.new_entities} new entities, {report.entities_total} in all"
        )
    visitors = list_recurring_visitors(db, min_events=min_events, limit=args.limit)
    document["visitors"] = visitors
    if visitors:
        lines += _table(
            ["entity", "events", "first seen", "last seen", "cameras"],
            [[v["entity_id"], v["event_count"], v["first_seen"], v["last_seen"], ", ".join(v["cameras"])]
             for v in visitors],
        )
    else:
        lines.append(f"no entity seen {min_events} times or more")
    _emit(args, document, lines)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
