"""Importing events from JSON Lines and CSV."""

from __future__ import annotations

import csv
import json
from datetime import datetime

import pytest
from sqlalchemy import select
from helpers.events import COLOURS, T0, add_events, b64, jpeg_bytes, new_db

from cv_assets.events.importer import ImportFormatError, count_lines, detect_format, import_events
from cv_assets.store.models import Event

GOOD_B64 = b64(jpeg_bytes(COLOURS["red"]))


@pytest.fixture
def db(tmp_path):
    return new_db(tmp_path)


def run_import(db, path, tmp_path, **kwargs):
    return import_events(db, path, thumbnails_root=tmp_path / "thumbs", thumbnail_max_bytes=1_000_000, **kwargs)


def stored(db) -> dict[str, Event]:
    with db.read() as session:
        return {e.id: e for e in session.scalars(select(Event))}


def write_jsonl(path, lines):
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return path


def test_jsonl_keeps_good_rows_and_reports_bad_ones_by_line(db, tmp_path):
    add_events(db, [{"id": "evt-existing", "camera_id": "cam", "started_at": T0, "thumbnail_base64": GOOD_B64}])
    path = write_jsonl(tmp_path / "events.jsonl", [
        {"id": "evt-00001", "camera_id": "front_door", "started_at": "2026-11-01T08:15:00", "label": "person",
         "thumbnail_base64": GOOD_B64},                                                            # 1 ok
        {"id": "evt-00002", "camera_id": "garage", "started_at": "2026-11-01T09:15:00+01:00",
         "thumbnail_path": "garage/evt-00002.jpg", "extra": 1},                                  # 2 ok (file may come later)
        "{not json",                                                                               # 3
        "[1, 2]",                                                                                  # 4
        {"camera_id": "x", "started_at": "2026-11-01T08:00:00", "thumbnail_base64": GOOD_B64},     # 5 no id
        {"id": "evt-bad-time", "camera_id": "x", "started_at": "yesterday", "thumbnail_base64": GOOD_B64},  # 6
        {"id": "evt-both", "camera_id": "x", "started_at": "2026-11-01", "thumbnail_base64": GOOD_B64,
         "thumbnail_path": "a.jpg"},                                                               # 7
        {"id": "evt-none", "camera_id": "x", "started_at": "2026-11-01"},                          # 8
        {"id": "evt-b64", "camera_id": "x", "started_at": "2026-11-01", "thumbnail_base64": "ab$cdefg"},  # 9
        {"id": "evt-escape", "camera_id": "x", "started_at": "2026-11-01", "thumbnail_path": "../../etc/passwd"},  # 10
        "",                                                                                        # 11 blank: skipped
        {"id": "x" * 200, "camera_id": "x", "started_at": "2026-11-01", "thumbnail_base64": GOOD_B64},  # 12
        {"id": "evt-00001", "camera_id": "again", "started_at": "2026-11-02", "thumbnail_base64": GOOD_B64},  # 13 dup
        {"id": "evt-existing", "camera_id": "cam", "started_at": "2026-11-02", "thumbnail_base64": GOOD_B64},  # 14 dup
        {"id": 42, "camera_id": "cam", "started_at": "2026-11-03T10:00:00Z", "thumbnail_base64": GOOD_B64},  # 15 ok
        {"id": "evt-ctl", "camera_id": "cam\x07", "started_at": "2026-11-03", "thumbnail_base64": GOOD_B64},  # 16
    ])
    progress = []
    report = run_import(db, path, tmp_path, on_progress=progress.append)
    assert report.format == "jsonl" and report.imported == 6
    errors = {e.line: e for e in report.errors}
    assert sorted(errors) == [3, 4, 5, 6, 7, 12, 16]
    assert "not valid JSON" in errors[3].reason
    assert "expected a JSON object" in errors[4].reason
    assert errors[5].reason == "id is missing"
    assert "not an ISO 8601" in errors[6].reason and errors[6].event_id == "evt-bad-time"
    assert "not both" in errors[7].reason
    # An unusable thumbnail does not lose the event: imported, with a warning naming why.
    warnings = {w.line: w for w in report.thumbnail_warnings}
    assert sorted(warnings) == [8, 9, 10]
    assert "has no thumbnail" in warnings[8].reason and warnings[8].event_id == "evt-none"
    assert "not valid base64" in warnings[9].reason
    assert "'..'" in warnings[10].reason
    assert {"evt-none", "evt-b64", "evt-escape"} <= set(stored(db))
    assert "longer than 128" in errors[12].reason
    assert "control characters" in errors[16].reason
    assert str(errors[6]).startswith("line 6 (event evt-bad-time): ")
    duplicates = {d.line: d for d in report.duplicates}
    assert "repeats the id of line 1" in duplicates[13].reason
    assert "already exists" in duplicates[14].reason
    assert report.ignored_fields == {"extra"}
    rows = stored(db)
    assert set(rows) == {"evt-existing", "evt-00001", "evt-00002", "42", "evt-none", "evt-b64", "evt-escape"}
    assert rows["evt-00001"].camera_id == "front_door" and rows["evt-00001"].label == "person"
    assert rows["evt-00001"].started_at == datetime(2026, 11, 1, 8, 15)
    assert rows["evt-00002"].started_at == datetime(2026, 11, 1, 8, 15)  # +01:00 stored as UTC
    assert rows["evt-00002"].thumbnail_path == "garage/evt-00002.jpg" and rows["evt-00002"].thumbnail_base64 is None
    assert rows["42"].started_at == datetime(2026, 11, 3, 10, 0)
    assert rows["evt-existing"].started_at == T0  # never overwritten
    assert progress[-1] == 16 and progress == sorted(progress)
    json.dumps(report.as_dict())


def test_csv_import_with_large_base64_fields(db, tmp_path):
    big = b64(jpeg_bytes(COLOURS["blue"], size=(640, 480), noise=60))  # > csv's default 128 KiB field limit
    assert len(big) > 131072
    path = tmp_path / "events.csv"
    with open(path, "w", newline="", encoding="utf-8-sig") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "camera_id", "started_at", "label", "thumbnail_base64", "thumbnail_path"])
        writer.writerow(["c1", "front_door", "2026-11-01T08:15:00", "person", big, ""])
        writer.writerow(["c2", "garage", "2026-11-01T08:16:00", "", "", "garage/c2.jpg"])
        writer.writerow(["c3", "garage", "not-a-date", "", GOOD_B64, ""])
        writer.writerow([])
        writer.writerow(["c4", "garage"])
        writer.writerow(["c5", "porch", "2026-11-01T08:17:00", "multi\nline label", GOOD_B64, ""])
        writer.writerow(["c6", "porch", "2026-11-01T08:18:00", "", GOOD_B64, ""])
    report = run_import(db, path, tmp_path)
    assert report.format == "csv" and report.imported == 3
    assert [(e.line, e.event_id) for e in report.errors] == [(4, "c3"), (6, None), (7, "c5")]
    assert "has 2 fields, the header has 6" in report.errors[1].reason
    assert report.errors[2].reason == "label contains control characters"
    rows = stored(db)
    assert set(rows) == {"c1", "c2", "c6"}
    assert rows["c1"].thumbnail_base64 == big and rows["c1"].thumbnail_path is None
    assert rows["c2"].label is None and rows["c2"].thumbnail_base64 is None
    # Line numbers follow the file even after a quoted multi-line field (c5 spans lines 7-8).
    with open(path, "a", newline="") as handle:
        csv.writer(handle).writerow(["c7", "porch", "bad", "", GOOD_B64, ""])
    again = run_import(db, path, tmp_path)
    assert [e.line for e in again.errors][-1] == 10
    assert {d.event_id for d in again.duplicates} == {"c1", "c2", "c6"}


def test_csv_header_must_have_the_required_columns(db, tmp_path):
    path = tmp_path / "events.csv"
    path.write_text("id,camera,started_at,thumbnail_base64\nx,y,2026-11-01,abcd\n")
    with pytest.raises(ImportFormatError, match="lacks required column.*camera_id"):
        run_import(db, path, tmp_path)
    path.write_text("id,camera_id,started_at\nx,y,2026-11-01\n")
    with pytest.raises(ImportFormatError, match="thumbnail_base64 or thumbnail_path"):
        run_import(db, path, tmp_path)


def test_format_detection(db, tmp_path):
    assert detect_format(tmp_path / "a.jsonl") == "jsonl" and detect_format(tmp_path / "a.NDJSON") == "jsonl"
    assert detect_format(tmp_path / "a.csv") == "csv"
    with pytest.raises(ImportFormatError, match="cannot tell the format"):
        detect_format(tmp_path / "a.txt")
    with pytest.raises(ImportFormatError, match="unknown import format 'xml'"):
        detect_format(tmp_path / "a.txt", "xml")
    path = write_jsonl(tmp_path / "events.txt", [
        {"id": "t1", "camera_id": "c", "started_at": "2026-11-01T00:00:00", "thumbnail_base64": GOOD_B64}])
    assert run_import(db, path, tmp_path, fmt="jsonl").imported == 1
    with pytest.raises(ImportFormatError, match="no such file"):
        run_import(db, tmp_path / "missing.jsonl", tmp_path)


def test_non_utf8_line_is_reported_and_the_rest_kept(db, tmp_path):
    path = tmp_path / "events.jsonl"
    good = json.dumps({"id": "u1", "camera_id": "c", "started_at": "2026-11-01T00:00:00", "thumbnail_base64": GOOD_B64})
    path.write_bytes(good.encode() + b"\n" + b'{"id": "\xff\xfe"}\n')
    report = run_import(db, path, tmp_path)
    assert report.imported == 1 and report.errors[0].line == 2 and "not UTF-8" in report.errors[0].reason


def test_count_lines(tmp_path):
    (tmp_path / "a").write_bytes(b"1\n2\n3")
    (tmp_path / "b").write_bytes(b"1\n2\n")
    (tmp_path / "c").write_bytes(b"")
    assert [count_lines(tmp_path / n) for n in "abc"] == [3, 2, 0]


def test_imports_are_chunked(db, tmp_path):
    lines = [{"id": f"k{i}", "camera_id": "c", "started_at": "2026-11-01T00:00:00", "thumbnail_base64": GOOD_B64}
             for i in range(25)]
    report = run_import(db, write_jsonl(tmp_path / "many.jsonl", lines), tmp_path, chunk_size=10)
    assert report.imported == 25 and len(stored(db)) == 25


def test_import_events_file_takes_limits_from_settings(db, tmp_path):
    from cv_assets.events.importer import import_events_file
    from cv_assets.settings import Settings

    settings = Settings.model_validate({"storage": {"thumbnails_root": str(tmp_path / "thumbs")},
                                        "events": {"thumbnail_max_bytes": 1024}})
    big = b64(jpeg_bytes(COLOURS["red"], size=(320, 240), noise=50))
    path = write_jsonl(tmp_path / "events.jsonl", [
        {"id": "small", "camera_id": "c", "started_at": "2026-11-01T00:00:00", "thumbnail_path": "c/small.jpg"},
        {"id": "big", "camera_id": "c", "started_at": "2026-11-01T00:00:00", "thumbnail_base64": big},
    ])
    report = import_events_file(db, path, settings)
    assert report.summary() == "2 rows, 1 imported, 0 duplicates skipped, 1 rejected, 0 with an unusable thumbnail"
    assert "events.thumbnail_max_bytes=1024" in report.errors[0].reason
