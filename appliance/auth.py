"""Client keys: Bearer tokens checked against SHA-256 hashes in constant time.

Keys come from `APPLIANCE_API_KEYS` (simple setups) and from the keys file, which holds only
`<key id> sha256:<hex>` lines, so a stolen file reveals no usable key. The file is re-read when it
changes, so keys can be rotated without a restart.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path

KEY_PREFIX = "sk-appliance-"


def hash_key(key: str) -> str:
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


# Key names go into the keys file, logs and metrics as they are: one token that cannot start a comment.
KEY_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")
HASH = re.compile(r"sha256:[0-9a-f]{64}")
KEY_NAME_RULE = "letters, digits, '-', '_' and '.', 1 to 64 characters"


def check_key_name(name: str) -> str:
    """The name if it can name a key; ValueError (its message says the rule) if not."""
    if not KEY_NAME.fullmatch(name):
        raise ValueError(f"invalid key name {name!r}: use {KEY_NAME_RULE}")
    return name


@dataclass
class KeysFile:
    """What a keys file holds: its valid keys, and one message per line that could not be used."""

    keys: dict[str, str] = field(default_factory=dict)  # key id -> hash
    problems: list[str] = field(default_factory=list)


def parse_keys_file(path: Path) -> KeysFile:
    """Every valid line of a keys file. Blank lines and `#` comments are skipped; a bad line is named
    in `problems` and skipped, so one mistake never takes the other keys with it."""
    parsed = KeysFile()
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return parsed
    except (OSError, UnicodeDecodeError) as exc:
        parsed.problems.append(f"{path}: cannot read: {exc.strerror or type(exc).__name__}")
        return parsed
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) != 2 or not HASH.fullmatch(parts[1]) or not KEY_NAME.fullmatch(parts[0]):
            parsed.problems.append(f"{path}:{number}: expected '<key name> sha256:<64 hex digits>'")
        elif parts[0] in parsed.keys:
            parsed.problems.append(f"{path}:{number}: key '{parts[0]}' appears twice")
        else:
            parsed.keys[parts[0]] = parts[1]
    return parsed


def write_keys_file(path: Path, keys: dict[str, str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write("# appliance client keys: <key id> sha256:<hex>. Manage with `appliance keys`.\n")
        f.writelines(f"{key_id} {digest}\n" for key_id, digest in sorted(keys.items()))
    os.replace(tmp, path)


class KeyStore:
    """Authenticates presented keys; returns the key id to log, never the key.

    At start, a keys file with bad lines still serves its valid keys (each bad line is logged). Once
    running, a file that changes into one with bad lines is not taken: the last good set stays in force
    (a half-edited file must not lock out the apps whose lines follow the mistake)."""

    RECHECK_SECONDS = 2.0

    def __init__(self, env_keys: list[str], keys_file: Path | None) -> None:
        self._env = {f"env-{i + 1}": hash_key(k) for i, k in enumerate(env_keys)}
        self._file = keys_file
        self._file_keys: dict[str, str] = {}
        self._mtime: float | None = None
        self._checked = 0.0
        self.problems: list[str] = []  # of the file as last read
        self._reload(starting=True)

    @property
    def configured(self) -> bool:
        return bool(self._env or self._file_keys)

    def _reload(self, starting: bool = False) -> None:
        if self._file is None:
            return
        try:
            mtime: float | None = self._file.stat().st_mtime
        except FileNotFoundError:
            mtime = None
        except OSError:
            mtime = -1.0  # unreadable: parse_keys_file says why
        if mtime == self._mtime and not starting:
            return
        self._mtime = mtime
        parsed = parse_keys_file(self._file)
        self.problems = parsed.problems
        from appliance.log import event  # here: `appliance keys` must run in the core install, without orjson

        for problem in parsed.problems:
            kept = "its valid keys" if starting else "the keys it held before"
            event("keys file problem", logging.WARNING, problem=problem, using=kept)
        if starting or not parsed.problems:
            self._file_keys = parsed.keys

    def authenticate(self, presented: str) -> str | None:
        now = time.monotonic()
        if now - self._checked > self.RECHECK_SECONDS:
            self._checked = now
            self._reload()
        digest = hash_key(presented)
        found = None
        # Compare against every key so the time taken does not depend on which one matched.
        for key_id, known in (*self._env.items(), *self._file_keys.items()):
            if hmac.compare_digest(digest, known):
                found = key_id
        return found


class AdminKeys:
    """The admin key(s): opens what monitoring needs no key for only in part (/readyz's detail).

    Holds only SHA-256 hashes, taken when the settings load; `APPLIANCE_ADMIN_KEY` supplies one today. A
    key store can supply its hashes through `replace` without changing the callers.
    """

    def __init__(self, hashes: list[str]) -> None:
        self._hashes = list(hashes)

    @classmethod
    def from_keys(cls, keys: list[str]) -> AdminKeys:
        return cls([hash_key(k) for k in keys])

    @property
    def configured(self) -> bool:
        return bool(self._hashes)

    def replace(self, hashes: list[str]) -> None:
        self._hashes = list(hashes)

    def verify(self, presented: str) -> bool:
        digest = hash_key(presented)
        matched = False
        for known in self._hashes:  # every hash, so the time taken does not say which one matched
            matched |= hmac.compare_digest(digest, known)
        return matched
