"""Typed configuration: `config.yaml` validated by pydantic, with environment overrides.

`load_settings()` is the one loader. Every field has a default, so the file may omit
any section. Environment variables override single keys:

    CV_ASSETS__EMBEDDER__MODEL=/models/clip   ->  embedder.model
    CV_ASSETS__EVENTS__MAX_BATCH=50           ->  events.max_batch

Values from the environment are parsed as YAML scalars (so `50`, `true`, `[0, 2]` work).
`CV_ASSETS_CONFIG` selects another file. Relative paths in `storage` are resolved
against the directory of the config file (the repo root for the default file).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

CONFIG_ENV = "CV_ASSETS_CONFIG"
ENV_PREFIX = "CV_ASSETS__"
DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "config.yaml"

Fraction = Annotated[float, Field(ge=0.0, le=1.0)]


def _valid_cron(value: str) -> str:
    """A cron expression Dagster accepts, checked when the config loads rather than when the
    schedule is built. The defaults are known good (no Dagster import for them)."""
    if value in _KNOWN_CRONS:
        return value
    from dagster import ScheduleDefinition

    try:
        ScheduleDefinition(name="config_check", cron_schedule=value, job_name="config_check")
    except Exception:
        raise ValueError("not a cron expression Dagster accepts (five fields, e.g. '*/15 * * * *')") from None
    return value


_KNOWN_CRONS = {"*/15 * * * *", "0 3 * * *"}
Cron = Annotated[str, AfterValidator(_valid_cron)]


class ConfigError(ValueError):
    """The configuration file or an override is invalid; the message names the key."""


class _Section(BaseModel):
    # coerce_numbers_to_str: a revision hash or model name that happens to be all
    # digits (in YAML or an env override) is still a string, not a type error.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, coerce_numbers_to_str=True)


DEFAULT_DATABASE_URL = "sqlite:///data/cv_assets.sqlite"
DATABASE_SCHEMES = ("sqlite", "postgresql")


class StorageSettings(_Section):
    # The application database: an SQLite file by default (`make run`, no server), or
    # PostgreSQL at scale (`postgresql+psycopg://user:pass@host/db`). Same migrations, same queries.
    database_url: str = DEFAULT_DATABASE_URL
    # Deprecated alias of database_url (its name before PostgreSQL support). Still read from
    # config files and the environment when database_url is not set; after loading it always
    # equals database_url, so code that reads it keeps working. Where both are set, database_url wins.
    sqlite_url: str | None = None
    # The warehouse: a local DuckDB file (default), or a DuckLake whose catalog is a
    # PostgreSQL database (ducklake_catalog_url) and whose data files lie under ducklake_data_path.
    warehouse: Literal["duckdb", "ducklake"] = "duckdb"
    duckdb_path: Path = Path("data/warehouse.duckdb")
    ducklake_catalog_url: str | None = None
    ducklake_data_path: str = "data/ducklake"
    frames_dir: Path = Path("data/frames")
    reports_dir: Path = Path("data/reports")
    # Where `make ui` serves reports_dir over http (`cv-assets serve-reports`): project_report's
    # `report` link is <reports_base_url>/<project>.html, clickable from the Dagster UI.
    reports_base_url: str = "http://127.0.0.1:3001"
    projects_root: Path = Path("data/projects")
    thumbnails_root: Path = Path("data/thumbnails")

    @model_validator(mode="before")
    @classmethod
    def _legacy_sqlite_url(cls, data: Any) -> Any:
        if not isinstance(data, dict) or data.get("sqlite_url") is None:
            return data
        legacy, current = data["sqlite_url"], data.get("database_url")
        if current is None:
            warnings.warn("storage.sqlite_url is deprecated: use storage.database_url", DeprecationWarning,
                          stacklevel=2)
            return {**data, "database_url": legacy}
        # Both set (a config file naming both, or an assignment of database_url): database_url wins.
        return {**data, "sqlite_url": current}

    @field_validator("database_url")
    @classmethod
    def _known_scheme(cls, value: str) -> str:
        # Validated on the field so the error names storage.database_url itself.
        scheme = value.split(":", 1)[0].split("+", 1)[0]
        if scheme not in DATABASE_SCHEMES:
            raise ValueError("must be a sqlite:/// or postgresql+psycopg:// URL")
        if scheme == "postgresql" and not value.startswith("postgresql+psycopg://"):
            value = "postgresql+psycopg://" + value.split("://", 1)[1]  # the driver cv_assets installs
        return value

    @model_validator(mode="after")
    def _mirror_alias(self) -> "StorageSettings":
        # object.__setattr__: a plain assignment would validate (and call this) again.
        if self.sqlite_url != self.database_url:
            object.__setattr__(self, "sqlite_url", self.database_url)
        if self.warehouse == "ducklake" and not self.ducklake_catalog_url:
            raise ValueError("warehouse ducklake needs storage.ducklake_catalog_url (a PostgreSQL URL)")
        return self

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")


class ManifestSettings(_Section):
    """Caps on one project.yaml, checked before it is parsed, so one huge manifest can
    neither exhaust memory nor hold up the sensor tick or the other projects."""

    max_bytes: int = Field(1024 * 1024, ge=1024, le=256 * 1024 * 1024)
    max_scenes: int = Field(10_000, ge=1, le=1_000_000)


class EmbedderSettings(_Section):
    model: str = "openai/clip-vit-base-patch32"
    revision: str | None = None
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # Who runs the model and in what number format; `model_version` (the vector space) is the
    # same for all of them. auto: CUDA -> torch fp16; CPU -> OpenVINO when installed, bf16 where
    # the processor has bf16 instructions, else fp32 (see embedding/runtime.py).
    backend: Literal["auto", "torch", "openvino"] = "auto"
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    batch_size: int = Field(32, ge=1, le=1024)
    cuda_batch_size: int = Field(256, ge=1, le=4096)  # a GPU needs large batches to be busy
    local_files_only: bool = True
    cache_dir: Path | None = None
    # Converted OpenVINO models, keyed by weights hash + backend + precision (default:
    # <HF_HOME>/cv_assets/openvino).
    compiled_cache_dir: Path | None = None
    # Explicit opt-in for air-gapped demos: when the CLIP weights cannot be loaded,
    # use this non-CLIP embedder instead. Its vectors carry their own model_version.
    fallback: Literal["none", "color_histogram"] = "none"


class SamplingSettings(_Section):
    base_offsets_sec: list[Annotated[float, Field(ge=0.0)]] = [0.0, 2.0, 4.0, 6.0]
    include_last: bool = True
    motion_pixel_delta: int = Field(30, ge=1, le=255)
    motion_width: int = Field(160, ge=16, le=1920)
    min_spacing_sec: float = Field(0.5, ge=0.0)
    # Hard cuts (PySceneDetect's adaptive rule): a frame whose luma change from the previous
    # one is at least cut_min_change (0..1) and cut_adaptive_ratio times the mean change of
    # cut_window frames on each side starts a new shot; shots last at least cut_min_shot_sec.
    cut_min_change: float = Field(0.06, gt=0.0, le=1.0)
    cut_adaptive_ratio: float = Field(3.0, ge=1.0)
    cut_window: int = Field(2, ge=1, le=30)
    cut_min_shot_sec: float = Field(0.5, ge=0.0)
    jpeg_quality: int = Field(90, ge=10, le=100)  # frames exported with extract_frames(out_dir)
    max_width: int = Field(7680, ge=16)
    max_height: int = Field(4320, ge=16)
    max_duration_sec: float = Field(3600.0, gt=0)
    max_file_bytes: int = Field(8 * 1024**3, gt=0)


class CvAnalysisSettings(_Section):
    clip_similarity_threshold: Fraction = 0.65
    motion_delta_threshold: Fraction = 0.15
    max_frames_per_clip: int = Field(8, ge=1, le=256)
    quality_gate_threshold: float = Field(5.0, ge=0.0, le=10.0)
    face_match_threshold: Fraction = 0.6


class AppearanceSettings(_Section):
    # The exhaustive grid (coarse_to_fine: false): crops of these sizes (share of the
    # frame's shorter side) overlapping by region_overlap.
    region_scales: list[Annotated[float, Field(gt=0.0, le=1.0)]] = [1.0, 0.6, 0.4, 0.25]
    region_overlap: float = Field(0.5, ge=0.0, lt=1.0)
    # Coarse to fine: the whole frame and the coarse grid first; only an asset whose best
    # coarse region comes within seed_margin of its threshold is searched further.
    coarse_to_fine: bool = True
    coarse_scales: list[Annotated[float, Field(gt=0.0, le=1.0)]] = [0.6]
    coarse_overlap: float = Field(0.25, ge=0.0, lt=1.0)
    seed_margin: Fraction = 0.45
    # Box fit around a seed: a window grown by extent_reach (share of the shorter side) on
    # each side; each axis is split at extent_steps even positions (both parts embedded),
    # then each edge is bisected once per further round (one part embedded), for
    # extent_rounds rounds (one embedding batch each).
    extent_reach: Fraction = 0.3
    # ...on a side where no neighbouring region beyond the seed scores like a seed, the seed
    # holds the object: the window grows by only edge_reach there.
    edge_reach: Fraction = 0.05
    extent_steps: int = Field(3, ge=1, le=32)
    extent_rounds: int = Field(3, ge=1, le=8)
    # Scores this close count as equal: the tightest region or edge among them wins.
    tie_margin: Fraction = 0.03
    # A crop whose pixels did not change since the previous sampled frame of its scene
    # (a fixed camera's background, a prop standing still) reuses that frame's vector.
    reuse_unchanged_regions: bool = True
    # An asset found in the scene's frames searched before is fitted again at its last box
    # while a region there still scores half the seed level (an object leaving the frame).
    track_found: bool = True
    # A ground-truth match needs at least this IoU (precision/recall against ground truth).
    eval_iou: Fraction = 0.1
    # Similarity thresholds by embedder family; a CLIP threshold means nothing for
    # another model. Families not listed use cv_analysis.clip_similarity_threshold.
    thresholds: dict[str, Fraction] = {"color_histogram": 0.8}
    # face_match backend. auto: dlib when installed (the faces extra, weights included), else
    # YuNet/SFace when face_detector_model and face_recognizer_model are set, else off.
    face_backend: Literal["auto", "dlib", "yunet"] = "auto"
    face_detector_model: Path | None = None
    face_recognizer_model: Path | None = None
    yolo_weights: Path | None = None


class ContinuityWeights(_Section):
    # allow_inf_nan=False: `.inf` or `.nan` is refused here, not later as a NULL score in DuckDB.
    adherence: float = Field(0.5, ge=0.0, allow_inf_nan=False)
    identity: float = Field(0.3, ge=0.0, allow_inf_nan=False)
    boundary: float = Field(0.2, ge=0.0, allow_inf_nan=False)
    intra_scene: float = Field(0.2, ge=0.0, allow_inf_nan=False)

    @model_validator(mode="after")
    def _not_all_zero(self) -> "ContinuityWeights":
        if self.adherence + self.identity + self.boundary + self.intra_scene <= 0:
            raise ValueError("at least one of adherence, identity, boundary, intra_scene must be above 0")
        return self


class ContinuitySettings(_Section):
    weights: ContinuityWeights = ContinuityWeights()
    # A detected cut this close (seconds) to one the manifest declares is that declared cut.
    cut_tolerance_sec: float = Field(0.5, ge=0.0, allow_inf_nan=False)


class EventsSettings(_Section):
    max_batch: int = Field(100, ge=1, le=100)
    backfill_cron: Cron = "*/15 * * * *"
    # Backfill runs the schedule may request per tick. Above 1 only where the application
    # database is PostgreSQL: each run claims its own batch (SKIP LOCKED). On SQLite one run.
    backfill_workers: int = Field(1, ge=1, le=64)
    visitor_recluster_cron: Cron = "0 3 * * *"  # nightly full re-grouping of recurring visitors
    similar_min_similarity: Fraction = 0.7
    similar_limit: int = Field(10, ge=1, le=1000)
    # On PostgreSQL with pgvector: the HNSW candidate list per search (hnsw.ef_search). Higher
    # finds more of the true nearest at more cost (benchmarks/scale.py measures recall and latency).
    hnsw_ef_search: int = Field(1000, ge=10, le=1000)
    similar_days: int = Field(30, ge=1)
    max_attempts: int = Field(3, ge=1, le=100)
    thumbnail_max_bytes: int = Field(10 * 1024 * 1024, ge=1024)
    # Decoding is refused above this many pixels (read from the image header): 16 Mpx is
    # 64 MB of RGBA, while CLIP looks at 224 x 224.
    thumbnail_max_pixels: int = Field(16_000_000, ge=224 * 224)
    # Import limits per JSONL line / CSV row: longer lines, deeper nesting and longer
    # fields are rejected (with the line number) and the import goes on.
    import_max_line_bytes: int = Field(16 * 1024 * 1024, ge=1024)
    import_max_depth: int = Field(8, ge=2, le=1000)
    import_max_field_chars: int = Field(4096, ge=64)
    visitor_similarity_threshold: Fraction = 0.75
    visitor_min_events: int = Field(3, ge=1)


class RunsSettings(_Section):
    # How a project run executes its steps. in_process: one process, the model loads once
    # per run (the default). multiprocess: each step in its own process; every step reads
    # only what the step before stored, so both give the same rows. k8s: each step in its
    # own Kubernetes Job (dagster-k8s): embedding steps on GPU nodes, the rest on CPU nodes.
    executor: Literal["in_process", "multiprocess", "k8s"] = "in_process"


class Settings(_Section):
    storage: StorageSettings = StorageSettings()
    runs: RunsSettings = RunsSettings()
    manifests: ManifestSettings = ManifestSettings()
    embedder: EmbedderSettings = EmbedderSettings()
    sampling: SamplingSettings = SamplingSettings()
    cv_analysis: CvAnalysisSettings = CvAnalysisSettings()
    appearances: AppearanceSettings = AppearanceSettings()
    continuity: ContinuitySettings = ContinuitySettings()
    events: EventsSettings = EventsSettings()


def load_settings(path: str | os.PathLike | None = None, env: dict[str, str] | None = None) -> Settings:
    """Load, override from the environment, validate and resolve paths."""
    env = os.environ if env is None else env
    config_path = Path(path or env.get(CONFIG_ENV) or DEFAULT_CONFIG)
    raw = _read_yaml(config_path) if (path or env.get(CONFIG_ENV) or config_path.exists()) else {}
    origins = _apply_env_overrides(raw, env)
    try:
        settings = Settings.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, config_path, origins)) from None
    return _resolve_paths(settings, config_path.resolve().parent)


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path} (set {CONFIG_ENV} or create it)")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections, got {type(data).__name__}")
    # A section whose keys are all commented out reads as null: treat it as omitted.
    return {key: ({} if value is None else value) for key, value in data.items()}


def _apply_env_overrides(raw: dict[str, Any], env: dict[str, str]) -> dict[str, str]:
    """Set each CV_ASSETS__SECTION__KEY into `raw`; return {dotted key: variable name}."""
    origins: dict[str, str] = {}
    for name, value in env.items():
        if not name.startswith(ENV_PREFIX):
            continue
        keys = [k.lower() for k in name[len(ENV_PREFIX):].split("__") if k]
        if len(keys) < 2:
            raise ConfigError(f"{name}: expected {ENV_PREFIX}SECTION__KEY")
        node = raw
        for key in keys[:-1]:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{name}: {key} is not a section")
        node[keys[-1]] = _parse_env_value(value)
        origins[".".join(keys)] = name
    return origins


def _parse_env_value(value: str) -> Any:
    """A YAML scalar (`50`, `true`, `[0, 2]`); text that is not valid YAML (a cron
    line such as `*/5 * * * *`) stays the plain string."""
    if value == "":
        return None
    try:
        return yaml.safe_load(value)
    except yaml.YAMLError:
        return value


def _describe(exc: ValidationError, path: Path, origins: dict[str, str] | None = None) -> str:
    origins = origins or {}
    lines = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"])
        if err["type"] == "extra_forbidden":
            line = f"{key}: unknown key"
        else:
            line = f"{key}: {err['msg'].removeprefix('Value error, ')} (got {err.get('input')!r})"
        source = next((var for dotted, var in origins.items() if _related(key, dotted)), None)
        lines.append(f"{line} (from environment variable {source})" if source else line)
    return f"invalid configuration in {path}:\n  " + "\n  ".join(lines)


def _related(key: str, dotted: str) -> bool:
    """Whether an error at `key` concerns the value set at `dotted` (same, inside or around it)."""
    return key == dotted or key.startswith(dotted + ".") or dotted.startswith(key + ".")


def _resolve_paths(settings: Settings, base: Path) -> Settings:
    storage = settings.storage
    for field in ("duckdb_path", "frames_dir", "reports_dir", "projects_root", "thumbnails_root"):
        value = getattr(storage, field).expanduser()
        setattr(storage, field, value if value.is_absolute() else (base / value).resolve())
    prefix = "sqlite:///"
    url = storage.database_url
    if url.startswith(prefix) and ":memory:" not in url:
        db_path = Path(url[len(prefix):]).expanduser()
        url = prefix + str(db_path if db_path.is_absolute() else (base / db_path).resolve())
    data_path = storage.ducklake_data_path
    if "://" not in data_path and not Path(data_path).expanduser().is_absolute():
        data_path = str((base / Path(data_path).expanduser()).resolve())
    settings.storage = storage.model_copy(update={"database_url": url, "sqlite_url": url,
                                                  "ducklake_data_path": data_path})
    return settings
