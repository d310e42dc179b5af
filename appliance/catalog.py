"""The model catalog (`models/catalog.toml`): public names, their local engines and cloud ids.

Read with the standard library only, so that the planner and Ansible's GPU check can use it on hosts
that have nothing else installed yet.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

_PACKAGED = Path(__file__).with_name("catalog.toml")  # inside a built wheel
_SOURCE = Path(__file__).resolve().parents[1] / "models" / "catalog.toml"  # in a checkout


@dataclass(frozen=True)
class Route:
    """A public model name and where it can be served, best first."""

    name: str
    kind: str  # "llm", "stt" or "tts"
    aliases: tuple[str, ...] = ()
    local: tuple[str, ...] = ()  # catalog model ids, in order of preference
    cloud: str | None = None  # NVIDIA cloud model id, if the cloud serves it
    cpu: str | None = None  # catalog model id that serves it on a machine without a GPU, if any
    cloud_context: int | None = None  # the cloud model's context length in tokens, where known
    # Request fields a local engine gets when the client did not set them (e.g. reasoning off for a
    # quick-answer tier served by a reasoning model).
    local_defaults: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)
    # (upstream, model id) pairs from the configuration's `routes:`; when given, they replace
    # `local` and `cloud` (appliance.upstreams.chain).
    targets: tuple[tuple[str, str], ...] = ()
    # What a district's scheduler is told about its requests: "interactive" or "batch".
    objective: str = "interactive"


@dataclass(frozen=True)
class CatalogModel:
    """One deployable model artifact: what a local engine loads."""

    id: str
    kind: str
    engine: str  # "vllm", "faster-whisper" or "nim"
    params: dict[str, Any] = field(default_factory=dict)  # sizes, engine arguments, sources


@dataclass
class Catalog:
    routes: tuple[Route, ...]
    models: dict[str, CatalogModel]
    gateway: dict[str, Any] = field(default_factory=dict)  # the gateway's own image and driver floor
    by_name: dict[str, Route] = field(init=False)  # public names and aliases

    def __post_init__(self) -> None:
        self.by_name = {name: r for r in self.routes for name in (r.name, *r.aliases)}

    def route(self, name: str) -> Route | None:
        return self.by_name.get(name)

    def routes_of_kind(self, kind: str) -> list[Route]:
        return [r for r in self.routes if r.kind == kind]

    def rename(self, old: str, new: str) -> None:
        """Serve route `old` under the public name `new` instead; its aliases stay (a gateway that
        loads another model than the catalog's names it for what it loaded)."""
        self.routes = tuple(
            replace(r, name=new, aliases=tuple(a for a in r.aliases if a != new)) if r.name == old else r
            for r in self.routes
        )
        self.__post_init__()


def catalog_path() -> Path:
    return _PACKAGED if _PACKAGED.is_file() else _SOURCE


def parse_catalog(data: dict[str, Any]) -> Catalog:
    routes = tuple(
        Route(
            name=r["name"],
            kind=r["kind"],
            aliases=tuple(r.get("aliases", ())),
            local=tuple(r.get("local", ())),
            cloud=r.get("cloud"),
            cpu=r.get("cpu"),
            cloud_context=r.get("cloud_context"),
            local_defaults=r.get("local_defaults", {}),
            objective=r.get("objective", "interactive"),
        )
        for r in data.get("route", [])
    )
    models = {}
    for m in data.get("model", []):
        params = {k: v for k, v in m.items() if k not in ("id", "kind", "engine")}
        models[m["id"]] = CatalogModel(id=m["id"], kind=m["kind"], engine=m["engine"], params=params)
    return Catalog(routes=routes, models=models, gateway=data.get("gateway", {}))


def load_catalog(path: Path | None = None) -> Catalog:
    with open(path or catalog_path(), "rb") as f:
        return parse_catalog(tomllib.load(f))


# Typed views of the model parameters the VRAM planner reads (standard library only, like the rest).


@dataclass(frozen=True)
class RunProfile:
    """One way to run a speech engine and the GPU memory it takes."""

    vram_mib: int
    compute_type: str | None = None
    batch_size: int | None = None


def model_profiles(model: CatalogModel) -> tuple[RunProfile, ...]:
    """A speech model's run profiles, best (largest) first."""
    return tuple(
        RunProfile(vram_mib=p["vram_mib"], compute_type=p.get("compute_type"), batch_size=p.get("batch_size"))
        for p in model.params.get("profile", ())
    )


def model_engine_args(model: CatalogModel) -> tuple[str, ...]:
    return tuple(model.params.get("engine_args", ()))


def model_min_driver(model: CatalogModel) -> str | None:
    return model.params.get("min_driver")


def gateway_min_driver(catalog: Catalog) -> str | None:
    """The driver the gateway's own image needs: a floor for every plan, LLM or not."""
    return catalog.gateway.get("min_driver")
