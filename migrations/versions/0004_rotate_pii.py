"""Rotate data key "pii" and move every users.email to the new version.

Killed half way? Run ``alembic upgrade head`` again: it resumes from the last committed batch
and does not rotate a second time.

Revision ID: 0004
Revises: 0003
"""

from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.rotate_data_key("pii")
    op.reencrypt_column("users", "email", key="pii", batch_size=1000)


def downgrade() -> None:
    pass  # older versions stay readable; nothing to undo
