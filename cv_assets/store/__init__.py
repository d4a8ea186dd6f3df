"""Storage: the SQLite application database and the DuckDB warehouse (no Dagster here)."""

from cv_assets.store.database import AppDatabase
from cv_assets.store.warehouse import Warehouse, WarehouseError

__all__ = ["AppDatabase", "Warehouse", "WarehouseError"]
