"""What each project's last finished run processed (manifest hash, embedder fingerprint,
run id), so the project sensor launches nothing for a project already processed,
whoever ran it (`make run`, the UI, the sensor).

Revision ID: 0005
Revises: 0004
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("projects") as batch:
        batch.add_column(sa.Column("processed_manifest_hash", sa.String(64)))
        batch.add_column(sa.Column("processed_embedder", sa.String(64)))
        batch.add_column(sa.Column("processed_run_id", sa.String(64)))
        batch.add_column(sa.Column("processed_at", sa.DateTime))


def downgrade() -> None:
    with op.batch_alter_table("projects") as batch:
        for column in ("processed_at", "processed_run_id", "processed_embedder", "processed_manifest_hash"):
            batch.drop_column(column)
