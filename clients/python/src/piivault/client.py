"""The piivault client: mutual TLS, automatic batching, deadlines, retries
with backoff and jitter on UNAVAILABLE for idempotent calls, typed errors,
and per-item results whose repr never shows a value."""

from __future__ import annotations

import os
import random
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence, TypeVar, Union

import grpc

from piivault.v1 import tokenizer_pb2, tokenizer_pb2_grpc

#: The server's default ``limits.max_items_per_call``.
DEFAULT_MAX_BATCH = 1000

PemSource = Union[bytes, str, "os.PathLike[str]"]

_ITEM_CODES = {
    tokenizer_pb2.ITEM_ERROR_CODE_NOT_FOUND: "NOT_FOUND",
    tokenizer_pb2.ITEM_ERROR_CODE_INVALID_VALUE: "INVALID_VALUE",
    tokenizer_pb2.ITEM_ERROR_CODE_UNREADABLE: "UNREADABLE",
    tokenizer_pb2.ITEM_ERROR_CODE_TOKEN_SPACE_EXHAUSTED: "TOKEN_SPACE_EXHAUSTED",
}


class PiiVaultError(Exception):
    """A whole call failed. ``code`` is the gRPC status name; the message
    comes from the server, which never puts a value in it."""

    code = "UNKNOWN"

    def __init__(self, message: str, code: Optional[str] = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


class PermissionDenied(PiiVaultError):
    """Not granted this action on this collection (or no such collection)."""

    code = "PERMISSION_DENIED"


class Unauthenticated(PiiVaultError):
    """The certificate names no caller, or was revoked."""

    code = "UNAUTHENTICATED"


class InvalidArgument(PiiVaultError):
    """A malformed request."""

    code = "INVALID_ARGUMENT"


class ResourceExhausted(PiiVaultError):
    """A limit: the caller's rate or detokenize quota, message size, token space."""

    code = "RESOURCE_EXHAUSTED"


class Unavailable(PiiVaultError):
    """The vault cannot serve now, or cannot be reached (TLS included)."""

    code = "UNAVAILABLE"


class DeadlineExceeded(PiiVaultError):
    """The call's deadline passed."""

    code = "DEADLINE_EXCEEDED"


_ERRORS = {
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
}


def _error(e: grpc.RpcError) -> PiiVaultError:
    code = e.code()  # type: ignore[attr-defined]
    message = e.details() or ""  # type: ignore[attr-defined]
    kind = _ERRORS.get(code)
    return kind(message) if kind else PiiVaultError(message, code.name)


@dataclass(frozen=True)
class ItemError:
    """Why one item failed: ``NOT_FOUND``, ``INVALID_VALUE``, ``UNREADABLE``,
    ``TOKEN_SPACE_EXHAUSTED``, or ``BATCH_FAILED`` (its batch failed as a
    whole after earlier batches of the same call succeeded)."""

    code: str
    message: str


@dataclass(frozen=True)
class TokenResult:
    """One tokenized value: ``token``, or ``error``."""

    token: Optional[str] = None
    error: Optional[ItemError] = None

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass(frozen=True)
class ValueResult:
    """One detokenized token: ``value`` (masked if ``masked``), or ``error``.
    The value is left out of the repr."""

    value: Optional[str] = field(default=None, repr=False)
    masked: bool = False
    error: Optional[ItemError] = None

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass(frozen=True)
class DeleteResult:
    """One deleted token: ``deleted``, or ``error``."""

    deleted: bool = False
    error: Optional[ItemError] = None

    @property
    def ok(self) -> bool:
        return self.error is None


#: The longest string taken for a file path; anything longer is not one.
_MAX_PATH = 4096


def _pem(source: PemSource, what: str) -> bytes:
    """PEM bytes, PEM text (a string holding ``-----BEGIN``), or the path
    of a PEM file. An error names the path and nothing else: a key passed
    as a string never lands in an exception."""
    if isinstance(source, (bytes, bytearray)):
        return bytes(source)
    text = os.fspath(source)
    if "-----BEGIN" in text:
        return text.encode()
    if "\n" in text or len(text) > _MAX_PATH:
        raise ValueError(f"the {what} is neither PEM text nor a file path")
    try:
        with open(text, "rb") as f:
            return f.read()
    except OSError as error:
        raise ValueError(f"cannot read the {what} file {text}: {error.strerror or 'unreadable'}") from None


_LIMIT = re.compile(r"the limit is (\d+)")

#: Seconds a node that answered UNAVAILABLE (or could not be reached) is
#: skipped while other nodes are up.
NODE_DOWN_FOR = 5.0


class _Node:
    """One vault node: its channel, and until when it is skipped."""

    def __init__(self, address: str, credentials: grpc.ChannelCredentials) -> None:
        self.address = address
        self.channel = grpc.secure_channel(
            address,
            credentials,
            options=[("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)],
        )
        self.stub = tokenizer_pb2_grpc.TokenizerStub(self.channel)
        self.down_until = 0.0

    def is_up(self, now: float) -> bool:
        return self.down_until <= now


def _addresses(address: Union[str, Sequence[str]]) -> list[str]:
    """Addresses from a comma-separated string or a sequence of them."""
    parts = address.split(",") if isinstance(address, str) else list(address)
    addresses = [a.strip() for a in parts if a.strip()]
    if not addresses:
        raise ValueError("no vault address given")
    return addresses

R = TypeVar("R", TokenResult, ValueResult, DeleteResult)


class Client:
    """A connection to a vault. Use as a context manager, or call close().

    ``address`` is one node's ``host:port``, or several (comma-separated,
    or a sequence) of nodes on one database: calls go round robin, and a
    node that answered UNAVAILABLE or could not be reached is skipped for
    ``NODE_DOWN_FOR`` seconds. ``ca``, ``cert`` and ``key`` are PEM bytes,
    PEM text or file paths. ``max_batch`` items at most go in one request
    (lowered automatically when the server says its limit is lower); every
    request has ``deadline`` seconds; detokenize and delete are retried
    ``retries`` times on UNAVAILABLE, at once on another node that is up,
    else waiting up to ``backoff`` seconds the first time, doubling, with
    full jitter. Tokenize is never retried: a lost answer could store a
    value twice."""

    def __init__(
        self,
        address: Union[str, Sequence[str]],
        *,
        ca: PemSource,
        cert: PemSource,
        key: PemSource,
        max_batch: int = DEFAULT_MAX_BATCH,
        deadline: float = 30.0,
        retries: int = 3,
        backoff: float = 0.1,
    ) -> None:
        credentials = grpc.ssl_channel_credentials(
            root_certificates=_pem(ca, "CA certificate"),
            private_key=_pem(key, "client key"),
            certificate_chain=_pem(cert, "client certificate"),
        )
        self._nodes = [_Node(a, credentials) for a in _addresses(address)]
        self._next = 0
        self._lock = threading.Lock()
        self.max_batch = max(1, max_batch)
        self.deadline = deadline
        self.retries = retries
        self.backoff = backoff

    @classmethod
    def from_env(cls, **options: float) -> "Client":
        """From ``PIIVAULT_ADDR``, ``PIIVAULT_CACERT``, ``PIIVAULT_CLIENT_CERT``
        and ``PIIVAULT_CLIENT_KEY`` (file paths), as the command line reads them."""
        names = ["PIIVAULT_ADDR", "PIIVAULT_CACERT", "PIIVAULT_CLIENT_CERT", "PIIVAULT_CLIENT_KEY"]
        missing = [n for n in names if not os.environ.get(n)]
        if missing:
            raise ValueError(f"{', '.join(missing)} not set")
        addr, ca, cert, key = (os.environ[n] for n in names)
        return cls(addr, ca=ca, cert=cert, key=key, **options)  # type: ignore[arg-type]

    def close(self) -> None:
        for node in self._nodes:
            node.channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Client(nodes={len(self._nodes)}, max_batch={self.max_batch}, deadline={self.deadline})"

    def _pick(self) -> _Node:
        """The node for the next call: the next in turn that is not being
        skipped (the next in turn if every node is)."""
        with self._lock:
            start = self._next
            self._next = (start + 1) % len(self._nodes)
        now = time.monotonic()
        turn = [self._nodes[(start + i) % len(self._nodes)] for i in range(len(self._nodes))]
        return next((node for node in turn if node.is_up(now)), turn[0])

    def tokenize(self, collection: str, values: Sequence[str]) -> list[TokenResult]:
        """A token per value, in order."""

        def call(stub: tokenizer_pb2_grpc.TokenizerStub, batch: list[str]) -> list[TokenResult]:
            request = tokenizer_pb2.TokenizeRequest(collection=collection, values=batch)
            response = stub.Tokenize(request, timeout=self.deadline)
            return [
                TokenResult(token=r.token) if r.WhichOneof("outcome") == "token" else TokenResult(error=_item(r.error))
                for r in response.results
            ]

        return self._batched(values, False, call, lambda e: TokenResult(error=e))

    def detokenize(self, collection: str, tokens: Sequence[str]) -> list[ValueResult]:
        """The value (or its mask) per token, in order."""

        def call(stub: tokenizer_pb2_grpc.TokenizerStub, batch: list[str]) -> list[ValueResult]:
            request = tokenizer_pb2.DetokenizeRequest(collection=collection, tokens=batch)
            response = stub.Detokenize(request, timeout=self.deadline)
            return [
                ValueResult(value=r.value, masked=r.masked)
                if r.WhichOneof("outcome") == "value"
                else ValueResult(error=_item(r.error))
                for r in response.results
            ]

        return self._batched(tokens, True, call, lambda e: ValueResult(error=e))

    def delete(self, collection: str, tokens: Sequence[str]) -> list[DeleteResult]:
        """Deletes each token's value, in order (a second delete is NOT_FOUND)."""

        def call(stub: tokenizer_pb2_grpc.TokenizerStub, batch: list[str]) -> list[DeleteResult]:
            request = tokenizer_pb2.DeleteRequest(collection=collection, tokens=batch)
            response = stub.Delete(request, timeout=self.deadline)
            return [
                DeleteResult(deleted=True) if r.WhichOneof("outcome") == "deleted" else DeleteResult(error=_item(r.error))
                for r in response.results
            ]

        return self._batched(tokens, True, call, lambda e: DeleteResult(error=e))

    def _batched(
        self,
        items: Sequence[str],
        idempotent: bool,
        call: Callable[[tokenizer_pb2_grpc.TokenizerStub, list[str]], list[R]],
        failed: Callable[[ItemError], R],
    ) -> list[R]:
        items = list(items)
        out: list[R] = []
        while len(out) < len(items):
            size = min(self.max_batch, len(items) - len(out))
            batch = items[len(out) : len(out) + size]
            try:
                results = self._with_retries(idempotent, lambda stub: call(stub, batch))
            except PiiVaultError as error:
                limit = _LIMIT.search(error.message) if isinstance(error, ResourceExhausted) else None
                if limit and 0 < int(limit.group(1)) < size:
                    self.max_batch = int(limit.group(1))
                    continue
                if not out:
                    raise
                out.extend(failed(ItemError("BATCH_FAILED", str(error))) for _ in range(len(items) - len(out)))
                break
            if len(results) != size:
                raise PiiVaultError(f"the server answered {len(results)} results for {size} items")
            out.extend(results)
        return out

    def _with_retries(
        self, idempotent: bool, attempt: Callable[[tokenizer_pb2_grpc.TokenizerStub], list[R]]
    ) -> list[R]:
        tries = 0
        while True:
            node = self._pick()
            try:
                return attempt(node.stub)
            except grpc.RpcError as e:
                error = _error(e)
            if isinstance(error, Unavailable):
                node.down_until = time.monotonic() + NODE_DOWN_FOR
            if not (idempotent and isinstance(error, Unavailable) and tries < self.retries):
                raise error from None
            # Another node that is up is tried at once; when none is, the
            # retry waits.
            if not any(n.is_up(time.monotonic()) for n in self._nodes):
                time.sleep(random.uniform(0, self.backoff * (2**tries)))
            tries += 1


def _item(error: tokenizer_pb2.ItemError) -> ItemError:
    return ItemError(_ITEM_CODES.get(error.code, "UNSPECIFIED"), error.message)
