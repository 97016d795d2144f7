"""Master keys (local and AWS KMS against moto over HTTP), wrapping contexts, and key secrecy."""

from __future__ import annotations

import base64
import os
import stat
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

import sqlalchemy_kms_field as kf
from sqlalchemy_kms_field.registry import data_key_context
from tests.helpers import (
    MASTER_KEY_B64,
    MASTER_KEY_BYTES,
    assert_no_secret,
    configure_local,
    error_texts,
    raw_values,
    reset_global_registry,
    unwrapped_key,
)
from tests.kms_server import KmsServer

CONTEXT = data_key_context("pii", 1)
OTHER_CONTEXTS = [data_key_context("pii", 2), data_key_context("pij", 1), {**CONTEXT, "x": "y"}]


def assert_error_hides(exc: BaseException, secrets: list[bytes]) -> None:
    for text in error_texts(exc):
        assert_no_secret(text, secrets)


# LocalMasterKey ---------------------------------------------------------------------------------


def test_local_master_key_from_bytes_file_and_env_is_the_same_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "dev.key"
    path.write_text(MASTER_KEY_B64 + "\n", encoding="ascii")
    monkeypatch.setenv("KMS_FIELD_LOCAL_MASTER_KEY", f"  {MASTER_KEY_B64}\n")
    monkeypatch.setenv("MY_KEY", MASTER_KEY_B64)
    keys = [
        kf.LocalMasterKey(MASTER_KEY_BYTES),
        kf.LocalMasterKey.from_bytes(MASTER_KEY_BYTES),
        kf.LocalMasterKey.from_file(path),
        kf.LocalMasterKey.from_file(str(path)),
        kf.LocalMasterKey.from_env(),
        kf.LocalMasterKey.from_env("MY_KEY"),
    ]
    assert len({k.key_id for k in keys}) == 1
    assert keys[0].key_id.startswith("local:")
    plaintext, wrapped, key_id = keys[0].generate_data_key(CONTEXT)
    assert len(plaintext) == 32
    assert plaintext not in wrapped
    assert key_id == keys[0].key_id
    for key in keys:
        assert key.can_unwrap(key_id)
        assert key.unwrap(wrapped, CONTEXT, key_id) == plaintext
    for text in [*map(repr, keys), keys[0].key_id]:
        assert_no_secret(text, [MASTER_KEY_BYTES, plaintext])
        assert "not for production" in repr(keys[0])


def test_generate_file_writes_mode_0600_and_refuses_to_overwrite(tmp_path: Path) -> None:
    path = tmp_path / "new.key"
    old_umask = os.umask(0)  # the mode must come from the library, not from a strict umask
    try:
        created = kf.LocalMasterKey.generate_file(path)
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    content = path.read_text(encoding="ascii")
    assert len(base64.b64decode(content.strip(), validate=True)) == 32
    assert kf.LocalMasterKey.from_file(path).key_id == created.key_id

    with pytest.raises(kf.ConfigurationError, match="refusing to overwrite") as raised:
        kf.LocalMasterKey.generate_file(path)
    assert path.read_text(encoding="ascii") == content
    assert_error_hides(raised.value, [base64.b64decode(content)])
    assert content.strip() not in repr(created)

    other = kf.LocalMasterKey.generate_file(tmp_path / "other.key")
    assert other.key_id != created.key_id


@pytest.mark.parametrize("length", [0, 16, 31, 33, 64])
def test_bad_key_lengths_are_configuration_errors(
    length: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    raw = bytes(range(length))
    encoded = base64.b64encode(raw).decode()
    (tmp_path / "k").write_text(encoded, encoding="ascii")
    monkeypatch.setenv("KMS_FIELD_LOCAL_MASTER_KEY", encoded)
    attempts = [
        lambda: kf.LocalMasterKey(raw),
        lambda: kf.LocalMasterKey.from_file(tmp_path / "k"),
        lambda: kf.LocalMasterKey.from_env(),
    ]
    for attempt in attempts:
        with pytest.raises(kf.ConfigurationError, match=r"32|is not set") as raised:
            attempt()
        if length >= 16:
            assert_error_hides(raised.value, [raw])


def test_bad_base64_missing_file_and_unset_variable_are_configuration_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bad = MASTER_KEY_B64[:-2] + "!="
    (tmp_path / "bad.key").write_text(bad, encoding="ascii")
    monkeypatch.setenv("KMS_FIELD_LOCAL_MASTER_KEY", bad)
    monkeypatch.delenv("UNSET_KEY_VARIABLE", raising=False)
    cases = [
        (lambda: kf.LocalMasterKey.from_file(tmp_path / "bad.key"), "not valid base64"),
        (lambda: kf.LocalMasterKey.from_env(), "KMS_FIELD_LOCAL_MASTER_KEY"),
        (lambda: kf.LocalMasterKey.from_file(tmp_path / "missing.key"), "does not exist"),
        (lambda: kf.LocalMasterKey.from_env("UNSET_KEY_VARIABLE"), "UNSET_KEY_VARIABLE"),
    ]
    for attempt, expected in cases:
        with pytest.raises(kf.ConfigurationError, match=expected) as raised:
            attempt()
        for text in error_texts(raised.value):
            assert MASTER_KEY_B64[:20] not in text


def test_local_wrapped_key_is_bound_to_its_context_and_master_key() -> None:
    master = kf.LocalMasterKey(MASTER_KEY_BYTES)
    plaintext, wrapped, key_id = master.generate_data_key(CONTEXT)
    for context in OTHER_CONTEXTS:
        with pytest.raises(kf.MasterKeyError) as raised:
            master.unwrap(wrapped, context, key_id)
        assert raised.value.code == "InvalidCiphertextException"
        assert key_id in str(raised.value)
        assert_error_hides(raised.value, [MASTER_KEY_BYTES, plaintext])

    other = kf.LocalMasterKey(bytes(32))
    assert not other.can_unwrap(key_id)
    with pytest.raises(kf.MasterKeyError) as raised:
        other.unwrap(wrapped, CONTEXT, key_id)
    assert raised.value.code == "WrongMasterKey"
    assert key_id in str(raised.value)
    # Even told the wrong id, the other key cannot open it.
    with pytest.raises(kf.MasterKeyError):
        other.unwrap(wrapped, CONTEXT, other.key_id)
    tampered = wrapped[:-1] + bytes([wrapped[-1] ^ 1])
    with pytest.raises(kf.MasterKeyError, match="altered"):
        master.unwrap(tampered, CONTEXT, key_id)


@pytest.mark.databases("sqlite")
def test_a_wrapped_key_copied_to_another_version_does_not_unwrap(
    engine: sa.Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    reset_global_registry(monkeypatch)
    registry = configure_local(engine)
    registry.rotate_data_key("pii")
    secrets = [
        MASTER_KEY_BYTES,
        unwrapped_key(registry, "pii", 1),
        unwrapped_key(registry, "pii", 2),
    ]
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                "UPDATE kms_field_keys SET wrapped_key = "
                "(SELECT wrapped_key FROM kms_field_keys WHERE version = 1) WHERE version = 2"
            )
        )
    registry.forget()
    assert registry.data_key("pii", 1).version == 1
    with pytest.raises(kf.MasterKeyError) as raised:
        registry.data_key("pii", 2)
    assert raised.value.code == "InvalidCiphertextException"
    assert_error_hides(raised.value, secrets)


def test_create_data_key_does_not_activate_what_fails_to_verify(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Invariant 3 with a master key whose stored wrapped key unwraps to something else."""

    class Forgetful(kf.LocalMasterKey):
        def generate_data_key(self, context: dict[str, str]) -> tuple[bytes, bytes, str]:
            plaintext, _, key_id = super().generate_data_key(context)
            wrapped, _ = self.wrap(os.urandom(32), context)  # wraps the wrong key
            return plaintext, wrapped, key_id

    reset_global_registry(monkeypatch)
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'k.sqlite'}")
    store = kf.SqlKeyStore(engine)
    store.create_table()
    registry = kf.configure(master_key=Forgetful(MASTER_KEY_BYTES), key_store=store)
    with pytest.raises(kf.MasterKeyError) as raised:
        registry.create_data_key("pii")
    assert raised.value.code == "VerificationFailed"
    assert "'pii' version 1" in str(raised.value)
    assert_error_hides(raised.value, [MASTER_KEY_BYTES])
    # Nothing was activated, and the failed version's number was freed again...
    assert store.versions("pii") == []
    assert store.active_version("pii") is None
    with pytest.raises(kf.KeyNotFoundError, match="no key named 'pii'"):
        registry.active_key("pii")
    # ...so that a retry with a working master key creates version 1.
    retry = kf.configure(master_key=kf.LocalMasterKey(MASTER_KEY_BYTES), key_store=store)
    assert retry.create_data_key("pii").version == 1
    assert [(k.version, k.state) for k in store.versions("pii")] == [(1, kf.KeyState.ACTIVE)]
    engine.dispose()


# AwsKmsMasterKey against moto -------------------------------------------------------------------


@pytest.fixture
def kms_key(kms: KmsServer) -> str:
    """A fresh KMS key reached through a unique alias (the name in error messages)."""
    alias = f"alias/kf-test-{uuid.uuid4().hex[:12]}"
    kms.create_alias(alias, kms.create_key("sqlalchemy-kms-field test"))
    return alias


@pytest.fixture
def kms_registry(
    kms: KmsServer, kms_key: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[kf.KeyRegistry]:
    """The global registry on AWS KMS (a client of our own) and a SQLite key store."""
    reset_global_registry(monkeypatch)
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'keys.sqlite'}")
    store = kf.SqlKeyStore(engine)
    store.create_table()
    yield kf.configure(master_key=kf.AwsKmsMasterKey(kms_key, client=kms.client()), key_store=store)
    engine.dispose()


def test_aws_wrapped_key_is_bound_to_its_context(kms: KmsServer, kms_key: str) -> None:
    master = kf.AwsKmsMasterKey(kms_key, client=kms.client())
    plaintext, wrapped, key_id = master.generate_data_key(CONTEXT)
    assert key_id.startswith("aws-kms:arn:aws:kms:")
    assert master.can_unwrap(key_id)
    assert master.unwrap(wrapped, CONTEXT, key_id) == plaintext
    for context in OTHER_CONTEXTS:
        with pytest.raises(kf.MasterKeyError) as raised:
            master.unwrap(wrapped, context, key_id)
        assert raised.value.code == "InvalidCiphertextException"
        assert kms_key in str(raised.value)
        assert_error_hides(raised.value, [plaintext])
    assert kms.counts == {
        "DescribeKey": 1,
        "GenerateDataKey": 1,
        "Decrypt": 1 + len(OTHER_CONTEXTS),
    }


def test_aws_master_key_built_from_the_environment_only(kms_env: KmsServer, kms_key: str) -> None:
    # kms_env set AWS_ENDPOINT_URL_KMS, AWS_REGION and fake credentials, as a deployment would.
    assert os.environ["AWS_ENDPOINT_URL_KMS"] == kms_env.endpoint_url
    master = kf.AwsKmsMasterKey(kms_key)
    plaintext, wrapped, key_id = master.generate_data_key(CONTEXT)
    assert master.unwrap(wrapped, CONTEXT, key_id) == plaintext
    with pytest.raises(kf.MasterKeyError) as raised:
        master.unwrap(wrapped, data_key_context("pii", 2), key_id)
    assert raised.value.code == "InvalidCiphertextException"
    assert kms_env.counts == {"DescribeKey": 1, "GenerateDataKey": 1, "Decrypt": 2}
    assert repr(master) == f"AwsKmsMasterKey({kms_key!r})"


def test_create_data_key_generates_once_and_verifies_once(
    kms: KmsServer, kms_registry: kf.KeyRegistry
) -> None:
    kms.reset_counts()
    key = kf.create_data_key("pii")
    assert (key.name, key.version) == ("pii", 1)
    assert kms.counts == {"DescribeKey": 1, "GenerateDataKey": 1, "Decrypt": 1}
    stored = kms_registry.key_store.get("pii", 1)
    assert stored.state is kf.KeyState.ACTIVE
    assert stored.master_key_id.startswith("aws-kms:arn:aws:kms:")

    kms.reset_counts()
    assert kf.rotate_data_key("pii").version == 2
    assert kms.counts == {"GenerateDataKey": 1, "Decrypt": 1}
    kms.reset_counts()
    kms_registry.active_key("pii")  # already unwrapped when it was verified
    kms_registry.data_key("pii", 1)
    assert kms.counts == {}


@pytest.mark.parametrize(
    "code", ["DisabledException", "AccessDeniedException", "NotFoundException"]
)
def test_kms_refusals_become_master_key_errors(
    kms: KmsServer, kms_key: str, kms_registry: kf.KeyRegistry, code: str
) -> None:
    kf.create_data_key("pii")
    secrets = [unwrapped_key(kms_registry, "pii", 1)]

    kms_registry.forget()
    kms.reset_counts()
    kms.inject("Decrypt", code)
    for _ in range(2):  # a failure is not cached: each use asks again
        with pytest.raises(kf.MasterKeyError) as raised:
            kms_registry.data_key("pii", 1)
        assert raised.value.code == code
        message = str(raised.value)
        assert f"KMS Decrypt with key {kms_key!r} failed: {code}" in message
        assert_error_hides(raised.value, secrets)
    assert kms.counts == {"Decrypt": 2}  # refusals are not retried

    kms.inject("GenerateDataKey", code)
    with pytest.raises(kf.MasterKeyError) as raised:
        kf.rotate_data_key("pii")
    assert raised.value.code == code
    assert kms_key in str(raised.value)
    assert kms_registry.key_store.active_version("pii") == 1  # nothing was activated

    kms.clear_faults()
    assert kms_registry.data_key("pii", 1).version == 1  # recovers once KMS answers again


def test_throttling_twice_then_success(
    kms_env: KmsServer, kms_key: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reset_global_registry(monkeypatch)
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'keys.sqlite'}")
    store = kf.SqlKeyStore(engine)
    store.create_table()
    registry = kf.configure(master_key=kf.AwsKmsMasterKey(kms_key), key_store=store)
    registry.create_data_key("pii")
    registry.forget()
    kms_env.reset_counts()
    kms_env.inject("Decrypt", "ThrottlingException", times=2)
    assert registry.data_key("pii", 1).version == 1
    assert kms_env.counts == {"Decrypt": 3}
    engine.dispose()


@pytest.mark.parametrize(
    ("fault", "code"), [("ThrottlingException", "ThrottlingException"), ("drop", "ConnectionError")]
)
def test_retries_give_up_with_a_master_key_error(
    kms_env: KmsServer, kms_key: str, fault: str, code: str
) -> None:
    master = kf.AwsKmsMasterKey(kms_key, max_attempts=1)
    plaintext, wrapped, key_id = master.generate_data_key(CONTEXT)
    kms_env.inject("Decrypt", fault)
    with pytest.raises(kf.MasterKeyError) as raised:
        master.unwrap(wrapped, CONTEXT, key_id)
    assert raised.value.code == code
    assert kms_key in str(raised.value)
    assert_error_hides(raised.value, [plaintext])


# Keys never show ------------------------------------------------------------------------------


def test_the_secrecy_check_itself_catches_every_spelling() -> None:
    secret = bytes(range(100, 132))
    for spelling in (
        secret.hex(),
        secret.hex().upper(),
        base64.b64encode(secret).decode(),
        base64.urlsafe_b64encode(secret).decode().rstrip("="),
        repr(secret),
        secret.decode("latin-1"),
        secret.hex()[:32],  # half of it
    ):
        with pytest.raises(AssertionError):
            assert_no_secret(f"prefix {spelling} suffix", [secret])
    assert_no_secret("DataKey(name='pii', version=1)", [secret])


def test_no_key_bytes_in_any_repr(
    kms: KmsServer, kms_key: str, kms_registry: kf.KeyRegistry, tmp_path: Path
) -> None:
    kf.create_data_key("pii")
    kf.rotate_data_key("pii")
    local = kf.LocalMasterKey(MASTER_KEY_BYTES)
    local_store = kf.SqlKeyStore(sa.create_engine(f"sqlite:///{tmp_path / 'local.sqlite'}"))
    local_store.create_table()
    local_registry = kf.KeyRegistry(local, local_store)
    local_registry.create_data_key("pii")

    secrets = [
        MASTER_KEY_BYTES,
        unwrapped_key(kms_registry, "pii", 1),
        unwrapped_key(kms_registry, "pii", 2),
        unwrapped_key(local_registry, "pii", 1),
    ]
    stored = [*kms_registry.key_store.versions(), *local_store.versions()]
    wrapped = [s.wrapped_key for s in stored]
    objects: list[object] = [
        kms_registry,
        local_registry,
        kms_registry.master_key,
        local,
        kms_registry.key_store,
        local_store,
        kms_registry.data_key("pii", 1),
        kms_registry.data_key("pii", 2),
        local_registry.data_key("pii", 1),
        *stored,
    ]
    for obj in objects:
        for text in (repr(obj), str(obj)):
            assert_no_secret(text, secrets + wrapped)
    assert repr(stored[0]).startswith("StoredKey(name='pii', version=1, master_key_id=")


@pytest.mark.databases("sqlite")
def test_cache_keys_show_no_key_and_differ_by_key_name(
    engine: sa.Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    reset_global_registry(monkeypatch)
    registry = configure_local(engine, names=("a", "b"))
    secrets = [MASTER_KEY_BYTES, unwrapped_key(registry, "a", 1), unwrapped_key(registry, "b", 1)]

    pairs = [
        (kf.EncryptedString(320, key="a"), kf.EncryptedString(320, key="b")),
        (kf.EncryptedText(key="a"), kf.EncryptedText(key="b")),
        (kf.EncryptedBytes(key="a"), kf.EncryptedBytes(key="b")),
        (kf.EncryptedJSON(key="a"), kf.EncryptedJSON(key="b")),
        (kf.Encrypted(sa.Date(), key="a"), kf.Encrypted(sa.Date(), key="b")),
        (kf.EncryptedString(320, key="a"), kf.EncryptedString(320, key="a", accept_plaintext=True)),
    ]
    for left, right in pairs:
        assert left._static_cache_key != right._static_cache_key, (left, right)
        for type_ in (left, right):
            assert_no_secret(repr(type_._static_cache_key), secrets)
            assert_no_secret(repr(type_), secrets)
    assert kf.EncryptedString(320, key="a")._static_cache_key == pairs[0][0]._static_cache_key
    assert repr(pairs[0][0]) == "EncryptedString(320, key='a')"

    # Two tables that differ only in the key of a column: SQLAlchemy must not reuse one's
    # compiled statement (and bind processors) for the other.
    tables = [
        sa.Table(
            "same",
            sa.MetaData(),
            sa.Column("id", sa.Integer, primary_key=True),
            sa.Column("v", kf.EncryptedString(50, key=name)),
        )
        for name in ("a", "b")
    ]
    tables[0].create(engine)
    statements = [t.insert().values(id=sa.bindparam("id"), v=sa.bindparam("v")) for t in tables]
    cache_keys = [s._generate_cache_key() for s in statements]
    assert cache_keys[0] != cache_keys[1]
    for cache_key in cache_keys:
        assert_no_secret(repr(cache_key), secrets)
    with engine.begin() as conn:
        conn.execute(statements[0], {"id": 1, "v": "x"})
        conn.execute(statements[1], {"id": 2, "v": "y"})
    assert [v[:8] for v in raw_values(engine, "same", "v")] == ["kf2:a:1:", "kf2:b:1:"]
