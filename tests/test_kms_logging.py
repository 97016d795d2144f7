"""Data keys never reach a log record, even with DEBUG on for everything (botocore included).

botocore's DEBUG logging prints request and response bodies: GenerateDataKey and Decrypt answer
with the data key in base64, and Encrypt sends it. The library filters botocore's loggers; this
test turns every logger to DEBUG, runs GenerateDataKey, Encrypt, Decrypt and ReEncrypt against
moto over HTTP, and looks for every data key in every captured record, in every spelling.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator

import pytest
import sqlalchemy as sa

import sqlalchemy_kms_field as kf
from sqlalchemy_kms_field import lifecycle
from tests.helpers import assert_no_secret, configure_local, local_master_key, reset_global_registry
from tests.kms_server import KmsServer


class Everything(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []
        self.texts: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
        self.texts.append(logging.Formatter().format(record))


@pytest.fixture
def captured() -> Iterator[Everything]:
    """DEBUG on the root logger and on every logger that exists, a handler on each of them."""
    handler = Everything()
    loggers = [logging.getLogger()] + [
        logging.getLogger(name) for name in list(logging.root.manager.loggerDict)
    ]
    saved = [(lg, lg.level, lg.disabled) for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.DEBUG)
        lg.disabled = False
    root = logging.getLogger()
    root.addHandler(handler)
    botocore = logging.getLogger("botocore")
    botocore.addHandler(handler)  # as boto3.set_stream_logger("botocore") would
    yield handler
    root.removeHandler(handler)
    botocore.removeHandler(handler)
    for lg, level, disabled in saved:
        lg.setLevel(level)
        lg.disabled = disabled


def test_no_data_key_in_any_log_record_through_every_kms_call(
    engine: sa.Engine,
    kms: KmsServer,
    captured: Everything,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    reset_global_registry(monkeypatch)
    old_key, new_key = kms.create_key("old"), kms.create_key("new")
    alias = f"alias/kf-log-{uuid.uuid4().hex[:8]}"
    kms.create_alias(alias, old_key)
    local = configure_local(engine)  # pii v1 under a local key
    deks = [local.data_key("pii", 1)]
    secrets: list[bytes] = []

    def remember(registry: kf.KeyRegistry, name: str, version: int) -> None:
        stored = registry.key_store.get(name, version)
        context = registry.context(name, version)
        secrets.append(
            registry.master_key.unwrap(stored.wrapped_key, context, stored.master_key_id)
        )

    remember(local, "pii", 1)
    old = kf.configure(
        master_key=kf.AwsKmsMasterKey(alias),  # built from the environment, as deployed
        key_store=local.key_store,
        previous_master_keys=[local_master_key()],
    )
    monkeypatch.setenv("AWS_ENDPOINT_URL_KMS", kms.endpoint_url)
    lifecycle.rewrap_data_keys()  # Encrypt (local -> KMS), then Decrypt to verify
    old.rotate_data_key("pii")  # GenerateDataKey, Decrypt
    remember(old, "pii", 2)
    old.forget()
    deks += [old.data_key("pii", 1), old.data_key("pii", 2)]  # Decrypt

    new = kf.configure(
        master_key=kf.AwsKmsMasterKey(new_key),
        key_store=local.key_store,
        previous_master_keys=[kf.AwsKmsMasterKey(alias)],
    )
    lifecycle.rewrap_data_keys()  # ReEncrypt inside KMS, Decrypt
    new.forget()
    new.active_key("pii")

    counts = kms.counts
    for operation in ("GenerateDataKey", "Encrypt", "Decrypt", "ReEncrypt"):
        assert counts[operation] >= 1, counts
    assert len(secrets) == 2 and all(len(s) == 32 for s in secrets)
    bodies = [t for t in captured.texts if "Plaintext" in t]
    assert bodies, "botocore logged no request or response body: the test proves nothing"
    assert all("<redacted>" in t for t in bodies)
    text = "\n".join(captured.texts)
    assert_no_secret(text, secrets)
    for record in captured.records:  # what another handler or a formatter would see
        assert_no_secret(f"{record.msg} {record.args}", secrets)


def test_the_filter_catches_a_plaintext_body_from_a_raw_botocore_call(
    kms: KmsServer, captured: Everything
) -> None:
    kf.AwsKmsMasterKey("alias/anything")  # installing the filter needs no KMS call
    client = kms.client()
    answer = client.generate_data_key(KeyId=kms.create_key(), KeySpec="AES_256")
    assert any("Plaintext" in t for t in captured.texts)
    assert_no_secret("\n".join(captured.texts), [answer["Plaintext"]])
