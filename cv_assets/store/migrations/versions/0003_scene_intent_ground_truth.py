"""What a manifest says about its scenes' intent (declared cuts, continues_previous) and
the project's ground truth file.

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("scene_manifests") as batch:
        batch.add_column(sa.Column("declared_cuts", sa.Text, nullable=False, server_default="[]"))
        batch.add_column(sa.Column("continues_previous", sa.Boolean, nullable=False, server_default=sa.true()))
    with op.batch_alter_table("projects") as batch:
        batch.add_column(sa.Column("ground_truth_path", sa.Text))


def downgrade() -> None:
    with op.batch_alter_table("projects") as batch:
        batch.drop_column("ground_truth_path")
    with op.batch_alter_table("scene_manifests") as batch:
        batch.drop_column("continues_previous")
        batch.drop_column("declared_cuts")
