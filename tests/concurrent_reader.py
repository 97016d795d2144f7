"""Run by test_registry_concurrency in a fresh process: N threads read every row at once.

Configured from the environment only (AWS_ENDPOINT_URL_KMS, AWS_REGION, credentials), as a
deployed application would be. Prints one JSON line: rows read and wrong values per thread.
"""

from __future__ import annotations

import json
import sys
import threading

import sqlalchemy as sa

import sqlalchemy_kms_field as kf


def expected_email(row_id: int) -> str:
    return f"user-{row_id}@example.com ✓"


def main() -> None:
    database, key_id, thread_count = sys.argv[1], sys.argv[2], int(sys.argv[3])
    engine = sa.create_engine(f"sqlite:///{database}", pool_size=thread_count)
    kf.configure(master_key=kf.AwsKmsMasterKey(key_id), key_store=kf.SqlKeyStore(engine))
    table = sa.Table(
        "accounts",
        sa.MetaData(),
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("email", kf.EncryptedString(320, key="pii")),
    )
    barrier = threading.Barrier(thread_count)
    results: list[dict[str, object]] = [{} for _ in range(thread_count)]

    def read(index: int) -> None:
        try:
            with engine.connect() as conn:
                barrier.wait()
                rows = conn.execute(sa.select(table.c.id, table.c.email)).all()
            wrong = sum(email != expected_email(row_id) for row_id, email in rows)
            results[index] = {"rows": len(rows), "wrong": wrong}
        except Exception as exc:
            results[index] = {"error": f"{type(exc).__name__}: {exc}"}

    threads = [threading.Thread(target=read, args=(i,)) for i in range(thread_count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    print(json.dumps(results))


if __name__ == "__main__":
    main()
