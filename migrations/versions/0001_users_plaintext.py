"""A users table with plaintext emails, as many applications start.

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
    users = op.create_table(
        "users",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("email", sa.String(320), nullable=True),
    )
    op.bulk_insert(users, [{"id": i, "email": f"user{i}@example.com"} for i in range(1, 101)])


def downgrade() -> None:
    op.drop_table("users")
