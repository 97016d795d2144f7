"""moto's KMS server on 127.0.0.1, behind a WSGI layer of ours that counts and refuses calls.

moto speaks the real KMS wire protocol and checks encryption contexts, but it never refuses a call:
disabled keys, key policies and throttling do not exist for it. Like real KMS, our layer refuses
cryptographic calls with a key pending deletion (KMSInvalidStateException), which moto allows.
`FaultInjector` answers chosen calls with a real AWS JSON error (or a dropped connection) before
they reach moto, and counts every call per operation, including calls made from subprocesses,
since the counters live in this process.
"""

from __future__ import annotations

import base64
import binascii
import http.client
import io
import json
import os
import socket
import threading
import uuid
from collections import Counter
from collections.abc import Iterable, MutableMapping
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any

import boto3
from botocore.config import Config
from moto.core.models import DEFAULT_ACCOUNT_ID
from moto.kms.models import kms_backends
from moto.moto_server.werkzeug_app import (
    DomainDispatcherApplication,
    MotoRequestHandler,
    create_backend_app,
)
from werkzeug.serving import make_server

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment
    from mypy_boto3_kms import KMSClient

REGION = "us-east-1"
ERRORS = frozenset(
    {
        "DisabledException",
        "AccessDeniedException",
        "ThrottlingException",
        "NotFoundException",
        "KMSInvalidStateException",
    }
)
DROP = "drop"
# Requests carrying this header (our own setup calls) are neither counted nor refused.
_ADMIN_HEADER = "X-Kms-Field-Test-Admin"
_MOTO_KEY_ID_LEN = 36  # moto's ciphertext blob starts with the key's UUID

# Variables that would let boto3 find real credentials, a profile or another endpoint.
_AWS_VARIABLES_TO_UNSET = (
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AWS_ROLE_ARN",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_KMS",
    "AWS_IGNORE_CONFIGURED_ENDPOINT_URLS",
)


def fake_aws_environment() -> dict[str, str]:
    """Fake credentials, a region, and no config files: boto3 never reads ~/.aws or real keys."""
    return {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_REGION": REGION,
        "AWS_DEFAULT_REGION": REGION,
        "AWS_CONFIG_FILE": os.devnull,
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        "AWS_EC2_METADATA_DISABLED": "true",
    }


def isolate_aws_environment(environ: MutableMapping[str, str]) -> None:
    for name in _AWS_VARIABLES_TO_UNSET:
        environ.pop(name, None)
    environ.update(fake_aws_environment())


@dataclass
class _Fault:
    operation: str
    error: str
    remaining: int | None  # None: until cleared
    key_id: str | None


class FaultInjector:
    """WSGI middleware: counts calls per KMS operation and answers chosen ones with a fault."""

    def __init__(self, app: WSGIApplication) -> None:
        self._app = app
        self._lock = threading.Lock()
        self._counts: Counter[str] = Counter()
        self._faults: list[_Fault] = []

    def counts(self) -> Counter[str]:
        with self._lock:
            return self._counts.copy()

    def reset_counts(self) -> None:
        with self._lock:
            self._counts.clear()

    def add(self, fault: _Fault) -> None:
        with self._lock:
            self._faults.append(fault)

    def clear(self) -> None:
        with self._lock:
            self._faults.clear()

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        target = environ.get("HTTP_X_AMZ_TARGET", "")
        if not target or environ.get("HTTP_" + _ADMIN_HEADER.upper().replace("-", "_")):
            return self._app(environ, start_response)
        operation = target.rpartition(".")[2]
        body = environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
        environ["wsgi.input"] = io.BytesIO(body)  # moto reads the body again
        with self._lock:
            self._counts[operation] += 1
            fault = self._take_fault(operation, body)
        if fault is None and operation in _CRYPTO and _pending_deletion(body):
            # Real KMS refuses every cryptographic call with a key pending deletion; moto does not.
            fault = _Fault(operation, "KMSInvalidStateException", None, None)
        if fault is None:
            return self._app(environ, start_response)
        if fault.error == DROP:
            # Close the connection without an answer; werkzeug treats this as a client hang-up.
            environ["werkzeug.socket"].shutdown(socket.SHUT_RDWR)
            raise ConnectionResetError(f"fault injected: dropped {operation}")
        message = f"fault injected by the test KMS server: {operation}"
        answer = json.dumps({"__type": fault.error, "message": message}).encode()
        start_response(
            "400 Bad Request",
            [
                ("Content-Type", "application/x-amz-json-1.1"),
                ("Content-Length", str(len(answer))),
                ("x-amzn-RequestId", str(uuid.uuid4())),
            ],
        )
        return [answer]

    def _take_fault(self, operation: str, body: bytes) -> _Fault | None:
        keys: set[str] | None = None
        for fault in self._faults:
            if fault.operation != operation:
                continue
            if fault.key_id is not None:
                keys = _request_key_ids(body) if keys is None else keys
                if _canonical_key_id(fault.key_id) not in keys:
                    continue
            if fault.remaining is not None:
                fault.remaining -= 1
                if fault.remaining == 0:
                    self._faults.remove(fault)
            return fault
        return None


_CRYPTO = frozenset({"Decrypt", "Encrypt", "GenerateDataKey", "ReEncrypt"})


def _pending_deletion(body: bytes) -> bool:
    backend = kms_backends[DEFAULT_ACCOUNT_ID][REGION]
    keys = [backend.keys.get(key_id) for key_id in _request_key_ids(body)]
    return any(key is not None and key.key_state == "PendingDeletion" for key in keys)


def _canonical_key_id(key_id: str) -> str:
    """A key UUID for a UUID, key ARN, alias name or alias ARN known to moto."""
    try:
        return str(kms_backends[DEFAULT_ACCOUNT_ID][REGION].any_id_to_key_id(key_id))
    except Exception:  # an unknown alias: compare it as written
        return key_id


def _request_key_ids(body: bytes) -> set[str]:
    """Every key a request names, directly or through the key that made its ciphertext blob."""
    try:
        request: Any = json.loads(body or b"{}")
    except ValueError:
        return set()
    if not isinstance(request, dict):
        return set()
    names = [request.get(field) for field in ("KeyId", "DestinationKeyId", "SourceKeyId")]
    keys = {_canonical_key_id(name) for name in names if isinstance(name, str)}
    blob = request.get("CiphertextBlob")
    if isinstance(blob, str):
        try:
            keys.add(base64.b64decode(blob)[:_MOTO_KEY_ID_LEN].decode("ascii"))
        except (binascii.Error, UnicodeDecodeError):
            pass
    return keys


class _QuietRequestHandler(MotoRequestHandler):
    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        pass


class KmsServer:
    """A real HTTP KMS endpoint on 127.0.0.1 at a free port; use as a context manager."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self._faults = FaultInjector(DomainDispatcherApplication(create_backend_app))
        self._server = make_server(
            host, 0, self._faults, threaded=True, request_handler=_QuietRequestHandler
        )
        self._address = (host, self._server.server_port)
        self.endpoint_url = f"http://{host}:{self._server.server_port}"
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="kms-server", daemon=True
        )
        self._admin: KMSClient | None = None

    def __enter__(self) -> KmsServer:
        self._thread.start()
        # moto's state is global to this process: start the session from an empty backend.
        connection = http.client.HTTPConnection(*self._address, timeout=10)
        connection.request("POST", "/moto-api/reset")
        assert connection.getresponse().status == 200, "moto's reset failed"
        connection.close()
        self._admin = self.client()
        self._admin.meta.events.register("before-send.kms", _mark_as_admin)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    def client(self, config: Config | None = None) -> KMSClient:
        """A real boto3 KMS client for this server (a session of its own, so thread-safe)."""
        return boto3.session.Session().client(
            "kms",
            endpoint_url=self.endpoint_url,
            region_name=REGION,
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
            config=config,
        )

    def env(self) -> dict[str, str]:
        """Environment for a subprocess whose plain `boto3.client("kms")` must reach this server."""
        return {**fake_aws_environment(), "AWS_ENDPOINT_URL_KMS": self.endpoint_url}

    def create_key(self, description: str = "") -> str:
        """A new symmetric key's KeyId (not counted, never refused)."""
        assert self._admin is not None, "start the server first"
        return self._admin.create_key(Description=description)["KeyMetadata"]["KeyId"]

    def create_alias(self, alias: str, key_id: str) -> None:
        assert self._admin is not None, "start the server first"
        self._admin.create_alias(AliasName=alias, TargetKeyId=key_id)

    @property
    def counts(self) -> Counter[str]:
        """Calls received per operation ("Decrypt", ...) since the last reset; a snapshot."""
        return self._faults.counts()

    def reset_counts(self) -> None:
        self._faults.reset_counts()

    def inject(
        self, operation: str, error: str, times: int | None = None, key_id: str | None = None
    ) -> None:
        """Answer the next `times` calls of `operation` (all until cleared if None) with `error`.

        `error` is one of ERRORS, answered as HTTP 400 with an AWS JSON error body, or "drop",
        which closes the connection without an answer. With `key_id` (a KeyId, key ARN or alias),
        only calls naming that key (KeyId, DestinationKeyId) or decrypting a blob it made match.
        """
        if error not in ERRORS and error != DROP:
            raise ValueError(f"unknown error {error!r}; use one of {sorted(ERRORS)} or 'drop'")
        if times is not None and times < 1:
            raise ValueError("times must be at least 1, or None for until cleared")
        self._faults.add(_Fault(operation, error, times, key_id))

    def clear_faults(self) -> None:
        self._faults.clear()


def _mark_as_admin(request: Any, **kwargs: Any) -> None:
    request.headers[_ADMIN_HEADER] = "1"
