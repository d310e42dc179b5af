"""Client keys: Bearer tokens checked against SHA-256 hashes in constant time.

Keys come from `APPLIANCE_API_KEYS` (simple setups) and from the keys file, which holds only
`<key id> sha256:<hex>` lines, so a stolen file reveals no usable key. The file is re-read when it
changes, so keys can be rotated without a restart.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import secrets
import time
from pathlib import Path

KEY_PREFIX = "sk-appliance-"


def hash_key(key: str) -> str:
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def read_keys_file(path: Path) -> dict[str, str]:
    """Key id -> hash. Blank lines and `#` comments are skipped; malformed lines are an error."""
    keys: dict[str, str] = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) != 2 or not parts[1].startswith("sha256:"):
            raise ValueError(f"{path}:{number}: expected '<key id> sha256:<hex>'")
        keys[parts[0]] = parts[1]
    return keys


def write_keys_file(path: Path, keys: dict[str, str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write("# appliance client keys: <key id> sha256:<hex>. Manage with `appliance keys`.\n")
        f.writelines(f"{key_id} {digest}\n" for key_id, digest in sorted(keys.items()))
    os.replace(tmp, path)


class KeyStore:
    """Authenticates presented keys; returns the key id to log, never the key."""

    RECHECK_SECONDS = 2.0

    def __init__(self, env_keys: list[str], keys_file: Path | None) -> None:
        self._env = {f"env-{i + 1}": hash_key(k) for i, k in enumerate(env_keys)}
        self._file = keys_file
        self._file_keys: dict[str, str] = {}
        self._mtime: float | None = None
        self._checked = 0.0
        self._reload()

    @property
    def configured(self) -> bool:
        return bool(self._env or self._file_keys)

    def _reload(self) -> None:
        if self._file is None:
            return
        try:
            mtime = self._file.stat().st_mtime
        except FileNotFoundError:
            self._file_keys, self._mtime = {}, None
            return
        if mtime != self._mtime:
            self._file_keys, self._mtime = read_keys_file(self._file), mtime

    def authenticate(self, presented: str) -> str | None:
        now = time.monotonic()
        if now - self._checked > self.RECHECK_SECONDS:
            self._checked = now
            # On a bad file keep the last good keys; `appliance keys` validates what it writes.
            with contextlib.suppress(OSError, ValueError):
                self._reload()
        digest = hash_key(presented)
        found = None
        # Compare against every key so the time taken does not depend on which one matched.
        for key_id, known in (*self._env.items(), *self._file_keys.items()):
            if hmac.compare_digest(digest, known):
                found = key_id
        return found
