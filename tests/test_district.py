"""The district's llm-d files (models/district/llm-d/) against the schemas of the projects that define
them (tests/reference/llm-d/, copied with their source and licence), and against the catalog: no
cluster is needed to know that a file would be refused or would serve the wrong model."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml
from jsonschema import Draft7Validator

from appliance.catalog import load_catalog, model_engine_args
from tests.harness import REPO

DISTRICT = REPO / "models" / "district" / "llm-d"
SCHEMAS = REPO / "tests" / "reference" / "llm-d"
VALUES = sorted(DISTRICT.glob("values-*.yaml"))
CRDS = {
    ("inference.networking.k8s.io/v1", "InferencePool"): "inference.networking.k8s.io_inferencepools.yaml",
    ("llm-d.ai/v1alpha2", "InferenceObjective"): "llm-d.ai_inferenceobjectives.yaml",
}


def strict(schema: Any) -> Any:
    """A CRD's schema as `kubectl apply --validate=strict` applies it: fields it does not declare are
    errors, not silently pruned (objects with `additionalProperties` or without `properties` stay open)."""
    if isinstance(schema, dict):
        out = {k: strict(v) for k, v in schema.items()}
        if "properties" in schema and "additionalProperties" not in schema:
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [strict(v) for v in schema]
    return schema


@cache
def crd_validator(api_version: str, kind: str) -> Draft7Validator:
    crd = yaml.safe_load((SCHEMAS / CRDS[(api_version, kind)]).read_text())
    version = api_version.rpartition("/")[2]
    (served,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
    return Draft7Validator(strict(served["schema"]["openAPIV3Schema"]))


@cache
def values_validator() -> Draft7Validator:
    return Draft7Validator(json.loads((SCHEMAS / "llm-d-modelservice.values.schema.json").read_text()))


def manifests() -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((DISTRICT / "pools.yaml").read_text()) if d]


def errors(validator: Draft7Validator, document: Any) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(document)]


def test_the_schemas_are_kept_with_their_source_and_licence():
    source = (SCHEMAS / "SOURCE.md").read_text()
    for name in [*CRDS.values(), "llm-d-modelservice.values.schema.json"]:
        assert (SCHEMAS / name).is_file() and name in source
    assert "Apache License" in (SCHEMAS / "LICENSE-Apache-2.0").read_text()


@pytest.mark.parametrize("path", VALUES, ids=lambda p: p.name)
def test_modelservice_values_fit_the_charts_schema(path: Path):
    assert errors(values_validator(), yaml.safe_load(path.read_text())) == []


def test_the_schema_check_would_catch_a_mistake():
    values = yaml.safe_load(VALUES[0].read_text())
    values["modelArtifacts"]["nmae"] = "typo"
    assert errors(values_validator(), values)
    pool = manifests()[0]
    pool["spec"]["targetPorts"] = [{"number": 70000}]  # not a port
    pool["spec"]["selectr"] = {}
    found = errors(crd_validator(pool["apiVersion"], pool["kind"]), pool)
    assert any("targetPorts" in e for e in found) and any("selectr" in e for e in found)


@pytest.mark.parametrize("index", range(len(manifests())))
def test_pool_manifests_fit_their_crds(index: int):
    document = manifests()[index]
    assert errors(crd_validator(document["apiVersion"], document["kind"]), document) == []


@pytest.mark.parametrize("path", VALUES, ids=lambda p: p.name)
def test_each_district_engine_runs_a_catalog_model_with_the_catalogs_image_and_arguments(path: Path):
    catalog = load_catalog()
    values = yaml.safe_load(path.read_text())
    model = catalog.models[values["modelArtifacts"]["name"]]
    (container,) = values["decode"]["containers"]
    assert container["image"] == model.params["image"]
    args = container["args"]
    engine_args = list(model_engine_args(model))
    assert args[-len(engine_args) :] == engine_args
    assert args[args.index("--max-model-len") + 1] == str(model.params["target_model_len"])
    # The pods carry the label their InferencePool selects.
    pools = {d["metadata"]["name"]: d for d in manifests() if d["kind"] == "InferencePool"}
    label = values["modelArtifacts"]["labels"]["llm-d.ai/model"]
    assert pools[label]["spec"]["selector"]["matchLabels"] == {"llm-d.ai/model": label}
    assert pools[label]["spec"]["targetPorts"] == [{"number": values["routing"]["servicePort"]}]


def test_objectives_exist_for_what_the_appliances_send():
    """Each route's objective (the header the gateway sends) names an InferenceObjective of the pool
    that serves that route's model."""
    catalog = load_catalog()
    objectives = {d["metadata"]["name"]: d for d in manifests() if d["kind"] == "InferenceObjective"}
    served = {
        yaml.safe_load(p.read_text())["modelArtifacts"]["name"]: yaml.safe_load(p.read_text())[
            "modelArtifacts"
        ]["labels"]["llm-d.ai/model"]
        for p in VALUES
    }
    for route in catalog.routes_of_kind("llm"):
        pool = served[route.local[0]]
        assert objectives[route.objective]["spec"]["poolRef"]["name"] == pool
    assert objectives["interactive"]["spec"]["priority"] > objectives["batch"]["spec"]["priority"]
