"""cv_assets: Dagster assets that turn video clips and camera thumbnails into searchable facts."""

__version__ = "0.1.0"
