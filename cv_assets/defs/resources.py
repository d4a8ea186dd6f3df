"""Dagster resources: thin, configurable handles on the plain store and embedding objects,
all built from one `Settings` object (config.yaml is read once, by `build_definitions`)."""

import functools

from dagster import ConfigurableResource

from cv_assets.settings import EmbedderSettings, Settings
from cv_assets.store import AppDatabase, Warehouse


@functools.lru_cache(maxsize=8)
def _parse_settings(settings_json: str) -> Settings:
    return Settings.model_validate_json(settings_json)


class SettingsResource(ConfigurableResource):
    """Thresholds and paths, validated when the definitions were built (JSON of `Settings`)."""

    settings_json: str

    @classmethod
    def from_settings(cls, settings: Settings) -> "SettingsResource":
        return cls(settings_json=settings.model_dump_json())

    def load(self) -> Settings:
        return _parse_settings(self.settings_json)


class AppDatabaseResource(ConfigurableResource):
    """The application database, SQLite or PostgreSQL (migrated on first use).
    `sqlite_url` is the deprecated name of `database_url`."""

    database_url: str | None = None
    sqlite_url: str | None = None

    @property
    def url(self) -> str:
        url = self.database_url or self.sqlite_url
        if not url:
            raise ValueError("AppDatabaseResource needs database_url")
        return url

    def get(self) -> AppDatabase:
        return AppDatabase(self.url)


class WarehouseResource(ConfigurableResource):
    """The warehouse: the DuckDB file (every access a short locked transaction), or a
    DuckLake when `ducklake_catalog_url` is set (storage.warehouse ducklake; no lock)."""

    duckdb_path: str
    ducklake_catalog_url: str | None = None
    ducklake_data_path: str | None = None

    def get(self) -> Warehouse:
        return Warehouse(self.duckdb_path, ducklake_catalog_url=self.ducklake_catalog_url,
                         ducklake_data_path=self.ducklake_data_path)


class EmbedderResource(ConfigurableResource):
    """The image/text embedder, loaded lazily once per process and shared by all assets of a run."""

    model: str = EmbedderSettings().model
    revision: str | None = None
    device: str = "auto"
    backend: str = "auto"
    precision: str = "auto"
    batch_size: int = 32
    cuda_batch_size: int = 256
    local_files_only: bool = True
    cache_dir: str | None = None
    compiled_cache_dir: str | None = None
    fallback: str = "none"

    @classmethod
    def from_settings(cls, embedder: EmbedderSettings) -> "EmbedderResource":
        return cls(**embedder.model_dump(mode="json"))

    def settings(self) -> EmbedderSettings:
        return EmbedderSettings.model_validate(self.model_dump())

    def get(self):
        from cv_assets.embedding import get_embedder

        return get_embedder(self.settings())

    def model_version(self, db: AppDatabase) -> str:
        """The configured embedder's model_version. A step that only reads stored vectors
        takes it from the record an earlier run of this configuration left, without loading
        the model; the model loads only when there is no record."""
        from cv_assets.events.backfill import known_embedder_version

        return known_embedder_version(db, self.settings()) or self.get().model_version


def build_resources(settings: Settings) -> dict:
    """All resources for one configuration; tests call this with their own settings."""
    return {
        "settings": SettingsResource.from_settings(settings),
        "app_db": AppDatabaseResource(database_url=settings.storage.database_url),
        "warehouse": WarehouseResource(
            duckdb_path=str(settings.storage.duckdb_path),
            **({"ducklake_catalog_url": settings.storage.ducklake_catalog_url,
                "ducklake_data_path": settings.storage.ducklake_data_path}
               if settings.storage.warehouse == "ducklake" else {}),
        ),
        "embedder": EmbedderResource.from_settings(settings.embedder),
    }
