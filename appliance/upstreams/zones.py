"""Data zones: where a request's text may go. Ordered from nearest to farthest: the school's own box, the
district's data centre (still inside the district's data boundary), NVIDIA's cloud."""

from __future__ import annotations

from typing import Literal

Zone = Literal["box", "district", "cloud"]
ZONES: tuple[Zone, ...] = ("box", "district", "cloud")
_RANK = {zone: rank for rank, zone in enumerate(ZONES)}


def within(zone: Zone, ceiling: Zone) -> bool:
    """Whether `zone` is no farther than `ceiling`."""
    return _RANK[zone] <= _RANK[ceiling]


def nearest(*zones: Zone | None) -> Zone:
    """The strictest of several ceilings (unset ones ignored); `cloud` when none is set."""
    given = [z for z in zones if z is not None]
    return min(given, key=_RANK.__getitem__) if given else "cloud"


def ceiling_of_policy(policy: str) -> Zone:
    """Today's `cloud_fallback` values as a ceiling: `never` keeps requests on the box; `on_failure`
    and `on_overload` allow every zone."""
    return "box" if policy == "never" else "cloud"
