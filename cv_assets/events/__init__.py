"""Security events: thumbnails, import, embedding backfill, vector search, recurring visitors (no Dagster)."""
