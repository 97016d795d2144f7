"""Quick start: encrypted emails in SQLite with a local master key, then a data key rotation.

    python examples/quickstart.py [--dir DIR]

Nothing but SQLite and a key file: no AWS account needed. It writes ``quickstart.db`` and
``quickstart.key`` in DIR (default: a new temporary folder) and prints, for each row, what the
database holds next to what the application sees.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

import sqlalchemy_kms_field as kf
from sqlalchemy_kms_field.reencrypt import reencrypt_column


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "users"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(sa.String(100))
    email: Mapped[str] = mapped_column(kf.EncryptedString(320, key="pii"))


def show(engine: sa.Engine, title: str) -> None:
    print(f"\n{title}")
    print(f"  {'id':>2}  {'the database holds':<52}  the application sees")
    with engine.connect() as conn:
        raw = {r.id: r.email for r in conn.execute(sa.text("SELECT id, email FROM users"))}
    with Session(engine) as session:
        for user in session.scalars(sa.select(User).order_by(User.id)):
            stored = raw[user.id]
            shown = stored if len(stored) <= 52 else stored[:49] + "..."
            print(f"  {user.id:>2}  {shown:<52}  {user.email}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, help="where to write quickstart.db and .key")
    args = parser.parse_args()
    folder = args.dir or Path(tempfile.mkdtemp(prefix="kms-field-quickstart-"))
    folder.mkdir(parents=True, exist_ok=True)
    db_path, key_path = folder / "quickstart.db", folder / "quickstart.key"
    db_path.unlink(missing_ok=True)
    key_path.unlink(missing_ok=True)

    # 1. A master key. In production: kf.AwsKmsMasterKey("alias/app-pii").
    master_key = kf.LocalMasterKey.generate_file(key_path)
    engine = sa.create_engine(f"sqlite:///{db_path}")
    key_store = kf.SqlKeyStore(engine)
    key_store.create_table()
    kf.configure(master_key=master_key, key_store=key_store, active_ttl=0)
    print(f"master key: {master_key!r}, written to {key_path} (mode 0600)")

    # 2. A data key, generated, wrapped by the master key, stored and verified.
    kf.create_data_key("pii")
    Base.metadata.create_all(engine)

    with Session(engine) as session:
        session.add_all(
            [
                User(name="Ann", email="ann@example.com"),
                User(name="Bob", email="bob@example.org"),
                User(name="Chloé", email="chloé@exämple.fr"),
            ]
        )
        session.commit()
    show(engine, "Three users written under data key 'pii' version 1:")

    # 3. Rotate the data key: new rows use version 2, old rows stay readable.
    kf.rotate_data_key("pii")
    with Session(engine) as session:
        session.add(User(name="Dan", email="dan@example.net"))
        session.commit()
    show(engine, "After rotate_data_key('pii'): a new user is on version 2, old rows still read:")

    # 4. Move every row to version 2 (resumable, compare-and-swap batches).
    result = reencrypt_column(engine, "users", "email", key="pii", batch_size=2)
    show(engine, f"After re-encryption ({result.rows_written} rows rewritten, every row on v2):")

    try:
        sa.select(User).where(User.email == "ann@example.com")
    except kf.UnsupportedOperationError as exc:
        print(f"\nComparing an encrypted column is refused: {exc}")
    print(f"\nFiles: {db_path} and {key_path}")


if __name__ == "__main__":
    main()
