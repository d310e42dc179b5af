"""Key secrets: made here, shown once, stored only as SHA-256 hashes (a stolen database or keys file
reveals no usable key); key names; the admin keys. The client keys' records live in
`appliance.governance`.

The keys file (`<key name> sha256:<hex>` lines) is the older store: its valid lines are imported into
the governance database when that is created, and each bad line is named.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass, field
from pathlib import Path

KEY_PREFIX = "sk-appliance-"


def hash_key(key: str) -> str:
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


def new_key(kind: str = "") -> str:
    """A new secret; `kind` ("admin-") marks what it is for, so a leaked one is recognised."""
    return KEY_PREFIX + kind + secrets.token_urlsafe(32)


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


class AdminKeys:
    """The admin key(s): opens what monitoring needs no key for only in part (/readyz's detail).

    Holds only SHA-256 hashes: `APPLIANCE_ADMIN_KEY`'s, taken when the settings load, and the one
    `appliance admin-key` stores, supplied by governance through `replace` whenever it reloads keys.
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
