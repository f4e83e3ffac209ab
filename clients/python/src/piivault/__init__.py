"""Client for the piivault PII tokenization vault."""

from piivault.client import (
    Client,
    DeadlineExceeded,
    DeleteResult,
    InvalidArgument,
    ItemError,
    PermissionDenied,
    PiiVaultError,
    ResourceExhausted,
    TokenResult,
    Unauthenticated,
    Unavailable,
    ValueResult,
)

__all__ = [
    "Client",
    "DeadlineExceeded",
    "DeleteResult",
    "InvalidArgument",
    "ItemError",
    "PermissionDenied",
    "PiiVaultError",
    "ResourceExhausted",
    "TokenResult",
    "Unauthenticated",
    "Unavailable",
    "ValueResult",
]
