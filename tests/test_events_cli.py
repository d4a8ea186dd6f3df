"""`cv-assets events ...` end to end, with the tiny CLIP model through the real embedder."""

from __future__ import annotations

import argparse
import json
from datetime import timedelta

import pytest
from helpers.events import COLOURS, T0, add_events, b64, colour_events, jpeg_bytes

from cv_assets.events.search import clear_vector_indexes
from cv_assets.cli.events import add_events_parser, main
from cv_assets.store import AppDatabase


@pytest.fixture(autouse=True)
def fresh_indexes():
    clear_vector_indexes()
    yield
    clear_vector_indexes()


@pytest.fixture
def setup(settings_factory):
    settings, config_path = settings_factory(events={"max_batch": 4})
    return settings, str(config_path), AppDatabase(settings.storage.sqlite_url)


def run(capsys, config, *argv):
    code = main(["--config", config, *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def run_json(capsys, config, *argv):
    code, out, err = run(capsys, config, *argv, "--json")
    return code, json.loads(out), err


def test_every_command_has_help(capsys):
    for command in ("status", "similar", "search", "import", "backfill", "visitors"):
        with pytest.raises(SystemExit) as exit_info:
            main([command, "--help"])
        assert exit_info.value.code == 0
        assert "--json" in capsys.readouterr().out


def test_import_backfill_status_similar_round_trip(capsys, setup, tmp_path):
    settings, config, db = setup
    thumbs = settings.storage.thumbnails_root
    (thumbs / "garage").mkdir(parents=True)
    (thumbs / "garage" / "g1.jpg").write_bytes(jpeg_bytes(COLOURS["blue"]))
    lines = [
        {"id": f"evt-{i}", "camera_id": "front_door", "started_at": (T0 + timedelta(minutes=i)).isoformat(),
         "label": "person", "thumbnail_base64": b64(jpeg_bytes(COLOURS["red"], noise=4, seed=i))}
        for i in range(6)
    ]
    lines.append({"id": "g1", "camera_id": "garage", "started_at": T0.isoformat(), "thumbnail_path": "garage/g1.jpg"})
    lines.append({"id": "broken", "camera_id": "garage", "started_at": T0.isoformat(), "thumbnail_path": "garage/none.jpg"})
    path = tmp_path / "events.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")

    code, report, _ = run_json(capsys, config, "import", str(path))
    assert code == 0 and report["imported"] == 8 and report["errors"] == []
    code, report, _ = run_json(capsys, config, "import", str(path))
    assert code == 0 and report["imported"] == 0 and len(report["duplicates"]) == 8

    code, report, err = run_json(capsys, config, "backfill", "--batch-size", "101")
    assert code == 1 and "batch_size 101 is over the limit of 4" in report["error"] and "error:" in err

    code, report, _ = run_json(capsys, config, "backfill")
    assert code == 0
    assert report["embedded"] == 7 and report["failed"] == 1 and report["batches"] == 2
    assert report["remaining"] == 1 and report["coverage_pct"] == 87.5
    assert report["model_version"].startswith("clip:tiny-clip@sha256:")
    assert "broken" in report["failures"]["broken"] and "not found" in report["failures"]["broken"]

    code, status, _ = run_json(capsys, config, "status", "evt-0")
    assert code == 0 and status["embedded"] and status["model_version"] == report["model_version"]
    code, text, _ = run(capsys, config, "status", "broken")
    assert code == 0 and "embedded: no" in text and "failed 1x" in text and "not found" in text
    code, document, err = run_json(capsys, config, "status", "nope")
    assert code == 1 and document == {"error": "event 'nope' not found"} and "not found" in err

    code, similar, _ = run_json(capsys, config, "similar", "evt-0", "--min-similarity", "-1", "--limit", "3")
    assert code == 0 and len(similar["matches"]) == 3
    assert "evt-0" not in [m["event_id"] for m in similar["matches"]]
    assert similar["searched"] == 7
    code, similar, _ = run_json(capsys, config, "similar", "evt-0", "--camera", "garage", "--min-similarity", "-1")
    assert [m["event_id"] for m in similar["matches"]] == ["g1"]
    code, text, _ = run(capsys, config, "similar", "evt-0", "--camera", "porch")
    assert code == 0 and "no matching events" in text
    code, document, _ = run_json(capsys, config, "similar", "broken")
    assert code == 1 and "has no embedding yet" in document["error"]
    code, document, _ = run_json(capsys, config, "similar", "ghost")
    assert code == 1 and "not found" in document["error"]

    code, found, _ = run_json(capsys, config, "search", "a red car", "--limit", "2")
    assert code == 0 and len(found["matches"]) == 2 and found["model_version"] == report["model_version"]

    code, visitors, _ = run_json(capsys, config, "visitors", "--update", "--min-events", "1")
    assert code == 0 and visitors["update"]["events_considered"] == 7
    assert sum(v["event_count"] for v in visitors["visitors"]) == 7


def test_import_with_rejected_rows_exits_1(capsys, setup, tmp_path):
    _, config, _ = setup
    path = tmp_path / "events.csv"
    path.write_text("id,camera_id,started_at,thumbnail_base64\nok,cam,2026-11-01T00:00:00,"
                    + b64(jpeg_bytes(COLOURS["red"])) + "\nbad,cam,never,abcd\n")
    code, text, _ = run(capsys, config, "import", str(path))
    assert code == 1
    assert "2 rows, 1 imported, 0 duplicates skipped, 1 rejected" in text
    assert "line 3 (event bad): started_at 'never' is not an ISO 8601" in text
    code, document, _ = run_json(capsys, config, "import", str(tmp_path / "nope.csv"))
    assert code == 1 and "no such file" in document["error"]


def test_backfill_mode_all_and_max_batches(capsys, setup):
    _, config, db = setup
    colour_events(db, ["red", "blue", "green", "yellow", "red", "blue"])
    code, report, _ = run_json(capsys, config, "backfill", "--max-batches", "1")
    assert report["embedded"] == 4 and report["remaining"] == 2
    code, report, _ = run_json(capsys, config, "backfill", "--mode", "all", "--batch-size", "3")
    assert code == 0 and report["embedded"] == 6 and report["batches"] == 2 and report["remaining"] == 0
    code, text, _ = run(capsys, config, "backfill")
    assert code == 0 and "0 embedded" in text and "coverage 100.0%" in text


def test_search_with_the_colour_histogram_fallback_explains_itself(capsys, settings_factory, tmp_path):
    settings, config_path = settings_factory(embedder={"model": str(tmp_path / "no-model"), "fallback": "color_histogram"})
    add_events(AppDatabase(settings.storage.sqlite_url), [
        {"id": "e1", "camera_id": "c", "started_at": T0, "thumbnail_base64": b64(jpeg_bytes(COLOURS["red"]))}])
    code, document, _ = run_json(capsys, str(config_path), "search", "a person")
    assert code == 1 and "needs a CLIP embedder" in document["error"] and "color_histogram" in document["error"]


def test_mounts_under_a_top_level_parser(capsys, setup):
    _, config, db = setup
    colour_events(db, ["red"])
    parser = argparse.ArgumentParser(prog="cv-assets")
    parser.add_argument("--config")
    add_events_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["--config", config, "events", "status", "evt-0000", "--json"])
    assert args.func(args) == 0
    assert json.loads(capsys.readouterr().out)["embedded"] is False


def test_runs_through_the_cv_assets_command(capsys, setup):
    from cv_assets.cli import main as cv_assets_main

    _, config, db = setup
    colour_events(db, ["red", "blue"])
    assert cv_assets_main(["--config", config, "events", "backfill", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["embedded"] == 2
    assert cv_assets_main(["--config", config, "events", "status", "ghost"]) == 1
    assert "event 'ghost' not found" in capsys.readouterr().err
