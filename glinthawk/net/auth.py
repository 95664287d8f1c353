"""Shared-secret authentication: a mutual HMAC challenge-response inside the handshake.

Both sides pick a random nonce; each proves knowledge of the secret by an HMAC-SHA256
over both nonces with its own role label, so a proof cannot be replayed or reflected.
The secret itself never crosses the wire and is never logged.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path

SECRET_ENV = "GLINTHAWK_SECRET"
NONCE_BYTES = 32


class SecretError(ValueError):
    """The secret file cannot be read or is empty."""


def new_nonce() -> bytes:
    return secrets.token_bytes(NONCE_BYTES)


def proof(secret: bytes, label: bytes, first: bytes, second: bytes) -> bytes:
    return hmac.new(secret, label + b"\0" + first + second, hashlib.sha256).digest()


def verify(expected: bytes, given: object) -> bool:
    return isinstance(given, bytes) and hmac.compare_digest(expected, given)


def load_secret(secret_file: str | Path | None) -> bytes | None:
    """The secret from ``secret_file`` if given, else from $GLINTHAWK_SECRET, else None."""
    if secret_file is not None:
        try:
            secret = Path(secret_file).read_bytes().strip()
        except OSError as exc:
            raise SecretError(f"cannot read secret file {secret_file}: {exc.strerror}") from None
        if not secret:
            raise SecretError(f"secret file {secret_file} is empty")
        return secret
    value = os.environ.get(SECRET_ENV, "").strip()
    return value.encode() if value else None


def is_loopback(host: str) -> bool:
    return host in ("localhost", "::1") or host.startswith("127.")
