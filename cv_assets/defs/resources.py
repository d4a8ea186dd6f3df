"""Dagster resources: thin, configurable handles on the plain store and embedding objects."""


from dagster import ConfigurableResource

from cv_assets.settings import EmbedderSettings, Settings, load_settings
from cv_assets.store import AppDatabase, Warehouse


class SettingsResource(ConfigurableResource):
    """Thresholds and paths from config.yaml (or `config_path`), validated by pydantic."""

    config_path: str | None = None

    def load(self) -> Settings:
        return load_settings(self.config_path)

class AppDatabaseResource(ConfigurableResource):
    """The SQLite application database (migrated on first use)."""

    sqlite_url: str

    def get(self) -> AppDatabase:
        return AppDatabase(self.sqlite_url)

class WarehouseResource(ConfigurableResource):
    """The DuckDB warehouse; every access is a short locked transaction."""

    duckdb_path: str

    def get(self) -> Warehouse:
        return Warehouse(self.duckdb_path)

class EmbedderResource(ConfigurableResource):
    """The image/text embedder, loaded lazily once per process and shared by all assets of a run."""

    model: str = EmbedderSettings().model
    revision: str | None = None
    device: str = "auto"
    batch_size: int = 32
    local_files_only: bool = True
    cache_dir: str | None = None
    fallback: str = "none"

    def settings(self) -> EmbedderSettings:
        return EmbedderSettings.model_validate(self.model_dump())

    def get(self):
        from cv_assets.embedding import get_embedder

        return get_embedder(self.settings())

def build_resources(settings: Settings, config_path: str | None = None) -> dict:
    """All resources for one configuration; tests call this with a temp config."""
    emb = settings.embedder
    return {
        "settings": SettingsResource(config_path=config_path),
        "app_db": AppDatabaseResource(sqlite_url=settings.storage.sqlite_url),
        "warehouse": WarehouseResource(duckdb_path=str(settings.storage.duckdb_path)),
        "embedder": EmbedderResource(
            model=emb.model,
            revision=emb.revision,
            device=emb.device,
            batch_size=emb.batch_size,
            local_files_only=emb.local_files_only,
            cache_dir=str(emb.cache_dir) if emb.cache_dir else None,
            fallback=emb.fallback,
        ),
    }
