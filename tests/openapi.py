"""Validation of real responses against the OpenAI API spec in tests/reference."""

from __future__ import annotations

import json
from functools import cache
from typing import Any

from jsonschema import Draft202012Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from tests.harness import REFERENCE

SPEC_URI = "urn:openai-openapi"


@cache
def _registry() -> tuple[dict[str, Any], Registry]:
    spec = json.loads((REFERENCE / "openai-openapi-subset.json").read_text())
    resource = Resource.from_contents(spec, default_specification=DRAFT202012)
    return spec, Registry().with_resource(SPEC_URI, resource)


def validate(schema_name: str, instance: Any) -> None:
    """Raise jsonschema.ValidationError unless `instance` conforms to components/schemas/<schema_name>."""
    spec, registry = _registry()
    if schema_name not in spec["components"]["schemas"]:
        raise KeyError(schema_name)
    schema = {"$ref": f"{SPEC_URI}#/components/schemas/{schema_name}"}
    Draft202012Validator(schema, registry=registry).validate(instance)
