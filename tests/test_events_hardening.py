"""Hostile event input (issue 12, items 2, 3 and 12): one bad JSONL line or CSV row, a
pixel bomb or a re-import never loses the good events, never stops the rest, and is
reported with its line number (or event) and the limit's config key."""

from __future__ import annotations

import base64
import io
import json
import tracemalloc

import pytest
from dagster import DagsterInstance, materialize
from PIL import Image
from sqlalchemy import select
from helpers.events import COLOURS, T0, b64, jpeg_bytes, new_db

from cv_assets.cli.events import main
from cv_assets.defs.events import event_embeddings
from cv_assets.defs.resources import build_resources
from cv_assets.events.importer import import_events
from cv_assets.events.search import clear_vector_indexes
from cv_assets.store import AppDatabase
from cv_assets.store.models import EmbeddingFailure, Event, EventEmbedding

GOOD_B64 = b64(jpeg_bytes(COLOURS["red"]))


@pytest.fixture(autouse=True)
def fresh_indexes():
    clear_vector_indexes()
    yield
    clear_vector_indexes()


def event(event_id: str, **fields) -> dict:
    return {"id": event_id, "camera_id": "front", "started_at": T0.isoformat(), "thumbnail_base64": GOOD_B64, **fields}


def event_line(event_id: str, **fields) -> bytes:
    return json.dumps(event(event_id, **fields)).encode()


def stored_ids(db) -> list[str]:
    with db.read() as session:
        return sorted(session.scalars(select(Event.id)))


def hostile_jsonl(path, long_line_bytes: int) -> None:
    lines = [
        event_line("good-1"),                                                        # 1
        b'{"id": "deep", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",            # 2 RecursionError in json
        b'{"id": "digits", "camera_id": "c", "started_at": "2026-11-01", "n": ' + b"7" * 5000 + b"}",  # 3
        event_line("good-2"),                                                        # 4
        b'{"id": "latin1", "camera_id": "caf\xe9"}',                                 # 5 not UTF-8
        b"[1, 2, 3]",                                                                # 6 not an object
        event_line("typed", camera_id={"nested": "object"}),                         # 7 wrong type
        event_line("long-path", thumbnail_base64=None, thumbnail_path="a/" * 3000),  # 8 oversize field
        b'{"id": "huge", "pad": "' + b"x" * long_line_bytes + b'"}',                 # 9 over the line cap
        event_line("good-3"),                                                        # 10
        b'{"id": "cut", "camera_id": ',                                              # 11 not valid JSON
        event_line("good-4"),                                                        # 12
    ]
    path.write_bytes(b"\n".join(lines) + b"\n")


def test_every_bad_jsonl_line_is_reported_by_number_and_the_rest_imported(capsys, settings_factory, tmp_path):
    settings, config = settings_factory(events={"import_max_line_bytes": 1_000_000})
    path = tmp_path / "events.jsonl"
    hostile_jsonl(path, long_line_bytes=3_000_000)

    code = main(["--config", str(config), "import", str(path), "--json"])
    report = json.loads(capsys.readouterr().out)

    assert code == 1  # rows were rejected
    assert report["imported"] == 4 and report["rows_read"] == 12
    reasons = {e["line"]: e["reason"] for e in report["errors"]}
    assert sorted(reasons) == [2, 3, 5, 6, 7, 8, 9, 11]
    assert "nested 100001 levels deep, deeper than events.import_max_depth=8" in reasons[2]
    assert "Exceeds the limit (4300 digits)" in reasons[3] and reasons[3].startswith("not usable JSON")
    assert reasons[5].startswith("not UTF-8 text")
    assert reasons[6] == "expected a JSON object, got list"
    assert reasons[7] == "camera_id must be text, got dict"
    assert "thumbnail_path is 6000 characters, longer than events.import_max_field_chars=4096" in reasons[8]
    assert "longer than events.import_max_line_bytes=1000000; skipped unread" in reasons[9]
    assert reasons[11].startswith("not valid JSON")
    assert stored_ids(AppDatabase(settings.storage.sqlite_url)) == ["good-1", "good-2", "good-3", "good-4"]


def test_the_text_report_names_each_line(capsys, settings_factory, tmp_path):
    _, config = settings_factory()
    path = tmp_path / "events.jsonl"
    path.write_bytes(event_line("ok") + b"\n" + b'{"n": ' + b"9" * 5000 + b"}\n" + event_line("ok-2") + b"\n")
    assert main(["--config", str(config), "import", str(path)]) == 1
    out = capsys.readouterr().out
    assert "3 rows, 2 imported, 0 duplicates skipped, 1 rejected, 0 with an unusable thumbnail" in out
    assert "rejected line 2: not usable JSON: Exceeds the limit (4300 digits)" in out


def test_an_over_long_line_is_skipped_without_holding_it(tmp_path):
    db = new_db(tmp_path)
    cap = 64 * 1024
    path = tmp_path / "events.jsonl"
    with open(path, "wb") as out:
        out.write(event_line("before") + b"\n")
        out.write(b'{"id": "huge", "pad": "')
        for _ in range(40):  # a 40 MB line
            out.write(b"x" * (1 << 20))
        out.write(b'"}\n' + event_line("after") + b"\n")
    tracemalloc.start()
    try:
        report = import_events(db, path, thumbnails_root=tmp_path, thumbnail_max_bytes=10_000, max_line_bytes=cap)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert [(e.line, e.reason.split(",")[0]) for e in report.errors] == [
        (2, f"line is {40 * (1 << 20) + 26} bytes")]
    assert report.imported == 2 and stored_ids(db) == ["after", "before"]
    # Python allocations stay bounded by the cap and the skip block, not the 40 MB line.
    assert peak < 8 * 1024 * 1024, f"peak {peak / 1e6:.1f} MB of Python allocations"


def test_nesting_at_the_cap_is_fine_and_one_deeper_is_refused(tmp_path):
    db = new_db(tmp_path)
    path = tmp_path / "events.jsonl"
    within = json.dumps(event("within", extra=[[["x", "[[[[ brackets in strings do not count"]]]))  # depth 4
    deeper = json.dumps(event("deeper", extra=[[[["x"]]]]))  # depth 5
    path.write_text(within + "\n" + deeper + "\n")
    report = import_events(db, path, thumbnails_root=tmp_path, thumbnail_max_bytes=10_000, max_depth=4)
    assert [(e.line, e.reason) for e in report.errors] == [
        (2, "JSON nested 5 levels deep, deeper than events.import_max_depth=4")]
    assert stored_ids(db) == ["within"]


def test_bad_csv_rows_are_reported_by_line_and_the_rest_imported(tmp_path):
    db = new_db(tmp_path)
    path = tmp_path / "events.csv"
    header = b"id,camera_id,started_at,label,thumbnail_base64\n"
    good = lambda i: f"good-{i},front,{T0.isoformat()},person,{GOOD_B64}\n".encode()  # noqa: E731
    path.write_bytes(
        header                                                        # line 1
        + good(1)                                                     # 2
        + b"latin1,caf\xe9,2026-11-01T00:00:00,,x\n"                  # 3 not UTF-8
        + b"long,front,2026-11-01T00:00:00,," + b"A" * 200_000 + b"\n"  # 4 over the line cap
        + good(2)                                                     # 5
        + b"short,front\n"                                            # 6 wrong field count
        + b"when,front,yesterday,,x\n"                                # 7 bad date
        + good(3)                                                     # 8
    )
    report = import_events(db, path, thumbnails_root=tmp_path, thumbnail_max_bytes=100_000, max_line_bytes=100_000)
    reasons = {e.line: e.reason for e in report.errors}
    assert sorted(reasons) == [3, 4, 6, 7]
    assert reasons[3].startswith("not UTF-8 text")
    assert "longer than events.import_max_line_bytes=100000" in reasons[4]
    assert reasons[6] == "has 2 fields, the header has 5"
    assert reasons[7].startswith("started_at 'yesterday' is not an ISO 8601 date-time")
    assert report.imported == 3 and stored_ids(db) == ["good-1", "good-2", "good-3"]


def test_reimporting_a_file_reports_only_what_this_import_did(tmp_path):
    db = new_db(tmp_path)
    path = tmp_path / "events.jsonl"
    path.write_text("\n".join(json.dumps(e) for e in [
        event("a"), event("b", thumbnail_base64="not base64 at all!"), event("c", thumbnail_base64=None),
    ]) + "\n")
    first = import_events(db, path, thumbnails_root=tmp_path, thumbnail_max_bytes=100_000)
    assert first.imported == 3 and len(first.thumbnail_warnings) == 2
    again = import_events(db, path, thumbnails_root=tmp_path, thumbnail_max_bytes=100_000)
    assert again.imported == 0 and again.thumbnail_warnings == []
    assert len(again.duplicates) == 3
    assert again.summary() == "3 rows, 0 imported, 3 duplicates skipped, 0 rejected, 0 with an unusable thumbnail"


def test_run_demo_import_survives_a_bad_line(settings_factory, tmp_path):
    from cv_assets.cli.run_demo import run_everything

    settings, config = settings_factory(events={"max_batch": 10})
    events_file = settings.storage.thumbnails_root.parent / "events" / "events.jsonl"
    events_file.parent.mkdir(parents=True)
    events_file.write_bytes(event_line("before") + b"\n" + b"[" * 50_000 + b"\n" + event_line("after") + b"\n")
    summary = run_everything(str(config))
    assert "events imported from" in summary["text"]
    assert "3 rows, 2 imported, 0 duplicates skipped, 1 rejected" in summary["text"]
    db = AppDatabase(settings.storage.sqlite_url)
    with db.read() as session:
        assert sorted(session.scalars(select(EventEmbedding.event_id))) == ["after", "before"]


# ---------------------------------------------------------------- pixel bombs


def png_b64(width: int, height: int, mode: str = "RGBA") -> str:
    buffer = io.BytesIO()
    Image.new(mode, (width, height), (40, 80, 120, 255)[: len(mode)]).save(buffer, "PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def test_a_thumbnail_over_the_pixel_cap_is_refused_with_the_projects_limit(settings_factory):
    settings, _ = settings_factory(events={"thumbnail_max_pixels": 250_000})
    db = AppDatabase(settings.storage.sqlite_url)
    with db.write() as session:
        session.add_all([
            Event(id="bomb", camera_id="front", started_at=T0, thumbnail_base64=png_b64(1000, 1000)),  # 1 Mpx
            Event(id="fine", camera_id="front", started_at=T0, thumbnail_base64=png_b64(400, 400)),
        ])
    result = materialize([event_embeddings], resources=build_resources(settings), instance=DagsterInstance.ephemeral())
    assert result.success
    with db.read() as session:
        [failure] = session.scalars(select(EmbeddingFailure)).all()
        embedded = session.scalars(select(EventEmbedding.event_id)).all()
    assert embedded == ["fine"]
    assert failure.item_id == "bomb"
    assert failure.reason == (
        "event bomb: thumbnail rejected as a decompression bomb: its header declares 1000x1000 = 1000000 pixels, "
        "over the limit of events.thumbnail_max_pixels=250000; refused before decoding")


def test_import_warns_about_a_bomb_thumbnail_and_keeps_the_event(tmp_path):
    db = new_db(tmp_path)
    path = tmp_path / "events.jsonl"
    path.write_text(json.dumps(event("bomb", thumbnail_base64=png_b64(1000, 1000))) + "\n")
    report = import_events(db, path, thumbnails_root=tmp_path, thumbnail_max_bytes=1_000_000,
                           thumbnail_max_pixels=250_000)
    assert report.imported == 1 and stored_ids(db) == ["bomb"]
    [warning] = report.thumbnail_warnings
    assert warning.line == 1 and "over the limit of events.thumbnail_max_pixels=250000" in warning.reason


def test_the_default_pixel_cap_refuses_a_small_file_declaring_64_megapixels(tmp_path):
    from cv_assets.events.backfill import BackfillLimits, embed_thumbnails
    from cv_assets.store.events import PendingEvent

    bomb = png_b64(7999, 7999)  # ~250 KB of PNG, 256 MB of RGBA once decoded
    assert len(bomb) < 1_000_000
    pending = [PendingEvent("bomb", "front", T0, bomb, None)]

    class NeverCalled:
        def embed_sources(self, sources, names=None):
            raise AssertionError("a bomb must be refused before the embedder decodes it")

    vectors, failures = embed_thumbnails(pending, NeverCalled(), BackfillLimits(100, 3, tmp_path, 10_000_000))
    assert vectors == {}
    assert "7999x7999 = 63984001 pixels, over the limit of events.thumbnail_max_pixels=16000000" in failures["bomb"]
    assert "DOS attack" not in failures["bomb"]  # Pillow's own wording


def test_an_unterminated_csv_quote_costs_only_the_rows_it_swallows(tmp_path):
    db = new_db(tmp_path)
    path = tmp_path / "events.csv"
    filler = b"".join(f"inside-{i},front,{T0.isoformat()},,x\n".encode() for i in range(60))  # ~2.4 KB
    path.write_bytes(
        b"id,camera_id,started_at,label,thumbnail_path\n"
        + f"before,front,{T0.isoformat()},,a.jpg\n".encode()
        + b'open,front,2026-11-01T00:00:00,"never closed,x\n'  # line 3: the quote runs on
        + filler
        + f"after,front,{T0.isoformat()},,b.jpg\n".encode()
    )
    report = import_events(db, path, thumbnails_root=tmp_path, thumbnail_max_bytes=10_000, max_line_bytes=1024)
    [error] = report.errors
    assert error.reason == "malformed CSV: field larger than field limit (1024)"
    assert 3 < error.line < 64
    assert "before" in stored_ids(db) and "after" in stored_ids(db) and "open" not in stored_ids(db)
