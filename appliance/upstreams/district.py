"""The headers a district's schedulers use, sent only toward upstreams in the `district` zone.

- `x-gateway-inference-fairness-id`: whose requests these are, so llm-d's flow control shares the
  engines fairly between schools (the client key's school; the key's id until keys carry a school).
- `x-gateway-inference-objective`: `interactive` or `batch` (the catalog's route, or `objective:` per
  model in the YAML file), so quick tier-1 corrections can go ahead of long tier-2 analyses.
  It names an InferenceObjective of the district's pool (models/district/llm-d/).
Each is sent under llm-d's current name too (`x-llm-d-inference-...`; its scheduler reads that first
and the `x-gateway-` name as an alias), so older and newer llm-d releases both see it.
- a session header (vLLM Router: `X-Session-ID`) so a conversation stays on one engine and reuses its
  prefix cache. It carries a keyed hash of the app's session id, never the id itself.

Nothing else about the pupil leaves: no names, no key, no address.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from typing import TYPE_CHECKING

from appliance.catalog import Route

if TYPE_CHECKING:
    from appliance.config import Settings

FAIRNESS_HEADERS = (b"x-gateway-inference-fairness-id", b"x-llm-d-inference-fairness-id")
OBJECTIVE_HEADERS = (b"x-gateway-inference-objective", b"x-llm-d-inference-objective")
# Per process: the district sees stable session hashes while this gateway runs, and nothing it could
# match against another system's ids.
_SESSION_KEY = secrets.token_bytes(16)
_UNSAFE = re.compile(r"[^A-Za-z0-9._:@/+=-]")


def session_token(session: str) -> str:
    return hashlib.blake2b(session.encode(), key=_SESSION_KEY, digest_size=12).hexdigest()


def header_value(value: str) -> bytes:
    """A value safe in a header line whatever the client sent: no spaces, no line breaks."""
    return _UNSAFE.sub("_", value)[:128].encode()


class DistrictHeaders:
    """Built for every request (cheap: references only); the lines are made only when a request goes
    to the district."""

    __slots__ = ("fairness_id", "route", "session", "settings")

    def __init__(
        self, settings: Settings, route: Route, fairness_id: str | None, session: str | None
    ) -> None:
        self.settings = settings
        self.route = route
        self.fairness_id = fairness_id
        self.session = session

    def objective(self) -> str:
        override = self.settings.models.get(self.route.name)
        return (override.objective if override else None) or self.route.objective

    def lines(self) -> bytes:
        objective = self.objective().encode()
        out = b"".join(b"%s: %s\r\n" % (name, objective) for name in OBJECTIVE_HEADERS)
        if self.fairness_id:
            fairness = header_value(self.fairness_id)
            out += b"".join(b"%s: %s\r\n" % (name, fairness) for name in FAIRNESS_HEADERS)
        if self.session:
            name = self.settings.district_session_header.encode()
            out += b"%s: %s\r\n" % (name, session_token(self.session).encode())
        return out
