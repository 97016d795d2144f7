"""Encrypt users.email in place.

While this runs, the application reads the column with
``EncryptedString(320, key="pii", accept_plaintext=True)``; drop that flag afterwards.

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

import sqlalchemy_kms_field as kf

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Ciphertext needs more room than plaintext: widen the column to what the type needs.
    with op.batch_alter_table("users") as batch:
        batch.alter_column(
            "email", type_=kf.EncryptedString(320, key="pii"), existing_type=sa.String(320)
        )
    op.encrypt_column("users", "email", key="pii", batch_size=1000)


def downgrade() -> None:
    op.decrypt_column("users", "email", key="pii", batch_size=1000)
