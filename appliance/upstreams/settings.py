"""The YAML file's `upstreams:` and `routes:` sections, checked strictly: an unknown key, zone or
upstream is a one-line error at start, never a setting quietly ignored."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator

from appliance.upstreams.zones import Zone

ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
Objective = Literal["interactive", "batch"]


def is_http_url(value: str) -> bool:
    parts = urlsplit(value)
    return parts.scheme in ("http", "https") and bool(parts.hostname)


class UpstreamSettings(BaseModel):
    """One upstream: an OpenAI-protocol endpoint (or a pool of them) in one data zone."""

    model_config = ConfigDict(extra="forbid")

    zone: Zone
    urls: list[str] = Field(min_length=1)  # several: a pool, each request to the least busy
    # The key is read from this environment variable at start, never written in the file.
    api_key_env: str | None = None
    ca_file: Path | None = None  # a district's own certificate authority (PEM), for https URLs
    connect_timeout: float | None = Field(default=None, gt=0)
    first_byte_timeout: float | None = Field(default=None, gt=0)
    # What the breaker probes: absolute ("/health", beside /v1) or relative to the base URL ("models").
    health_path: str | None = None

    @field_validator("urls")
    @classmethod
    def _urls(cls, urls: list[str]) -> list[str]:
        for url in urls:
            if not is_http_url(url):
                raise ValueError(f"{url!r} is not an http(s) URL")
        if len(set(urls)) != len(urls):
            raise ValueError("lists a URL twice")
        return [u.rstrip("/") for u in urls]

    @field_validator("api_key_env")
    @classmethod
    def _key_variable(cls, name: str | None) -> str | None:
        if name is None:
            return None
        if not ENV_NAME.match(name):
            raise ValueError("must name an environment variable (letters, digits, underscores)")
        if not os.environ.get(name, "").strip():
            raise ValueError(f"environment variable {name} is not set")
        return name

    @field_validator("ca_file")
    @classmethod
    def _readable(cls, path: Path | None) -> Path | None:
        if path is not None and not os.access(path, os.R_OK):
            raise ValueError(f"cannot read {path}")
        return path

    def api_key(self) -> str | None:
        return os.environ[self.api_key_env].strip() if self.api_key_env else None


class RouteTarget(BaseModel):
    model_config = ConfigDict(extra="forbid")

    upstream: str
    model: str = Field(min_length=1)  # the model id that upstream knows the public name by


class RouteSettings(BaseModel):
    """A public model name added to the catalog's, or replacing one of them."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1)
    kind: Literal["llm"] = "llm"  # speech routes are served in the box only
    aliases: list[str] = Field(default_factory=list)
    targets: list[RouteTarget] = Field(min_length=1)
    # Request fields a target in the box or district gets when the client did not set them.
    local_defaults: dict[str, Any] = Field(default_factory=dict)


def check_references(upstreams: dict[str, UpstreamSettings], routes: list[RouteSettings]) -> None:
    """Raise ValueError naming the first route target whose upstream does not exist, or a name given
    twice. `box` and `cloud` exist even when not declared."""
    known = set(upstreams) | {"box", "cloud"}
    names: set[str] = set()
    for i, route in enumerate(routes):
        for name in (route.name, *route.aliases):
            if name in names:
                raise ValueError(f"routes[{i}]: the name {name!r} is given twice")
            names.add(name)
        for target in route.targets:
            if target.upstream not in known:
                raise ValueError(
                    f"routes[{i}] ({route.name}): unknown upstream {target.upstream!r} "
                    f"(declared: {', '.join(sorted(known))})"
                )
    for name, upstream in upstreams.items():
        if name in ("box", "cloud") and upstream.zone != name:
            raise ValueError(f"upstreams.{name}: the {name!r} upstream must be in zone {name!r}")
