"""The governance database: client keys, the admin key and the usage ledger, in one SQLite file under
`APPLIANCE_DATA_DIR` (WAL mode, so readers never wait for the ledger's writer; mode 0600).

The schema is versioned with `PRAGMA user_version`; `MIGRATIONS[n]` takes it from version n to n+1.
Only hashes of keys are stored, and the ledger holds counts, never request content.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any

from appliance.auth import KeysFile, parse_keys_file
from appliance.governance.keys import KeyRecord

DB_NAME = "appliance.db"
BUSY_TIMEOUT_MS = 1000  # a locked database is retried this long, then the caller keeps its data

# Ledger counters, in column order. Errors by class: a 4xx from the client's input, a 429 from a
# limit or quota, a 5xx. Served on the box or by the cloud, and why the cloud served.
COUNTERS = (
    "requests",
    "errors_client",
    "errors_limited",
    "errors_server",
    "prompt_tokens",
    "completion_tokens",
    "audio_seconds",
    "characters",
    "served_box",
    "served_cloud",
    "cloud_on_failure",
    "cloud_on_overload",
)

MIGRATIONS = [
    """
    CREATE TABLE meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
    CREATE TABLE keys (
        id INTEGER PRIMARY KEY,
        name TEXT NOT NULL,
        digest TEXT NOT NULL UNIQUE,
        tier TEXT,
        school TEXT,
        grp TEXT,
        app TEXT,
        models TEXT,
        max_zone TEXT NOT NULL DEFAULT 'cloud',
        created_at REAL NOT NULL,
        last_used_at REAL,
        expires_on TEXT,
        revoked_at REAL
    );
    CREATE UNIQUE INDEX keys_active_name ON keys (name) WHERE revoked_at IS NULL;
    CREATE TABLE usage (
        key_id INTEGER NOT NULL,
        model TEXT NOT NULL,
        day TEXT NOT NULL,
        hour INTEGER NOT NULL,
        requests INTEGER NOT NULL DEFAULT 0,
        errors_client INTEGER NOT NULL DEFAULT 0,
        errors_limited INTEGER NOT NULL DEFAULT 0,
        errors_server INTEGER NOT NULL DEFAULT 0,
        prompt_tokens INTEGER NOT NULL DEFAULT 0,
        completion_tokens INTEGER NOT NULL DEFAULT 0,
        audio_seconds REAL NOT NULL DEFAULT 0,
        characters INTEGER NOT NULL DEFAULT 0,
        served_box INTEGER NOT NULL DEFAULT 0,
        served_cloud INTEGER NOT NULL DEFAULT 0,
        cloud_on_failure INTEGER NOT NULL DEFAULT 0,
        cloud_on_overload INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (key_id, model, day, hour)
    );
    CREATE INDEX usage_day ON usage (day);
    """,
    # The admin actions' audit list: who changed which key, how, when. Never a secret.
    """
    CREATE TABLE audit (
        id INTEGER PRIMARY KEY,
        at REAL NOT NULL,
        actor TEXT NOT NULL,
        action TEXT NOT NULL,
        target TEXT NOT NULL,
        detail TEXT NOT NULL DEFAULT ''
    );
    """,
]

KEY_COLUMNS = (
    "id, name, digest, tier, school, grp, app, models, max_zone, "
    "created_at, last_used_at, expires_on, revoked_at"
)
# Keys from APPLIANCE_API_KEYS have no row; the ledger counts them under negative ids (env-1 is -1).
KEY_NAME_SQL = "COALESCE(k.name, 'env-' || (-u.key_id))"
REPORT_GROUPS = {
    None: ("key", "model", "day"),
    "day": ("day",),
    "key": ("key",),
    "model": ("model",),
    "school": ("school",),
    "group": ("group",),
    "app": ("app",),
}
GROUP_SQL = {
    "key": KEY_NAME_SQL,
    "model": "u.model",
    "day": "u.day",
    "school": "k.school",
    "group": "k.grp",
    "app": "k.app",
}

UsageKey = tuple[int, str, str, int]  # key id, public model, day, hour


class StoreError(Exception):
    """The database cannot be used; the message is one line naming the file and what to do."""


@dataclass(frozen=True)
class UsageFilter:
    since: str | None = None  # ISO dates, inclusive
    until: str | None = None
    key: str | None = None
    school: str | None = None
    group: str | None = None
    by: str | None = None  # None (key, model, day), or one of "day", "key", "model", "school", "group", "app"

    def __post_init__(self) -> None:
        for name in ("since", "until"):
            value = getattr(self, name)
            if value is not None:
                try:
                    date.fromisoformat(value)
                except ValueError:
                    raise ValueError(f"invalid {name} date {value!r}: give YYYY-MM-DD") from None
        if self.by not in REPORT_GROUPS:
            choices = ", ".join(g for g in REPORT_GROUPS if g)
            raise ValueError(f"invalid grouping {self.by!r}: one of {choices}")


def database_path(data_dir: Path) -> Path:
    return data_dir / DB_NAME


def open_store(data_dir: Path, keys_file: Path) -> Store:
    """The database, created on first use with the older keys file's valid lines imported
    (`Store.imported` counts them; `Store.import_problems` names each line that could not be used,
    as the keys file's readers always have: one bad line never takes the other keys with it).
    A keys file that cannot be read at all stops the creation, so no key is silently left behind.
    Raises StoreError."""
    path = database_path(data_dir)
    legacy = KeysFile()
    if not path.exists():
        legacy = parse_keys_file(keys_file)
        unreadable = f"{keys_file}: cannot read"
        if legacy.problems and legacy.problems[0].startswith(unreadable):
            raise StoreError(legacy.problems[0])
    store = Store(path)
    if store.created:
        store.import_problems = legacy.problems
        if legacy.keys:
            store.imported = store.import_keys(legacy.keys)
    return store


class Store:
    """One connection, shared by threads under a lock: the gateway calls it from worker threads so that
    a slow or locked disk never blocks the event loop."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.created = False
        self.imported = 0  # keys taken over from the older keys file when this database was created
        self.import_problems: list[str] = []  # its lines that could not be imported
        self._lock = threading.Lock()
        try:
            self._db = self._connect()
            self._migrate()
        except sqlite3.DatabaseError as exc:
            raise StoreError(
                f"{path} is not a usable database ({exc}); move it aside and restore a backup, or move it "
                "aside to start an empty one (keys must then be added again)"
            ) from None

    def _connect(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not self.path.exists():
            # Created 0600 before SQLite opens it; SQLite gives its -wal and -shm files the same mode.
            os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
            self.created = True
        db = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_MS / 1000, check_same_thread=False)
        db.isolation_level = None  # explicit transactions only
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")  # WAL: durable at checkpoints, never corrupt
        return db

    def _migrate(self) -> None:
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        if version > len(MIGRATIONS):
            raise StoreError(f"{self.path} has schema version {version}, newer than this appliance knows")
        for number in range(version, len(MIGRATIONS)):
            with self.transaction() as db:
                db.executescript(f"BEGIN; {MIGRATIONS[number]}; PRAGMA user_version={number + 1}; COMMIT;")

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            yield self._db

    def _write(self, sql: str, params: Iterable[Any] = ()) -> sqlite3.Cursor:
        with self._lock:
            return self._db.execute(sql, tuple(params))

    def _read(self, sql: str, params: Iterable[Any] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            return self._db.execute(sql, tuple(params)).fetchall()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def data_version(self) -> int:
        """Changes whenever another connection commits: the cheap way to notice `appliance keys`."""
        return self._read("PRAGMA data_version")[0][0]

    # Keys.

    def keys(self, include_revoked: bool = False) -> list[KeyRecord]:
        where = "" if include_revoked else " WHERE revoked_at IS NULL"
        return [
            _record(row) for row in self._read(f"SELECT {KEY_COLUMNS} FROM keys{where} ORDER BY name, id")
        ]

    def key(self, name: str) -> KeyRecord | None:
        rows = self._read(f"SELECT {KEY_COLUMNS} FROM keys WHERE name = ? AND revoked_at IS NULL", (name,))
        return _record(rows[0]) if rows else None

    def add_key(self, name: str, digest: str, **fields: Any) -> KeyRecord:
        values = {"name": name, "digest": digest, "created_at": time.time(), **_columns(fields)}
        names = ", ".join(values)
        self._write(f"INSERT INTO keys ({names}) VALUES ({', '.join('?' * len(values))})", values.values())
        record = self.key(name)
        assert record is not None
        return record

    def update_key(self, name: str, **fields: Any) -> KeyRecord | None:
        values = _columns(fields)
        if values:
            assignments = ", ".join(f"{column} = ?" for column in values)
            self._write(
                f"UPDATE keys SET {assignments} WHERE name = ? AND revoked_at IS NULL",
                (*values.values(), name),
            )
        return self.key(name)

    def revoke(self, name: str) -> bool:
        cursor = self._write(
            "UPDATE keys SET revoked_at = ? WHERE name = ? AND revoked_at IS NULL", (time.time(), name)
        )
        return cursor.rowcount > 0

    def import_keys(self, keys: dict[str, str]) -> int:
        """Keys from the old keys file (name -> digest), added once, with no tier or labels."""
        now = time.time()
        with self.transaction() as db:
            cursor = db.executemany(
                "INSERT OR IGNORE INTO keys (name, digest, created_at) VALUES (?, ?, ?)",
                [(name, digest, now) for name, digest in keys.items()],
            )
            return cursor.rowcount

    def admin_digest(self) -> str | None:
        rows = self._read("SELECT value FROM meta WHERE name = 'admin_key'")
        return rows[0][0] if rows else None

    def set_admin_digest(self, digest: str) -> None:
        self._write("INSERT OR REPLACE INTO meta (name, value) VALUES ('admin_key', ?)", (digest,))

    # The usage ledger.

    def write_usage(self, rows: dict[UsageKey, list[float]], last_used: dict[int, float]) -> None:
        """Add a batch of counts in one transaction: all of it is written, or none of it."""
        columns = ", ".join(COUNTERS)
        updates = ", ".join(f"{c} = {c} + excluded.{c}" for c in COUNTERS)
        sql = (
            f"INSERT INTO usage (key_id, model, day, hour, {columns}) "
            f"VALUES (?, ?, ?, ?, {', '.join('?' * len(COUNTERS))}) "
            f"ON CONFLICT (key_id, model, day, hour) DO UPDATE SET {updates}"
        )
        with self._lock:
            db = self._db
            db.execute("BEGIN IMMEDIATE")
            try:
                db.executemany(sql, [(*key, *counts) for key, counts in rows.items()])
                db.executemany(
                    "UPDATE keys SET last_used_at = MAX(COALESCE(last_used_at, 0), ?) WHERE id = ?",
                    [(at, key_id) for key_id, at in last_used.items() if key_id > 0],
                )
                db.execute("COMMIT")
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    db.execute("ROLLBACK")
                raise

    def usage_since(self, day: str) -> dict[int, tuple[int, float, int]]:
        """Key id -> (tokens, audio seconds, characters) from `day` on: what quotas start from."""
        rows = self._read(
            "SELECT key_id, SUM(prompt_tokens + completion_tokens), SUM(audio_seconds), SUM(characters) "
            "FROM usage WHERE day >= ? GROUP BY key_id",
            (day,),
        )
        return {key_id: (int(tokens), float(audio), int(chars)) for key_id, tokens, audio, chars in rows}

    def usage_report(self, where: UsageFilter) -> list[dict[str, Any]]:
        groups = REPORT_GROUPS[where.by]
        conditions, params = [], []
        for column, value in (
            ("u.day >= ?", where.since),
            ("u.day <= ?", where.until),
            (f"{KEY_NAME_SQL} = ?", where.key),
            ("k.school = ?", where.school),
            ("k.grp = ?", where.group),
        ):
            if value is not None:
                conditions.append(column)
                params.append(value)
        names = ", ".join(f'"{g}"' for g in groups)  # quoted: `group` is an SQL keyword
        select = ", ".join(f'{GROUP_SQL[g]} AS "{g}"' for g in groups)
        sums = ", ".join(f"SUM(u.{c})" for c in COUNTERS)
        sql = f"SELECT {select}, {sums} FROM usage u LEFT JOIN keys k ON k.id = u.key_id"
        if conditions:
            sql += " WHERE " + " AND ".join(conditions)
        sql += f" GROUP BY {names} ORDER BY {names}"
        report = []
        for row in self._read(sql, params):
            entry: dict[str, Any] = {"key": None, "model": None, "day": None}
            entry.update(zip(groups, row[: len(groups)], strict=True))
            for name, value in zip(COUNTERS, row[len(groups) :], strict=True):
                entry[name] = round(value, 3) if name == "audio_seconds" else int(value)
            report.append(entry)
        return report

    def audit_action(self, actor: str, action: str, target: str, detail: str = "") -> None:
        """Record one admin action (who, what, on which key); callers pass no secret."""
        self._write(
            "INSERT INTO audit (at, actor, action, target, detail) VALUES (?, ?, ?, ?, ?)",
            (time.time(), actor, action, target, detail),
        )

    def audit(self, limit: int = 100) -> list[dict[str, Any]]:
        """The latest admin actions, newest first."""
        rows = self._read(
            "SELECT at, actor, action, target, detail FROM audit ORDER BY id DESC LIMIT ?", (limit,)
        )
        return [dict(zip(("at", "actor", "action", "target", "detail"), row, strict=True)) for row in rows]

    def prune(self, before_day: str) -> int:
        """Delete ledger rows older than `before_day`; the retention period's enforcement."""
        return self._write("DELETE FROM usage WHERE day < ?", (before_day,)).rowcount


def _columns(fields: dict[str, Any]) -> dict[str, Any]:
    """Record field names -> column values."""
    rename = {"group": "grp", "expires": "expires_on"}
    values = {}
    for name, value in fields.items():
        if name == "models":
            value = None if value is None else json.dumps(list(value))
        values[rename.get(name, name)] = value
    return values


def _record(row: tuple[Any, ...]) -> KeyRecord:
    key_id, name, digest, tier, school, grp, app, models, zone, created, used, expires, revoked = row
    return KeyRecord(
        id=key_id,
        name=name,
        digest=digest,
        tier=tier,
        school=school,
        group=grp,
        app=app,
        models=tuple(json.loads(models)) if models is not None else None,
        max_zone=zone,
        created=created,
        last_used=used,
        expires=expires,
        revoked=revoked,
    )
