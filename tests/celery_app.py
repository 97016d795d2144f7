"""The Celery app of the Celery tests, as an application would write it: configure the library,
then install its task. Started by the tests as ``celery -A tests.celery_app worker``.

Environment: KF_CELERY_BROKER, KF_CELERY_DB_URL, KF_CELERY_KEY_FILE, KF_CELERY_ACTIVE_TTL.
"""

from __future__ import annotations

import os

import sqlalchemy as sa
from celery import Celery

import sqlalchemy_kms_field as kf
from sqlalchemy_kms_field.celery import install

app = Celery(
    "kf_tests", broker=os.environ.get("KF_CELERY_BROKER", "amqp://guest:guest@127.0.0.1:5672//")
)
app.conf.update(
    worker_prefetch_multiplier=1, task_ignore_result=True, broker_connection_retry_on_startup=True
)

if os.environ.get("KF_CELERY_DB_URL"):
    kf.configure(
        master_key=kf.LocalMasterKey.from_file(os.environ["KF_CELERY_KEY_FILE"]),
        key_store=kf.SqlKeyStore(sa.create_engine(os.environ["KF_CELERY_DB_URL"])),
        active_ttl=float(os.environ.get("KF_CELERY_ACTIVE_TTL", "1")),
    )
# The models, as a reindex task needs them (its column's BlindIndex).
from tests.test_blind_index import Base  # noqa: E402

run_worker = install(app, metadata=Base.metadata)
