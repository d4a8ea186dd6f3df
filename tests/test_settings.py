"""Config loading: defaults, validation errors that name the key, env overrides, paths."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import yaml

from cv_assets.settings import (
    CONFIG_ENV,
    DEFAULT_CONFIG,
    ConfigError,
    Settings,
    load_settings,
)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    """No CV_ASSETS* variable from the outer shell may leak into these tests."""
    import os

    for name in list(os.environ):
        if name.startswith("CV_ASSETS"):
            monkeypatch.delenv(name)


def write_config(tmp_path: Path, text: str, name: str = "config.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def load_error(path: Path, env: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        load_settings(path, env={} if env is None else env)
    return str(info.value)


# --- defaults -----------------------------------------------------------------------


def test_empty_file_gives_every_default(tmp_path):
    settings = load_settings(write_config(tmp_path, ""), env={})
    defaults = Settings()
    for section in ("embedder", "sampling", "cv_analysis", "appearances", "continuity", "events"):
        assert getattr(settings, section) == getattr(defaults, section), section
    assert settings.cv_analysis.clip_similarity_threshold == 0.65
    assert settings.events.max_batch == 100
    # Storage keeps the default names, resolved against the config file's folder.
    assert settings.storage.duckdb_path == tmp_path / "data" / "warehouse.duckdb"


def test_omitted_sections_and_keys_take_defaults(tmp_path):
    path = write_config(tmp_path, """
        cv_analysis:
          max_frames_per_clip: 12
    """)
    settings = load_settings(path, env={})
    assert settings.cv_analysis.max_frames_per_clip == 12
    assert settings.cv_analysis.motion_delta_threshold == 0.15
    assert settings.cv_analysis.face_match_threshold == 0.6
    assert settings.events == Settings().events
    assert settings.sampling.base_offsets_sec == [0.0, 2.0, 4.0, 6.0]


def test_section_with_every_key_commented_out_reads_as_defaults(tmp_path):
    path = write_config(tmp_path, """
        events:
          # max_batch: 10
        cv_analysis:
    """)
    settings = load_settings(path, env={"CV_ASSETS__EVENTS__MAX_BATCH": "7"})
    assert settings.events.max_batch == 7
    assert settings.cv_analysis == Settings().cv_analysis


def test_checked_in_config_loads_with_the_seed_thresholds():
    settings = load_settings(DEFAULT_CONFIG, env={})
    defaults = Settings()
    seed = {
        "clip_similarity_threshold": 0.65,
        "motion_delta_threshold": 0.15,
        "max_frames_per_clip": 8,
        "quality_gate_threshold": 5.0,
        "face_match_threshold": 0.6,
    }
    for key, value in seed.items():
        assert getattr(settings.cv_analysis, key) == value, key
        assert getattr(defaults.cv_analysis, key) == value, key
    assert settings.events.max_batch == defaults.events.max_batch == 100
    # Every key the file sets is a known key with a default in settings.py.
    raw = yaml.safe_load(DEFAULT_CONFIG.read_text())
    for section, values in raw.items():
        fields = type(getattr(defaults, section)).model_fields
        assert set(values) <= set(fields), (section, set(values) - set(fields))


def test_no_file_and_no_env_uses_the_checked_in_config(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    settings = load_settings(env={})
    assert settings.storage.duckdb_path == DEFAULT_CONFIG.parent / "data" / "warehouse.duckdb"
    assert settings.cv_analysis.clip_similarity_threshold == 0.65


def test_loading_does_not_touch_the_class_defaults(tmp_path):
    load_settings(write_config(tmp_path, ""), env={})
    assert Settings().storage.duckdb_path == Path("data/warehouse.duckdb")
    assert Settings().storage.sqlite_url == "sqlite:///data/cv_assets.sqlite"


# --- validation errors name the key -------------------------------------------------


def test_wrong_type_names_the_key(tmp_path):
    message = load_error(write_config(tmp_path, """
        cv_analysis:
          max_frames_per_clip: many
    """))
    assert "cv_analysis.max_frames_per_clip" in message
    assert "'many'" in message
    assert str(tmp_path / "config.yaml") in message


@pytest.mark.parametrize(
    "section, key, value",
    [
        ("cv_analysis", "clip_similarity_threshold", 1.5),
        ("cv_analysis", "motion_delta_threshold", -0.1),
        ("cv_analysis", "face_match_threshold", 2),
        ("cv_analysis", "quality_gate_threshold", 11),
        ("events", "max_batch", 101),
        ("events", "max_batch", 0),
    ],
)
def test_out_of_range_value_names_the_key(tmp_path, section, key, value):
    message = load_error(write_config(tmp_path, f"{section}:\n  {key}: {value}\n"))
    assert f"{section}.{key}" in message
    assert f"(got {value!r})" in message


def test_unknown_top_level_section_is_rejected(tmp_path):
    message = load_error(write_config(tmp_path, "cv_analysys:\n  max_frames_per_clip: 4\n"))
    assert "cv_analysys: unknown key" in message


def test_unknown_key_inside_a_section_is_rejected(tmp_path):
    message = load_error(write_config(tmp_path, "cv_analysis:\n  clip_similarity_treshold: 0.5\n"))
    assert "cv_analysis.clip_similarity_treshold: unknown key" in message


def test_every_bad_key_is_listed_at_once(tmp_path):
    message = load_error(write_config(tmp_path, """
        cv_analysis: {clip_similarity_threshold: 3, max_frames_per_clip: 0}
        events: {max_batch: 1000, colour: red}
    """))
    for key in ("cv_analysis.clip_similarity_threshold", "cv_analysis.max_frames_per_clip",
                "events.max_batch", "events.colour: unknown key"):
        assert key in message


def test_nested_values_are_validated(tmp_path):
    message = load_error(write_config(tmp_path, """
        appearances: {thresholds: {color_histogram: 1.4}}
        continuity: {weights: {identity: -1}}
    """))
    assert "appearances.thresholds.color_histogram" in message
    assert "continuity.weights.identity" in message


def test_unknown_database_scheme_is_rejected(tmp_path):
    message = load_error(write_config(tmp_path, "storage: {database_url: 'mysql://x/y'}\n"))
    assert "storage.database_url: must be a sqlite:/// or postgresql+psycopg:// URL (got 'mysql://x/y')" in message


def test_database_url_takes_postgresql_and_sqlite_url_stays_an_alias(tmp_path):
    storage = load_settings(write_config(tmp_path, "storage: {database_url: 'postgresql://u:p@db:5432/cv'}\n"),
                            env={}).storage
    assert storage.database_url == storage.sqlite_url == "postgresql+psycopg://u:p@db:5432/cv"
    assert not storage.is_sqlite
    with pytest.warns(DeprecationWarning, match="storage.database_url"):
        legacy = load_settings(write_config(tmp_path, "storage: {sqlite_url: 'sqlite:///old.sqlite'}\n"),
                               env={}).storage
    assert legacy.database_url == legacy.sqlite_url == f"sqlite:///{tmp_path / 'old.sqlite'}"
    both = load_settings(write_config(tmp_path, "storage: {sqlite_url: 'sqlite:///a', database_url: 'sqlite:///b'}\n"),
                         env={}).storage
    assert both.database_url == both.sqlite_url == f"sqlite:///{tmp_path / 'b'}"


def test_ducklake_needs_a_catalog(tmp_path):
    message = load_error(write_config(tmp_path, "storage: {warehouse: ducklake}\n"))
    assert "ducklake_catalog_url" in message


# --- environment overrides ----------------------------------------------------------


def test_env_overrides_single_keys(tmp_path, monkeypatch):
    path = write_config(tmp_path, "events: {max_batch: 20, similar_limit: 5}\n")
    monkeypatch.setenv("CV_ASSETS__EVENTS__MAX_BATCH", "50")
    monkeypatch.setenv("CV_ASSETS__EMBEDDER__MODEL", "/x")
    settings = load_settings(path)
    assert settings.events.max_batch == 50
    assert settings.events.similar_limit == 5  # untouched keys of the section stay
    assert settings.embedder.model == "/x"
    assert settings.embedder.batch_size == 32


def test_env_parses_yaml_scalars_and_nested_keys(tmp_path):
    env = {
        "CV_ASSETS__SAMPLING__INCLUDE_LAST": "false",
        "CV_ASSETS__SAMPLING__BASE_OFFSETS_SEC": "[0, 1.5]",
        "CV_ASSETS__CONTINUITY__WEIGHTS__IDENTITY": "0.4",
        "CV_ASSETS__EMBEDDER__CACHE_DIR": "",  # empty means null
        "OTHER_VARIABLE": "ignored",
    }
    settings = load_settings(write_config(tmp_path, "embedder: {cache_dir: /tmp/hf}\n"), env=env)
    assert settings.sampling.include_last is False
    assert settings.sampling.base_offsets_sec == [0.0, 1.5]
    assert settings.continuity.weights.identity == 0.4
    assert settings.continuity.weights.adherence == 0.5
    assert settings.embedder.cache_dir is None


def test_env_text_that_is_not_yaml_stays_a_string(tmp_path):
    env = {"CV_ASSETS__EVENTS__BACKFILL_CRON": "*/5 * * * *", "CV_ASSETS__EMBEDDER__REVISION": "20240101"}
    settings = load_settings(write_config(tmp_path, ""), env=env)
    assert settings.events.backfill_cron == "*/5 * * * *"
    assert settings.embedder.revision == "20240101"


def test_bad_env_value_names_the_key_and_the_variable(tmp_path, monkeypatch):
    monkeypatch.setenv("CV_ASSETS__EVENTS__MAX_BATCH", "500")
    with pytest.raises(ConfigError) as info:
        load_settings(write_config(tmp_path, ""))
    message = str(info.value)
    assert "events.max_batch" in message
    assert "CV_ASSETS__EVENTS__MAX_BATCH" in message
    assert "500" in message


def test_env_unknown_key_and_malformed_name_are_rejected(tmp_path):
    path = write_config(tmp_path, "")
    assert "events.max_batches: unknown key" in load_error(path, {"CV_ASSETS__EVENTS__MAX_BATCHES": "5"})
    assert "CV_ASSETS__EVENTS" in load_error(path, {"CV_ASSETS__EVENTS": "5"})


def test_env_cannot_descend_into_a_scalar(tmp_path):
    message = load_error(write_config(tmp_path, ""), {"CV_ASSETS__EVENTS__MAX_BATCH__X": "1"})
    assert "CV_ASSETS__EVENTS__MAX_BATCH__X" in message


def test_config_env_variable_selects_another_file(tmp_path, monkeypatch):
    other = write_config(tmp_path, "cv_analysis: {max_frames_per_clip: 3}\n", name="other.yaml")
    monkeypatch.setenv(CONFIG_ENV, str(other))
    settings = load_settings()
    assert settings.cv_analysis.max_frames_per_clip == 3
    assert settings.storage.frames_dir == tmp_path / "data" / "frames"


def test_explicit_path_wins_over_config_env(tmp_path, monkeypatch):
    monkeypatch.setenv(CONFIG_ENV, str(write_config(tmp_path, "events: {max_batch: 1}\n", name="a.yaml")))
    settings = load_settings(write_config(tmp_path, "events: {max_batch: 2}\n", name="b.yaml"))
    assert settings.events.max_batch == 2


# --- files --------------------------------------------------------------------------


def test_missing_explicit_file_names_the_path(tmp_path):
    missing = tmp_path / "nope" / "config.yaml"
    message = load_error(missing)
    assert str(missing) in message
    assert "not found" in message


def test_missing_file_from_config_env_names_the_path(tmp_path, monkeypatch):
    missing = tmp_path / "gone.yaml"
    monkeypatch.setenv(CONFIG_ENV, str(missing))
    with pytest.raises(ConfigError, match="gone.yaml"):
        load_settings()


def test_invalid_yaml_names_the_path(tmp_path):
    path = write_config(tmp_path, "events: {max_batch: [1,\n")
    message = load_error(path)
    assert str(path) in message
    assert "not valid YAML" in message


def test_top_level_must_be_a_mapping(tmp_path):
    path = write_config(tmp_path, "- storage\n- events\n")
    message = load_error(path)
    assert str(path) in message
    assert "mapping" in message


# --- paths --------------------------------------------------------------------------


def test_relative_storage_paths_resolve_against_the_config_dir(tmp_path, monkeypatch):
    config_dir = tmp_path / "conf"
    config_dir.mkdir()
    path = write_config(config_dir, """
        storage:
          sqlite_url: sqlite:///db/app.sqlite
          duckdb_path: ../wh/warehouse.duckdb
          frames_dir: frames
          reports_dir: /abs/reports
    """)
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # the working directory must not matter
    storage = load_settings(path, env={}).storage
    assert storage.sqlite_url == f"sqlite:///{config_dir / 'db' / 'app.sqlite'}"
    assert storage.duckdb_path == tmp_path / "wh" / "warehouse.duckdb"
    assert storage.frames_dir == config_dir / "frames"
    assert storage.reports_dir == Path("/abs/reports")
    assert storage.projects_root == config_dir / "data" / "projects"
    assert all(p.is_absolute() for p in (storage.thumbnails_root, storage.projects_root))


def test_absolute_and_in_memory_sqlite_urls_are_kept(tmp_path):
    absolute = load_settings(write_config(tmp_path, "storage: {sqlite_url: 'sqlite:////srv/app.sqlite'}\n"), env={})
    assert absolute.storage.sqlite_url == "sqlite:////srv/app.sqlite"
    memory = load_settings(write_config(tmp_path, "storage: {sqlite_url: 'sqlite:///:memory:'}\n"), env={})
    assert memory.storage.sqlite_url == "sqlite:///:memory:"


def test_home_relative_paths_are_expanded(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    storage = load_settings(write_config(tmp_path, "storage: {duckdb_path: ~/w.duckdb}\n"), env={}).storage
    assert storage.duckdb_path == tmp_path / "home" / "w.duckdb"


def test_env_override_of_a_storage_path_resolves_against_the_config_dir(tmp_path):
    settings = load_settings(write_config(tmp_path, ""), env={"CV_ASSETS__STORAGE__FRAMES_DIR": "out/frames"})
    assert settings.storage.frames_dir == tmp_path / "out" / "frames"
