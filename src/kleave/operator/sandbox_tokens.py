"""Per-pod bearer tokens for sandbox runtimes, derived from one operator key.

Any workload that can reach a sandbox pod's IP could otherwise run commands in it. Every pod
the operator creates gets a random nonce; its token is ``HMAC-SHA256(key, namespace/pod/nonce)``
and the pod only ever sees the token's SHA-256 (a pod annotation projected into a file), so
reading the pod spec gives nobody a credential. The operator recomputes a pod's token from
the key when it calls the runtime (pause, resume, idle checks) and hands each pod's token to
the sandbox's users in a Secret ``<pod>-runtime-token`` named in ``status.tokenSecretName``
(the operator may create Secrets, never read them). Rotating the key makes the tokens of
running pods unknown to the operator: pause them first.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kleave.operator.naming import ANNOTATION_TOKEN_NONCE

KEY_FILE_ENV = "KLEAVE_RUNTIME_TOKEN_KEY_FILE"
MIN_KEY_BYTES = 32


class TokenKeyError(Exception):
    """The key file is missing, unreadable or too short; the message says which."""


def default_key_path() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "kleave" / "runtime-token.key"


def load_key(path: Path | None = None) -> bytes:
    """The key from ``path``, else ``$KLEAVE_RUNTIME_TOKEN_KEY_FILE``, else the default file.

    Only the default file is created when missing (a local ``kleave operator run``); a file
    that was named must exist, since a made-up key would lock the operator out of every
    running sandbox.
    """
    named = path or (Path(os.environ[KEY_FILE_ENV]) if os.environ.get(KEY_FILE_ENV) else None)
    target = named or default_key_path()
    if named is None and not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(secrets.token_bytes(MIN_KEY_BYTES))
    try:
        key = target.read_bytes().strip()
    except OSError as error:
        raise TokenKeyError(f"cannot read the runtime token key {target}: {error}") from None
    if len(key) < MIN_KEY_BYTES:
        raise TokenKeyError(
            f"the runtime token key {target} has {len(key)} bytes; it needs at least "
            f"{MIN_KEY_BYTES} (e.g. `head -c 48 /dev/urandom | base64 > {target}`)"
        )
    return key


@dataclass(frozen=True)
class PodToken:
    """What a new pod carries: its nonce and the SHA-256 of its token."""

    nonce: str
    digest: str


def digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class RuntimeTokens:
    """Derives the tokens of sandbox pods from the operator's key."""

    def __init__(self, key: bytes) -> None:
        self._key = key

    def token(self, namespace: str, pod: str, nonce: str) -> str:
        mac = hmac.new(self._key, f"{namespace}/{pod}/{nonce}".encode(), hashlib.sha256)
        return base64.urlsafe_b64encode(mac.digest()).decode().rstrip("=")

    def issue(self, namespace: str, pod: str) -> PodToken:
        nonce = secrets.token_hex(16)
        return PodToken(nonce=nonce, digest=digest(self.token(namespace, pod, nonce)))

    def for_pod(self, pod: Mapping[str, Any]) -> str | None:
        """The token of a pod the operator built; None for a pod without a nonce."""
        meta = pod["metadata"]
        nonce = (meta.get("annotations") or {}).get(ANNOTATION_TOKEN_NONCE)
        if not nonce:
            return None
        return self.token(str(meta["namespace"]), str(meta["name"]), str(nonce))
