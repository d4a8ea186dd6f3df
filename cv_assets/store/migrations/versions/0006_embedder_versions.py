"""Which model_version each embedder configuration produces (keyed by its cheap fingerprint),
in the application database so every backend has it: the event backfill schedule reads it
to count what is left, and to notice a model change, without loading the model.

Revision ID: 0006
Revises: 0005
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "embedder_versions",
        sa.Column("fingerprint", sa.String(64), primary_key=True),
        sa.Column("model_version", sa.String(256), nullable=False),
        sa.Column("recorded_at", sa.DateTime, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("embedder_versions")
