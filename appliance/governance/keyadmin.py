"""Changing client keys, for `appliance keys` and the admin console alike: validated fields, new and
rotated secrets, revocation, and each change in the audit list (who, what, when; never a secret)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from appliance.auth import check_key_name, hash_key, new_key
from appliance.catalog import Catalog, load_catalog
from appliance.governance.keys import (
    KeyInputError,
    KeyRecord,
    parse_expiry,
    validate_label,
    validate_zone,
)
from appliance.governance.store import Store
from appliance.governance.tiers import resolve_tiers

if TYPE_CHECKING:
    from appliance.config import Settings


def key_fields(
    settings: Settings,
    *,
    tier: str | None = None,
    school: str | None = None,
    group: str | None = None,
    app: str | None = None,
    models: Iterable[str] | None = None,
    max_zone: str | None = None,
    expires: str | None = None,
    catalog: Catalog | None = None,
) -> dict[str, Any]:
    """The key fields given, validated; those left None are left out. Raises KeyInputError."""
    fields: dict[str, Any] = {}
    if tier is not None:
        tiers = resolve_tiers(settings.tiers)
        if tier not in tiers:
            raise KeyInputError(f"unknown tier {tier!r}: one of {', '.join(sorted(tiers))}")
        fields["tier"] = tier
    for kind, value in (("school", school), ("group", group), ("app", app)):
        if value is not None:
            fields[kind] = validate_label(kind, value)
    if models is not None:
        fields["models"] = public_models(models, catalog or load_catalog())
    if max_zone is not None:
        fields["max_zone"] = validate_zone(max_zone)
    if expires is not None:
        fields["expires"] = parse_expiry(expires)
    return fields


def public_models(names: Iterable[str], catalog: Catalog) -> list[str]:
    """Each name (or alias) as the catalog's public name; an unknown one is an error."""
    public = []
    for name in names:
        route = catalog.route(name)
        if route is None:
            raise KeyInputError(f"unknown model {name!r}: `GET /v1/models` lists the public names")
        public.append(route.name)
    return sorted(set(public))


def describe(fields: dict[str, Any]) -> str:
    """A change in words for the audit list: field names and values (labels, tier, models; no secret)."""
    parts = []
    for name, value in fields.items():
        if name == "models":
            value = "all" if value is None else " ".join(value)
        parts.append(f"{name}={'-' if value is None else value}")
    return ", ".join(parts)


def create_key(store: Store, name: str, fields: dict[str, Any], actor: str) -> tuple[KeyRecord, str]:
    """A new key and its secret (to be shown once). Raises KeyInputError if the name is bad or taken."""
    try:
        check_key_name(name)
    except ValueError as exc:
        raise KeyInputError(str(exc)) from None
    if store.key(name) is not None:
        raise KeyInputError(f"key '{name}' exists; rotate it to give it a new secret")
    secret = new_key()
    record = store.add_key(name, hash_key(secret), **fields)
    store.audit_action(actor, "create", name, describe(fields))
    return record, secret


def rotate_key(store: Store, name: str, actor: str) -> str | None:
    """A new secret for an active key (same identity and history), or None if there is no such key."""
    if store.key(name) is None:
        return None
    secret = new_key()
    store.update_key(name, digest=hash_key(secret))
    store.audit_action(actor, "rotate", name)
    return secret


def revoke_key(store: Store, name: str, actor: str) -> bool:
    revoked = store.revoke(name)
    if revoked:
        store.audit_action(actor, "revoke", name)
    return revoked


def change_key(store: Store, name: str, fields: dict[str, Any], actor: str) -> KeyRecord | None:
    record = store.update_key(name, **fields)
    if record is not None and fields:
        store.audit_action(actor, "change", name, describe(fields))
    return record
