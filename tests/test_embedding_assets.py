"""`reference_embeddings` and `frame_embeddings` through Dagster: vectors stored with their
model version, bad inputs recorded without failing the rest, nothing recomputed when
nothing changed, everything re-embedded when the model changes."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from dagster import DagsterInstance, materialize
from PIL import Image
from sqlalchemy import select

from cv_assets.defs.embeddings import EMBEDDING_ASSETS, EMBEDDING_CHECKS, frame_embeddings, reference_embeddings
from cv_assets.defs.resources import build_resources
from cv_assets.embedding import get_embedder, load_image
from cv_assets.store import AppDatabase, Warehouse
from cv_assets.store.models import Asset, EmbeddingFailure, Project

PROJECT = "demo"


def _picture(seed: int, height: int = 180, width: int = 320) -> np.ndarray:
    rng = np.random.default_rng(seed)
    image = np.repeat(np.linspace(60, 200, width, dtype=np.uint8)[None, :, None], height, axis=0).repeat(3, axis=2)
    y, x = int(rng.integers(10, height - 60)), int(rng.integers(10, width - 60))
    image[y:y + 50, x:x + 40] = rng.integers(0, 256, 3, dtype=np.uint8)
    return image


def _jpeg(image: np.ndarray, path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path, "JPEG", quality=92)


class World:
    """A registered project with four reference assets (two good, one truncated, one missing)
    and four sampled frames (three JPEGs on disk, one whose file is gone)."""

    def __init__(self, settings, config_path, tmp_path):
        self.settings, self.config_path = settings, config_path
        self.db = AppDatabase(settings.storage.sqlite_url)
        self.warehouse = Warehouse(settings.storage.duckdb_path)
        self.root = tmp_path / "projects" / PROJECT
        self.refs = {
            "CHAR_01": self.root / "refs" / "CHAR_01.png",
            "PROP_01": tmp_path / "elsewhere" / "PROP_01.jpg",
            "BAD_01": self.root / "refs" / "BAD_01.jpg",
            "GONE_01": self.root / "refs" / "GONE_01.png",
        }
        self.refs["CHAR_01"].parent.mkdir(parents=True)
        Image.fromarray(_picture(1)).save(self.refs["CHAR_01"])
        _jpeg(_picture(2), self.refs["PROP_01"])
        buffer = io.BytesIO()
        Image.fromarray(_picture(3)).save(buffer, "JPEG")
        self.refs["BAD_01"].write_bytes(buffer.getvalue()[:1500])
        with self.db.write() as session:
            project = Project(key=PROJECT, name="Demo", root_path=str(self.root))
            session.add(project)
            session.flush()
            for code, path in self.refs.items():
                # Relative to the project root where it lives there; absolute otherwise.
                stored = str(path.relative_to(self.root)) if path.is_relative_to(self.root) else str(path)
                session.add(Asset(project_id=project.id, code=code, kind="prop", name=code,
                                  reference_image_path=stored))
        self.frames = {(0, 0): _picture(10), (0, 12): _picture(11), (1, 3): _picture(12)}
        rows = []
        for (scene, frame), pixels in self.frames.items():
            path = tmp_path / "frames" / PROJECT / f"s{scene}_f{frame}.jpg"
            _jpeg(pixels, path)
            rows.append(self._frame_row(scene, frame, str(path), pixels))
        rows.append(self._frame_row(1, 40, str(tmp_path / "frames" / "gone.jpg"), _picture(13)))
        self.warehouse.replace_partition("sampled_frames", PROJECT, pd.DataFrame(rows))

    @staticmethod
    def _frame_row(scene: int, frame: int, path: str, pixels: np.ndarray) -> dict:
        return {"project": PROJECT, "scene_index": scene, "frame_index": frame, "timestamp_sec": frame / 24.0,
                "reasons": ["base"], "motion_score": 0.0, "image_path": path, "width": pixels.shape[1],
                "height": pixels.shape[0], "content_hash": hashlib.sha256(pixels.tobytes()).hexdigest()}

    def frame_path(self, scene: int, frame: int) -> Path:
        rows = self.warehouse.query("SELECT image_path FROM sampled_frames WHERE scene_index = ? AND frame_index = ?",
                                    [scene, frame])
        return Path(rows.image_path[0])

    def run(self, settings=None, config_path=None, checks=True):
        settings = settings or self.settings
        instance = DagsterInstance.ephemeral()
        instance.add_dynamic_partitions("projects", [PROJECT])
        result = materialize(
            [*EMBEDDING_ASSETS, *(EMBEDDING_CHECKS if checks else [])],
            partition_key=PROJECT,
            resources=build_resources(settings),
            instance=instance,
        )
        assert result.success
        return result

    def assets(self) -> dict[str, Asset]:
        with self.db.read() as session:
            return {a.code: a for a in session.scalars(select(Asset))}

    def failures(self) -> dict[tuple[str, str], EmbeddingFailure]:
        with self.db.read() as session:
            return {(f.item_kind, f.item_id): f for f in session.scalars(select(EmbeddingFailure))}

    def frame_rows(self) -> pd.DataFrame:
        return self.warehouse.query(
            "SELECT * FROM frame_embeddings WHERE project = ? ORDER BY scene_index, frame_index", [PROJECT])


def _metadata(result, asset_def) -> dict:
    [event] = result.asset_materializations_for_node(asset_def.op.name)
    return {key: value.value for key, value in event.metadata.items()}


def _checks(result) -> dict[str, bool]:
    return {e.check_name: e.passed for e in result.get_asset_check_evaluations()}


@pytest.fixture
def world(settings_factory, tmp_path) -> World:
    settings, config_path = settings_factory()
    return World(settings, config_path, tmp_path)


def test_first_run_embeds_good_inputs_and_records_bad_ones(world):
    result = world.run()
    embedder = get_embedder(world.settings.embedder)
    version = embedder.model_version

    assets = world.assets()
    for code in ("CHAR_01", "PROP_01"):
        row = assets[code]
        vector = np.frombuffer(row.clip_embedding, dtype=np.float32)
        assert vector.shape == (512,) and abs(np.linalg.norm(vector) - 1) < 1e-5
        assert row.embedding_model_version == version
        assert row.reference_image_hash == hashlib.sha256(world.refs[code].read_bytes()).hexdigest()
        np.testing.assert_allclose(vector, embedder.generate_embedding(world.refs[code]), atol=1e-5)
    for code in ("BAD_01", "GONE_01"):
        assert assets[code].clip_embedding is None and assets[code].embedding_model_version is None

    failures = world.failures()
    assert "truncated" in failures[("asset", "demo/BAD_01")].reason
    assert str(world.refs["BAD_01"]) in failures[("asset", "demo/BAD_01")].reason
    assert failures[("asset", "demo/GONE_01")].reason == f"{world.refs['GONE_01']}: reference image not found"
    assert "file not found" in failures[("frame", "demo/1/40")].reason
    assert {f.model_version for f in failures.values()} == {version}
    assert len(failures) == 3

    frames = world.frame_rows()
    assert list(zip(frames.scene_index, frames.frame_index)) == [(0, 0), (0, 12), (1, 3)]
    assert set(frames.model_version) == {version}
    stored = np.stack(frames.embedding.to_list())
    assert stored.shape == (3, 512) and stored.dtype == np.float32
    expected = embedder.embed_images([load_image(world.frame_path(s, f)) for s, f in zip(frames.scene_index,
                                                                                       frames.frame_index)])
    np.testing.assert_allclose(stored, expected, atol=1e-5)

    refs_meta = _metadata(result, reference_embeddings)
    assert (refs_meta["embedded"], refs_meta["skipped_unchanged"], refs_meta["failed"], refs_meta["total"]) == (2, 0, 2, 4)
    assert refs_meta["model_version"] == version
    assert (refs_meta["device"], refs_meta["embedder_family"]) == ("cpu", "clip")
    assert refs_meta["images_per_sec"] > 0 and refs_meta["ms_per_image"] > 0
    assert "CHAR_01" in refs_meta["preview"] and "BAD_01" in refs_meta["failures"]
    frame_meta = _metadata(result, frame_embeddings)
    assert (frame_meta["embedded"], frame_meta["skipped_unchanged"], frame_meta["failed"]) == (3, 0, 1)
    assert _checks(result) == {"reference_embeddings_are_valid": True, "frame_embeddings_are_valid": True}


def test_rerun_recomputes_nothing_and_changed_inputs_are_re_embedded(world):
    world.run()
    first_frames = world.frame_rows()
    first_assets = world.assets()

    again = world.run()
    assert _metadata(again, reference_embeddings)["embedded"] == 0
    assert _metadata(again, reference_embeddings)["skipped_unchanged"] == 2
    assert _metadata(again, frame_embeddings)["embedded"] == 0
    assert _metadata(again, frame_embeddings)["skipped_unchanged"] == 3
    pd.testing.assert_frame_equal(world.frame_rows(), first_frames)  # same rows, same created_at
    assert world.assets()["CHAR_01"].clip_embedding == first_assets["CHAR_01"].clip_embedding
    assert world.failures()[("asset", "demo/BAD_01")].attempts == 2

    # One new reference image, one new frame, the truncated image repaired.
    Image.fromarray(_picture(21)).save(world.refs["CHAR_01"])
    _jpeg(_picture(22), world.refs["BAD_01"])
    new_pixels = _picture(23)
    _jpeg(new_pixels, world.frame_path(0, 0))
    with world.warehouse.transaction() as con:
        con.execute("UPDATE sampled_frames SET content_hash = ? WHERE scene_index = 0 AND frame_index = 0",
                    [hashlib.sha256(new_pixels.tobytes()).hexdigest()])

    third = world.run()
    meta = _metadata(third, reference_embeddings)
    assert (meta["embedded"], meta["skipped_unchanged"], meta["failed"]) == (2, 1, 1)
    assets = world.assets()
    assert assets["CHAR_01"].clip_embedding != first_assets["CHAR_01"].clip_embedding
    assert assets["PROP_01"].clip_embedding == first_assets["PROP_01"].clip_embedding
    assert assets["BAD_01"].clip_embedding is not None
    assert ("asset", "demo/BAD_01") not in world.failures()  # repaired: its failure row is gone
    assert ("asset", "demo/GONE_01") in world.failures()

    frame_meta = _metadata(third, frame_embeddings)
    assert (frame_meta["embedded"], frame_meta["skipped_unchanged"]) == (1, 2)
    frames = world.frame_rows()
    changed = frames[(frames.scene_index == 0) & (frames.frame_index == 0)].iloc[0]
    assert changed.content_hash == hashlib.sha256(new_pixels.tobytes()).hexdigest()
    assert not np.allclose(changed.embedding, first_frames.embedding[0])
    kept = frames[(frames.scene_index == 1)].iloc[0]
    assert kept.created_at == first_frames[first_frames.scene_index == 1].iloc[0].created_at


def test_model_change_re_embeds_everything(world, settings_factory, tiny_clip_dir_b):
    world.run()
    old_version = world.assets()["CHAR_01"].embedding_model_version
    settings_b, config_b = settings_factory(embedder={"model": str(tiny_clip_dir_b)})
    result = world.run(settings_b, config_b)
    new_version = get_embedder(settings_b.embedder).model_version
    assert new_version != old_version
    assert _metadata(result, reference_embeddings)["embedded"] == 2
    assert _metadata(result, frame_embeddings)["embedded"] == 3
    assert {a.embedding_model_version for a in world.assets().values() if a.clip_embedding} == {new_version}
    assert set(world.frame_rows().model_version) == {new_version}
    assert _checks(result) == {"reference_embeddings_are_valid": True, "frame_embeddings_are_valid": True}


def test_checks_catch_a_vector_that_is_not_unit_length(world):
    world.run()
    with world.db.write() as session:
        asset = session.scalar(select(Asset).where(Asset.code == "CHAR_01"))
        asset.clip_embedding = (2 * np.frombuffer(asset.clip_embedding, dtype=np.float32)).tobytes()
    result = world.run()  # unchanged image and model: the asset keeps the (corrupted) vector
    evaluations = {e.check_name: e for e in result.get_asset_check_evaluations()}
    bad = evaluations["reference_embeddings_are_valid"]
    assert not bad.passed
    assert "CHAR_01 (2.0000)" in bad.metadata["not_unit_norm"].value
    assert evaluations["frame_embeddings_are_valid"].passed


def test_missing_model_fails_the_asset_with_the_clear_message(world, settings_factory, tmp_path):
    settings, config_path = settings_factory(embedder={"model": str(tmp_path / "no-clip")})
    instance = DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("projects", [PROJECT])
    result = materialize([reference_embeddings], partition_key=PROJECT, instance=instance,
                         resources=build_resources(settings), raise_on_error=False)
    assert not result.success
    [failure] = [e for e in result.all_events if e.is_step_failure]
    message = failure.step_failure_data.error.message
    assert "CLIP model directory" in message and "no-clip" in message and "embedder.fallback" in message


def test_colour_histogram_fallback_runs_the_assets(world, settings_factory, tmp_path):
    settings, config_path = settings_factory(embedder={"model": str(tmp_path / "no-clip"),
                                                       "fallback": "color_histogram"})
    result = world.run(settings, config_path)
    meta = _metadata(result, reference_embeddings)
    assert (meta["embedder_family"], meta["model_version"], meta["embedded"]) == ("color_histogram",
                                                                                 "color_histogram-v1", 2)
    assert set(world.frame_rows().model_version) == {"color_histogram-v1"}
    assert all(_checks(result).values())


def test_a_rerun_with_nothing_changed_does_not_load_the_model(settings_factory, tmp_path, monkeypatch):
    """Every input current for the model version an earlier run recorded: the assets finish
    without creating the embedder (no torch import, no weights), and say so."""
    from cv_assets.defs.resources import EmbedderResource

    settings, config_path = settings_factory()
    world = World(settings, config_path, tmp_path)
    for code in ("BAD_01", "GONE_01"):  # only readable inputs: nothing is left to retry
        world.refs[code].unlink(missing_ok=True)
    with world.db.write() as session:
        session.query(Asset).filter(Asset.code.in_(["BAD_01", "GONE_01"])).delete()
    rows = world.warehouse.query("SELECT * FROM sampled_frames WHERE NOT (scene_index = 1 AND frame_index = 40)")
    world.warehouse.replace_partition("sampled_frames", PROJECT, rows)
    world.run()
    version = world.assets()["CHAR_01"].embedding_model_version

    def no_model(self):
        raise AssertionError("the embedder was created although nothing changed")

    monkeypatch.setattr(EmbedderResource, "get", no_model)
    again = world.run()
    for asset_def, expected in ((reference_embeddings, 2), (frame_embeddings, 3)):
        meta = _metadata(again, asset_def)
        assert (meta["kept"], meta["model_version"]) == (expected, version) and "embedded" not in meta
        assert meta["status"].startswith("unchanged")  # not zeros (no run id: each run here has its own instance)
        assert meta["embedder_family"] == "not loaded: nothing changed"
    assert all(_checks(again).values())
