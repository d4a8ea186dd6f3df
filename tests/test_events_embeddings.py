"""The event embedding backfill (core functions, with a deterministic embedder)."""

from __future__ import annotations

import io
import json
from datetime import timedelta

import numpy as np
import pytest
from PIL import Image
from sqlalchemy import func, select
from helpers.events import (
    COLOURS,
    T0,
    MeanColourEmbedder,
    add_events,
    b64,
    colour_events,
    jpeg_bytes,
    png_bytes,
)

from cv_assets.store import AppDatabase
from cv_assets.events.backfill import (
    BackfillLimits,
    BatchSizeError,
    EventNotFoundError,
    embed_next_batch,
    event_status,
    resolve_batch_size,
    run_event_backfill,
)
from cv_assets.store.events import count_remaining, latest_event_model_version, write_event_embeddings
from cv_assets.store.models import EmbeddingFailure, Event, EventEmbedding
from cv_assets.store.vectors import vector_from_json


@pytest.fixture
def db(app_db_url):
    """Each test runs on SQLite and on PostgreSQL."""
    return AppDatabase(app_db_url)


def limits(tmp_path, **overrides):
    values = dict(max_batch=100, max_attempts=3, thumbnails_root=tmp_path / "thumbs", thumbnail_max_bytes=1_000_000)
    values.update(overrides)
    return BackfillLimits(**values)


def embeddings(db) -> dict[str, EventEmbedding]:
    with db.read() as session:
        return {row.event_id: row for row in session.scalars(select(EventEmbedding))}


def failures(db) -> dict[str, EmbeddingFailure]:
    with db.read() as session:
        return {row.item_id: row for row in session.scalars(select(EmbeddingFailure))}


# ---------------------------------------------------------------- batch size


def test_batch_size_defaults_to_max_batch_and_refuses_more():
    assert resolve_batch_size(None, 100) == 100
    assert resolve_batch_size(None, 20) == 20
    assert resolve_batch_size(7, 20) == 7
    with pytest.raises(BatchSizeError, match=r"batch_size 101 is over the limit of 100 events per batch"):
        resolve_batch_size(101, 100)
    with pytest.raises(BatchSizeError, match=r"batch_size 21 is over the limit of 20 .*events.max_batch=20"):
        resolve_batch_size(21, 20)
    with pytest.raises(BatchSizeError, match="at least 1"):
        resolve_batch_size(0, 20)


def test_ceiling_of_100_holds_even_if_max_batch_were_larger():
    with pytest.raises(BatchSizeError, match="ceiling 100"):
        resolve_batch_size(150, 500)
    assert resolve_batch_size(None, 500) == 100


def test_oversized_batch_request_is_refused_before_embedding(db, tmp_path):
    colour_events(db, ["red"] * 3)
    embedder = MeanColourEmbedder()
    with pytest.raises(BatchSizeError, match="batch_size 101"):
        embed_next_batch(db, embedder, batch_size=101, limits=limits(tmp_path))
    assert embedder.calls == [] and embeddings(db) == {}


# ---------------------------------------------------------------- missing mode


def test_missing_mode_embeds_oldest_first_in_batches(db, tmp_path):
    # Inserted newest first, so "oldest first" has to come from started_at.
    rows = [
        {"id": f"e{i}", "camera_id": "cam", "started_at": T0 + timedelta(minutes=10 - i),
         "thumbnail_base64": b64(jpeg_bytes(COLOURS["red"]))}
        for i in range(5)
    ]
    add_events(db, rows)
    embedder = MeanColourEmbedder()
    first = embed_next_batch(db, embedder, batch_size=2, limits=limits(tmp_path))
    assert [o.event_id for o in first.outcomes] == ["e4", "e3"]
    assert first.embedded == 2 and first.failed == 0
    with db.read() as session:
        assert count_remaining(session, embedder.model_version, 3) == 3
    second = embed_next_batch(db, embedder, batch_size=2, limits=limits(tmp_path))
    assert [o.event_id for o in second.outcomes] == ["e2", "e1"]
    stored = embeddings(db)
    assert set(stored) == {"e4", "e3", "e2", "e1"}
    vector = vector_from_json(stored["e4"].embedding)
    assert vector.shape == (512,) and abs(np.linalg.norm(vector) - 1) < 1e-5
    assert stored["e4"].model_version == "mean-colour-v1" and stored["e4"].created_at is not None


def test_missing_mode_skips_events_already_embedded_for_this_version(db, tmp_path):
    colour_events(db, ["red", "blue"])
    embedder = MeanColourEmbedder()
    embed_next_batch(db, embedder, limits=limits(tmp_path))
    again = embed_next_batch(db, embedder, limits=limits(tmp_path))
    assert again.outcomes == [] and embedder.calls == [2]


def test_a_new_model_version_re_embeds_in_missing_mode(db, tmp_path):
    ids = colour_events(db, ["red", "blue"])
    embed_next_batch(db, MeanColourEmbedder("v1"), limits=limits(tmp_path))
    with db.read() as session:
        assert latest_event_model_version(session) == "v1"
        assert count_remaining(session, "v2", 3) == 2
    result = embed_next_batch(db, MeanColourEmbedder("v2"), limits=limits(tmp_path))
    assert result.embedded == 2
    assert {row.model_version for row in embeddings(db).values()} == {"v2"}
    assert set(embeddings(db)) == set(ids)
    with db.read() as session:
        assert latest_event_model_version(session) == "v2"


# ---------------------------------------------------------------- failures


def _truncated_jpeg() -> bytes:
    data = jpeg_bytes(COLOURS["green"], size=(320, 240), noise=40)
    return data[: len(data) // 2]


def _bomb_png() -> bytes:
    buffer = io.BytesIO()
    Image.new("1", (9000, 8000)).save(buffer, "PNG")  # 72 M pixels in a few kB
    return buffer.getvalue()


def test_bad_thumbnails_are_recorded_and_never_block_the_batch(db, tmp_path):
    root = tmp_path / "thumbs"
    (root / "cam").mkdir(parents=True)
    (root / "cam" / "ok.png").write_bytes(png_bytes(COLOURS["blue"]))
    bad = {
        "bad-b64": {"thumbnail_base64": "abc*def"},
        "missing-file": {"thumbnail_path": "cam/nope.jpg"},
        "escape": {"thumbnail_path": "../outside.jpg"},
        "not-image": {"thumbnail_base64": b64(b"this is not an image at all")},
        "truncated": {"thumbnail_base64": b64(_truncated_jpeg())},
        "bomb": {"thumbnail_base64": b64(_bomb_png())},
        "no-thumb": {},
    }
    good = {
        "good-b64": {"thumbnail_base64": "data:image/jpeg;base64," + b64(jpeg_bytes(COLOURS["red"]))},
        "good-file": {"thumbnail_path": "cam/ok.png"},
    }
    rows = [
        {"id": event_id, "camera_id": "cam", "started_at": T0 + timedelta(seconds=i), "label": "x", **thumb}
        for i, (event_id, thumb) in enumerate({**bad, **good}.items())
    ]
    add_events(db, rows)
    with db.read() as session:
        before = {e.id: (e.camera_id, e.started_at, e.thumbnail_base64, e.thumbnail_path) for e in session.scalars(select(Event))}
    result = embed_next_batch(db, MeanColourEmbedder(), limits=limits(tmp_path))
    assert result.embedded == 2 and result.failed == len(bad)
    assert set(embeddings(db)) == set(good)
    recorded = failures(db)
    assert set(recorded) == set(bad)
    for event_id, failure in recorded.items():
        assert event_id in failure.reason, failure.reason
        assert failure.item_kind == "event" and failure.attempts == 1 and failure.model_version == "mean-colour-v1"
    assert "not valid base64" in recorded["bad-b64"].reason
    assert "not found" in recorded["missing-file"].reason
    assert "'..'" in recorded["escape"].reason
    assert "not a recognised image format" in recorded["not-image"].reason
    assert "truncated" in recorded["truncated"].reason
    assert "decompression bomb" in recorded["bomb"].reason
    assert "no thumbnail" in recorded["no-thumb"].reason
    with db.read() as session:
        after = {e.id: (e.camera_id, e.started_at, e.thumbnail_base64, e.thumbnail_path) for e in session.scalars(select(Event))}
    assert after == before  # failures never change the events


def test_failed_events_are_retried_at_most_max_attempts_times(db, tmp_path):
    add_events(db, [{"id": "broken", "camera_id": "cam", "started_at": T0, "thumbnail_path": "gone.jpg"}])
    colour_events(db, ["red"], start=T0 + timedelta(hours=1))
    embedder = MeanColourEmbedder()
    attempts = []
    for _ in range(5):
        result = embed_next_batch(db, embedder, limits=limits(tmp_path, max_attempts=3))
        attempts.append([(o.event_id, o.status, o.attempts) for o in result.outcomes])
    assert attempts[0] == [("broken", "failed", 1), ("evt-0000", "embedded", None)]
    assert attempts[1] == [("broken", "failed", 2)]
    assert attempts[2] == [("broken", "failed", 3)]
    assert attempts[3] == [] and attempts[4] == []  # given up: the backfill terminates
    assert failures(db)["broken"].attempts == 3
    with db.read() as session:
        assert count_remaining(session, embedder.model_version, 3) == 0
        assert count_remaining(session, embedder.model_version, 4) == 1  # a higher cap would try again


def test_success_clears_the_failure_row(db, tmp_path):
    root = tmp_path / "thumbs"
    root.mkdir()
    add_events(db, [{"id": "late-file", "camera_id": "cam", "started_at": T0, "thumbnail_path": "late.jpg"}])
    embedder = MeanColourEmbedder()
    assert embed_next_batch(db, embedder, limits=limits(tmp_path)).failed == 1
    assert "late-file" in failures(db)
    (root / "late.jpg").write_bytes(jpeg_bytes(COLOURS["yellow"]))
    assert embed_next_batch(db, embedder, limits=limits(tmp_path)).embedded == 1
    assert failures(db) == {}
    assert "late-file" in embeddings(db)


def test_failure_rows_are_per_model_version(db, tmp_path):
    add_events(db, [{"id": "broken", "camera_id": "cam", "started_at": T0, "thumbnail_base64": "@@@@"}])
    embed_next_batch(db, MeanColourEmbedder("v1"), limits=limits(tmp_path, max_attempts=1))
    assert embed_next_batch(db, MeanColourEmbedder("v1"), limits=limits(tmp_path, max_attempts=1)).outcomes == []
    result = embed_next_batch(db, MeanColourEmbedder("v2"), limits=limits(tmp_path, max_attempts=1))
    assert [o.attempts for o in result.outcomes] == [1]  # a new model gets its own attempts
    with db.read() as session:
        rows = session.execute(select(EmbeddingFailure.model_version, EmbeddingFailure.attempts)).all()
    assert sorted(rows) == [("v1", 1), ("v2", 1)]


# ---------------------------------------------------------------- mode all and whole backfills


def test_mode_all_re_embeds_everything_once_and_terminates(db, tmp_path):
    ids = colour_events(db, ["red", "blue", "green", "yellow", "red"])
    add_events(db, [{"id": "broken", "camera_id": "cam", "started_at": T0 + timedelta(minutes=1), "thumbnail_base64": "!"}])
    embedder = MeanColourEmbedder()
    run_event_backfill(db, embedder, mode="missing", limits=limits(tmp_path, max_attempts=1))
    first = embeddings(db)
    report = run_event_backfill(db, embedder, mode="all", batch_size=2, limits=limits(tmp_path, max_attempts=1))
    assert report.batches == 3 and report.embedded == 5 and report.failed == 1  # the given-up event is tried again
    second = embeddings(db)
    assert set(second) == set(ids)
    for event_id in ids:
        assert second[event_id].id > max(row.id for row in first.values())  # replaced with fresh row ids
        assert second[event_id].created_at >= first[event_id].created_at
    assert failures(db)["broken"].attempts == 2
    assert report.remaining == 0 and report.skipped == 1


def test_backfill_in_missing_mode_runs_until_done_and_reports(db, tmp_path):
    colour_events(db, ["red", "blue", "green"] * 5)  # 15 events
    add_events(db, [{"id": "broken", "camera_id": "cam", "started_at": T0, "thumbnail_base64": "x"}])
    seen = []
    report = run_event_backfill(
        db, MeanColourEmbedder(), mode="missing", batch_size=4, on_batch=lambda b: seen.append(len(b.outcomes)),
        limits=limits(tmp_path),
    )
    assert seen == [4, 4, 4, 4]  # the failing event is tried once per backfill, not three times in a row
    assert report.embedded == 15 and report.failed == 1
    assert report.total_events == 16 and report.embedded_events == 15
    assert report.remaining == 1 and report.skipped == 0  # retried by the next backfill, up to max_attempts
    assert round(report.coverage_pct, 2) == 93.75
    assert report.images_per_sec > 0
    document = report.as_dict()
    assert document["failures"] == {"broken": report.failures["broken"]}
    json.dumps(document)


def test_writes_skip_events_deleted_meanwhile(db):
    colour_events(db, ["red"])
    with db.write() as session:
        written = write_event_embeddings(
            session, "v1", {"evt-0000": np.eye(512, dtype=np.float32)[0], "deleted": np.eye(512, dtype=np.float32)[1]}
        )
    assert written == 1
    assert set(embeddings(db)) == {"evt-0000"}


# ---------------------------------------------------------------- status


def test_status_reports_embedded_failed_and_unknown(db, tmp_path):
    colour_events(db, ["red"])
    add_events(db, [{"id": "broken", "camera_id": "cam", "started_at": T0 + timedelta(hours=1), "thumbnail_base64": "%%"}])
    add_events(db, [{"id": "fresh", "camera_id": "cam", "started_at": T0 + timedelta(hours=2),
                     "thumbnail_base64": b64(jpeg_bytes(COLOURS["red"]))}])
    embed_next_batch(db, MeanColourEmbedder(), batch_size=2, limits=limits(tmp_path))
    ok = event_status(db, "evt-0000")
    assert ok["embedded"] and ok["model_version"] == "mean-colour-v1" and ok["created_at"] and not ok["stale"]
    assert ok["failures"] == []
    broken = event_status(db, "broken")
    assert not broken["embedded"] and broken["model_version"] is None
    assert broken["failures"][0]["attempts"] == 1 and "not valid base64" in broken["failures"][0]["reason"]
    fresh = event_status(db, "fresh")
    assert not fresh["embedded"] and fresh["failures"] == []
    with pytest.raises(EventNotFoundError, match="'nope' not found"):
        event_status(db, "nope")


def test_status_marks_vectors_of_an_older_model_as_stale(db, tmp_path):
    colour_events(db, ["red", "blue"])
    embed_next_batch(db, MeanColourEmbedder("v1"), limits=limits(tmp_path))
    embed_next_batch(db, MeanColourEmbedder("v2"), batch_size=1, limits=limits(tmp_path))
    statuses = {s["event_id"]: s for s in (event_status(db, "evt-0000"), event_status(db, "evt-0001"))}
    assert statuses["evt-0000"]["model_version"] == "v2" and not statuses["evt-0000"]["stale"]
    assert statuses["evt-0001"]["model_version"] == "v1" and statuses["evt-0001"]["stale"]
    assert statuses["evt-0001"]["current_model_version"] == "v2"
    with db.read() as session:
        assert session.scalar(select(func.count()).select_from(EventEmbedding)) == 2


def test_real_embedder_handles_odd_colour_modes_and_exif(db, tmp_path, settings_factory):
    """Through the tiny CLIP model: CMYK JPEG, RGBA and 16-bit PNG, palette GIF, an
    EXIF-rotated JPEG all embed; a truncated JPEG is a recorded failure."""
    from cv_assets.embedding import get_embedder

    def encoded(image: Image.Image, fmt: str, **save) -> str:
        buffer = io.BytesIO()
        image.save(buffer, fmt, **save)
        return b64(buffer.getvalue())

    rgb = Image.fromarray(np.dstack([np.full((90, 120), v, np.uint8) for v in (200, 40, 40)]))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    thumbs = {
        "cmyk": encoded(rgb.convert("CMYK"), "JPEG"),
        "rgba": encoded(rgb.convert("RGBA"), "PNG"),
        "grey16": encoded(Image.fromarray(np.full((60, 80), 40000, np.uint16)), "PNG"),
        "palette": encoded(rgb.convert("P"), "GIF"),
        "exif": encoded(rgb, "JPEG", exif=exif.tobytes()),
        "truncated": b64(_truncated_jpeg()),
    }
    add_events(db, [{"id": k, "camera_id": "cam", "started_at": T0 + timedelta(seconds=i), "thumbnail_base64": v}
                    for i, (k, v) in enumerate(thumbs.items())])
    settings, _ = settings_factory()
    embedder = get_embedder(settings.embedder)
    result = embed_next_batch(db, embedder, limits=limits(tmp_path))
    assert {o.event_id for o in result.outcomes if o.status == "embedded"} == set(thumbs) - {"truncated"}
    assert "event truncated" in failures(db)["truncated"].reason and "truncated" in failures(db)["truncated"].reason
    assert {row.model_version for row in embeddings(db).values()} == {embedder.model_version}
