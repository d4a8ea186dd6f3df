"""Recurring visitors (recognized_entities, entity_events), asset face embeddings, version index.

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("assets") as batch:
        batch.add_column(sa.Column("face_embedding", sa.LargeBinary))
    op.create_index("ix_event_embeddings_model_version", "event_embeddings", ["model_version"])
    op.create_table(
        "recognized_entities",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("model_version", sa.String(256), nullable=False),
        sa.Column("centroid", sa.Text, nullable=False),
        sa.Column("event_count", sa.Integer, nullable=False),
        sa.Column("first_seen", sa.DateTime),
        sa.Column("last_seen", sa.DateTime),
        sa.Column("cameras", sa.Text, nullable=False),
        sa.Column("created_at", sa.DateTime, nullable=False),
        sa.Column("updated_at", sa.DateTime, nullable=False),
    )
    op.create_index("ix_recognized_entities_model_version", "recognized_entities", ["model_version"])
    op.create_table(
        "entity_events",
        sa.Column("entity_id", sa.Integer, sa.ForeignKey("recognized_entities.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("event_id", sa.String(128), sa.ForeignKey("events.id", ondelete="CASCADE"), primary_key=True, unique=True),
        sa.Column("similarity", sa.Float, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("entity_events")
    op.drop_index("ix_recognized_entities_model_version", "recognized_entities")
    op.drop_table("recognized_entities")
    op.drop_index("ix_event_embeddings_model_version", "event_embeddings")
    with op.batch_alter_table("assets") as batch:
        batch.drop_column("face_embedding")
