"""The test infrastructure itself: real KMS over HTTP with faults and counts, real databases."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import boto3
import pytest
import sqlalchemy as sa
from botocore.config import Config
from botocore.exceptions import ClientError, HTTPClientError

from tests.databases import EXTRA_SCHEMA_PREFIX, SERVER_URLS, drop_test_objects, probe
from tests.kms_server import ERRORS, KmsServer

NO_RETRIES = Config(retries={"mode": "standard", "total_max_attempts": 1})
ROOT = Path(__file__).resolve().parent.parent


def test_encrypt_decrypt_round_trip_checks_the_encryption_context(kms: KmsServer) -> None:
    key_id = kms.create_key("round trip")
    client = kms.client()
    context = {"table": "users", "column": "email"}
    blob = client.encrypt(KeyId=key_id, Plaintext=b"secret", EncryptionContext=context)[
        "CiphertextBlob"
    ]
    assert b"secret" not in blob

    answer = client.decrypt(CiphertextBlob=blob, EncryptionContext=context)
    assert answer["Plaintext"] == b"secret"
    assert answer["KeyId"].endswith(key_id)
    with pytest.raises(client.exceptions.InvalidCiphertextException):
        client.decrypt(CiphertextBlob=blob, EncryptionContext={**context, "table": "orders"})


def test_counts_calls_per_operation_but_not_setup_calls(kms: KmsServer) -> None:
    key_id = kms.create_key()
    kms.create_alias("alias/kf-counts", key_id)
    client = kms.client()
    wrapped = client.generate_data_key(KeyId="alias/kf-counts", KeySpec="AES_256")
    client.generate_data_key(KeyId=key_id, KeySpec="AES_256")
    client.decrypt(CiphertextBlob=wrapped["CiphertextBlob"])
    assert kms.counts == {"GenerateDataKey": 2, "Decrypt": 1}

    kms.reset_counts()
    assert kms.counts == {}


@pytest.mark.parametrize("error", sorted(ERRORS))
def test_injected_error_surfaces_as_client_error(kms: KmsServer, error: str) -> None:
    key_id = kms.create_key()
    client = kms.client(NO_RETRIES)
    kms.inject("Encrypt", error, times=1)

    with pytest.raises(ClientError) as raised:
        client.encrypt(KeyId=key_id, Plaintext=b"x")
    assert raised.value.response["Error"]["Code"] == error
    assert raised.value.response["ResponseMetadata"]["HTTPStatusCode"] == 400
    client.encrypt(KeyId=key_id, Plaintext=b"x")  # times=1: the next call goes through
    assert kms.counts["Encrypt"] == 2


def test_disabled_exception_is_the_modelled_exception(kms: KmsServer) -> None:
    client = kms.client(NO_RETRIES)
    blob = client.encrypt(KeyId=kms.create_key(), Plaintext=b"x")["CiphertextBlob"]
    kms.inject("Decrypt", "DisabledException")
    for _ in range(3):  # times=None: until cleared
        with pytest.raises(client.exceptions.DisabledException):
            client.decrypt(CiphertextBlob=blob)
    kms.clear_faults()
    assert client.decrypt(CiphertextBlob=blob)["Plaintext"] == b"x"


def test_throttling_is_retried_by_botocore_then_succeeds(kms: KmsServer) -> None:
    key_id = kms.create_key()
    client = kms.client(Config(retries={"mode": "standard", "total_max_attempts": 3}))
    kms.inject("Encrypt", "ThrottlingException", times=2)

    client.encrypt(KeyId=key_id, Plaintext=b"x")
    assert kms.counts["Encrypt"] == 3


def test_drop_is_a_connection_error(kms: KmsServer) -> None:
    key_id = kms.create_key()
    kms.inject("Encrypt", "drop", times=1)
    with pytest.raises(HTTPClientError):
        kms.client(NO_RETRIES).encrypt(KeyId=key_id, Plaintext=b"x")

    kms.inject("Encrypt", "drop", times=1)
    kms.client(Config(retries={"mode": "standard", "total_max_attempts": 2})).encrypt(
        KeyId=key_id, Plaintext=b"x"
    )
    assert kms.counts["Encrypt"] == 3


def test_faults_can_target_one_key_by_id_arn_alias_or_ciphertext(kms: KmsServer) -> None:
    target, other = kms.create_key(), kms.create_key()
    kms.create_alias("alias/kf-target", target)
    client = kms.client(NO_RETRIES)
    target_arn = client.describe_key(KeyId=target)["KeyMetadata"]["Arn"]
    target_blob = client.encrypt(KeyId=target, Plaintext=b"t")["CiphertextBlob"]
    other_blob = client.encrypt(KeyId=other, Plaintext=b"o")["CiphertextBlob"]

    kms.inject("Encrypt", "DisabledException", key_id="alias/kf-target")
    kms.inject("Decrypt", "DisabledException", key_id=target)
    for key in (target, target_arn, "alias/kf-target"):
        with pytest.raises(client.exceptions.DisabledException):
            client.encrypt(KeyId=key, Plaintext=b"x")
    with pytest.raises(client.exceptions.DisabledException):
        client.decrypt(CiphertextBlob=target_blob)
    client.encrypt(KeyId=other, Plaintext=b"x")
    assert client.decrypt(CiphertextBlob=other_blob)["Plaintext"] == b"o"


def test_inject_refuses_unknown_errors(kms: KmsServer) -> None:
    with pytest.raises(ValueError, match="unknown error"):
        kms.inject("Decrypt", "NoSuchException")


def test_subprocess_reaches_the_server_with_env_only(kms: KmsServer) -> None:
    key_id = kms.create_key()
    script = (
        "import sys, boto3\n"
        "key = boto3.client('kms').describe_key(KeyId=sys.argv[1])['KeyMetadata']\n"
        "print(key['KeyId'])\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, key_id],
        env=kms.env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == key_id
    assert kms.counts == {"DescribeKey": 1}


@pytest.mark.skipif(bool(os.environ.get("KMS_FIELD_TEST_AWS_KEY_ID")), reason="real AWS run")
def test_boto3_in_this_process_sees_only_fake_credentials() -> None:
    credentials = boto3.session.Session().get_credentials()
    assert credentials is not None
    assert credentials.access_key == "testing"
    assert os.environ["AWS_CONFIG_FILE"] == os.devnull
    assert "AWS_PROFILE" not in os.environ


def test_kms_env_fixture_points_plain_clients_at_the_server(kms_env: KmsServer) -> None:
    boto3.session.Session().client("kms").list_keys()
    assert kms_env.counts == {"ListKeys": 1}


def test_each_database_answers_select_one(engine: sa.Engine, database: str) -> None:
    with engine.connect() as connection:
        assert connection.execute(sa.text("SELECT 1")).scalar_one() == 1
    expected = {"sqlite": "sqlite", "postgresql": "postgresql", "mariadb": "mysql"}[database]
    assert engine.dialect.name == expected


@pytest.mark.databases("sqlite")
def test_the_marker_narrows_the_databases(database: str) -> None:
    assert database == "sqlite"


@pytest.mark.databases("postgresql", "mariadb")
def test_cleanup_drops_tables_and_test_schemas(db_url: str, database: str) -> None:
    schema = f"{EXTRA_SCHEMA_PREFIX}_cleanup"
    engine = sa.create_engine(db_url)
    with engine.begin() as connection:
        connection.exec_driver_sql(f"CREATE SCHEMA {schema}")
    metadata = sa.MetaData()
    parent = sa.Table("kf_parent", metadata, sa.Column("id", sa.Integer, primary_key=True))
    sa.Table("kf_child", metadata, sa.Column("id", sa.ForeignKey(parent.c.id), primary_key=True))
    sa.Table("kf_elsewhere", metadata, sa.Column("id", sa.Integer), schema=schema)
    metadata.create_all(engine)
    engine.dispose()

    drop_test_objects(db_url)

    inspector = sa.inspect(sa.create_engine(db_url))
    assert inspector.get_table_names() == []
    assert schema not in inspector.get_schema_names()


def test_probe_explains_an_unreachable_database() -> None:
    problem = probe("postgresql+psycopg://postgres@127.0.0.1:1/test")
    assert problem is not None
    assert problem.startswith("OperationalError")


@pytest.mark.parametrize(("require", "outcome"), [("", "1 skipped"), ("1", "1 error")])
def test_unreachable_database_skips_or_fails_on_demand(require: str, outcome: str) -> None:
    dead = "postgresql+psycopg://postgres@127.0.0.1:1/test"
    env = {
        **os.environ,
        "KMS_FIELD_TEST_POSTGRESQL_URL": dead,
        "KMS_FIELD_REQUIRE_DATABASES": require,
    }
    test = "tests/test_infrastructure.py::test_each_database_answers_select_one[postgresql]"
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", test],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert outcome in result.stdout, result.stdout
    assert "127.0.0.1:1/test" in result.stdout
    assert result.returncode == (1 if require else 0)


def test_default_server_urls_are_the_documented_ones() -> None:
    for variable, url in (
        ("KMS_FIELD_TEST_POSTGRESQL_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"),
        ("KMS_FIELD_TEST_MARIADB_URL", "mysql+pymysql://root@127.0.0.1:3306/test"),
    ):
        if variable not in os.environ:
            assert url in SERVER_URLS.values()
