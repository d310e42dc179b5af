"""Admin sessions, kept on the server: a random session id in an HttpOnly, SameSite=Strict cookie, its
CSRF token, and its expiry. Signing out deletes the session here, so the old cookie no longer works.

Only a hash of the session id is kept (a memory dump reveals no usable cookie). Sessions live in the
gateway's memory: a restart signs everyone out, which is the safe way round.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass

from appliance.governance.limits import TokenBucket

COOKIE = "appliance_session"
SIGN_IN_COOKIE = "appliance_sign_in"  # the sign-in form's CSRF token, before there is a session
MAX_SESSIONS = 64  # the oldest is dropped beyond this: memory stays bounded whatever is signed in
MAX_THROTTLED_CLIENTS = 1024
FAILURES_PER_MINUTE = 5  # failed sign-ins a client address may make (a burst of 5, then one per 12 s)


def _digest(session_id: str) -> str:
    return hashlib.sha256(session_id.encode()).hexdigest()


@dataclass
class Session:
    csrf: str
    expires: float  # time.monotonic()
    client: str  # the address it was signed in from, for the audit list


class Sessions:
    def __init__(self, lifetime_seconds: float) -> None:
        self.lifetime = lifetime_seconds
        self._sessions: OrderedDict[str, Session] = OrderedDict()

    def create(self, client: str) -> tuple[str, Session]:
        """A new session: its id (for the cookie, never stored) and its record."""
        session_id = secrets.token_urlsafe(32)
        session = Session(secrets.token_urlsafe(32), time.monotonic() + self.lifetime, client)
        self._sessions[_digest(session_id)] = session
        while len(self._sessions) > MAX_SESSIONS:
            self._sessions.popitem(last=False)
        return session_id, session

    def get(self, session_id: str | None) -> Session | None:
        """The live session for a cookie value; an expired one is ended on sight."""
        if not session_id:
            return None
        digest = _digest(session_id)
        session = self._sessions.get(digest)
        if session is None:
            return None
        if time.monotonic() >= session.expires:
            del self._sessions[digest]
            return None
        return session

    def end(self, session_id: str | None) -> None:
        if session_id:
            self._sessions.pop(_digest(session_id), None)


def tokens_match(given: str | None, expected: str) -> bool:
    """A constant-time comparison of a CSRF token."""
    return given is not None and secrets.compare_digest(given.encode(), expected.encode())


class SignInThrottle:
    """Failed sign-ins per client address: a token bucket each, the least recently seen dropped
    beyond a cap, so an attacker's cost to the gateway stays constant."""

    def __init__(self, per_minute: int = FAILURES_PER_MINUTE) -> None:
        self.per_minute = per_minute
        self._clients: OrderedDict[str, TokenBucket] = OrderedDict()

    def wait(self, client: str) -> float:
        """Seconds this client must wait before it may try again; 0 when it may try now."""
        bucket = self._clients.get(client)
        return 0.0 if bucket is None else bucket.wait(1, time.monotonic())

    def failed(self, client: str) -> None:
        bucket = self._clients.pop(client, None) or TokenBucket(self.per_minute)
        bucket.refilled(time.monotonic())
        bucket.take(1)
        self._clients[client] = bucket
        while len(self._clients) > MAX_THROTTLED_CLIENTS:
            self._clients.popitem(last=False)
