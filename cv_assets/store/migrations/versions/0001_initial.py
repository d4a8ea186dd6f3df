"""Initial application schema: projects, assets, scenes, appearances, events, embeddings, failures.

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "projects",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("key", sa.String(128), nullable=False, unique=True),
        sa.Column("name", sa.String(256), nullable=False),
        sa.Column("root_path", sa.Text, nullable=False),
        sa.Column("manifest_hash", sa.String(64)),
        sa.Column("updated_at", sa.DateTime, nullable=False),
    )
    op.create_table(
        "assets",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("project_id", sa.Integer, sa.ForeignKey("projects.id", ondelete="CASCADE"), nullable=False),
        sa.Column("code", sa.String(64), nullable=False),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("name", sa.String(256), nullable=False),
        sa.Column("reference_image_path", sa.Text, nullable=False),
        sa.Column("reference_image_hash", sa.String(64)),
        sa.Column("clip_embedding", sa.LargeBinary),
        sa.Column("embedding_model_version", sa.String(256)),
        sa.UniqueConstraint("project_id", "code"),
    )
    op.create_table(
        "scene_manifests",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("project_id", sa.Integer, sa.ForeignKey("projects.id", ondelete="CASCADE"), nullable=False),
        sa.Column("scene_index", sa.Integer, nullable=False),
        sa.Column("clip_path", sa.Text, nullable=False),
        sa.Column("expected_asset_codes", sa.Text, nullable=False),
        sa.Column("cv_analysis_json", sa.Text),
        sa.Column("continuity_score", sa.Float),
        sa.UniqueConstraint("project_id", "scene_index"),
    )
    op.create_table(
        "asset_appearances",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("asset_id", sa.Integer, sa.ForeignKey("assets.id", ondelete="CASCADE"), nullable=False),
        sa.Column("project_id", sa.Integer, sa.ForeignKey("projects.id", ondelete="CASCADE"), nullable=False),
        sa.Column("scene_index", sa.Integer, nullable=False),
        sa.Column("frame_index", sa.Integer, nullable=False),
        sa.Column("timestamp_sec", sa.Float, nullable=False),
        sa.Column("bbox", sa.Text, nullable=False),
        sa.Column("confidence", sa.Float, nullable=False),
        sa.Column("source", sa.String(16), nullable=False),
        sa.Column("created_at", sa.DateTime, nullable=False),
        sa.CheckConstraint("source IN ('yolo', 'face_match', 'clip_match')", name="ck_appearance_source"),
    )
    op.create_index("ix_asset_appearances_asset_id", "asset_appearances", ["asset_id"])
    op.create_index("ix_asset_appearances_project_id", "asset_appearances", ["project_id"])
    op.create_table(
        "events",
        sa.Column("id", sa.String(128), primary_key=True),
        sa.Column("camera_id", sa.String(128), nullable=False),
        sa.Column("started_at", sa.DateTime, nullable=False),
        sa.Column("label", sa.String(128)),
        sa.Column("thumbnail_base64", sa.Text),
        sa.Column("thumbnail_path", sa.Text),
        sa.Column("created_at", sa.DateTime, nullable=False),
    )
    op.create_index("ix_events_camera_id", "events", ["camera_id"])
    op.create_index("ix_events_started_at", "events", ["started_at"])
    op.create_table(
        "event_embeddings",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("event_id", sa.String(128), sa.ForeignKey("events.id", ondelete="CASCADE"), nullable=False, unique=True),
        sa.Column("embedding", sa.Text, nullable=False),
        sa.Column("model_version", sa.String(256), nullable=False),
        sa.Column("created_at", sa.DateTime, nullable=False),
    )
    op.create_table(
        "embedding_failures",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("item_kind", sa.String(32), nullable=False),
        sa.Column("item_id", sa.String(256), nullable=False),
        sa.Column("model_version", sa.String(256), nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("first_failed_at", sa.DateTime, nullable=False),
        sa.Column("last_failed_at", sa.DateTime, nullable=False),
        sa.UniqueConstraint("item_kind", "item_id", "model_version"),
    )


def downgrade() -> None:
    for table in ("embedding_failures", "event_embeddings", "events", "asset_appearances", "scene_manifests", "assets", "projects"):
        op.drop_table(table)
