-- Run once by the postgres image on first start: the application database (with pgvector,
-- so migration 0004 adds the HNSW-indexed vector column) and the DuckLake catalog.
CREATE DATABASE cv_assets;
CREATE DATABASE cv_assets_lake;
\connect cv_assets
CREATE EXTENSION IF NOT EXISTS vector;
