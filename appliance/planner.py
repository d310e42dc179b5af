"""The VRAM planner: which catalog models run on this GPU, which go to the cloud, and vLLM's arguments.

A pure function of the catalog, the card's memory and the school's policy (standard library only, like the
catalog), so `appliance plan` can answer for any card size before anything is pulled.

How a card is filled:
1. A headroom stays free for the driver and for engines' allocations that grow at run time.
2. The speech engines come first, smallest first, at their smallest run profile: they have no cloud
   stand-in (audio stays on the premises), and they must be started before vLLM.
3. One vLLM model: the one that serves the most LLM routes (then the most preferred) and still has room for
   its weights, its runtime overhead and a useful KV cache (`min_num_seqs` sequences of `min_model_len`).
4. The speech engines move up to their best profile that still leaves vLLM that room.
5. vLLM gets the rest: `--gpu-memory-utilization` is that share of the whole card, rounded down to 1/10000
   (so what vLLM asks for is never more than is free when it starts), and the KV-cache room
   sets `--max-model-len` (the model's target, halved until enough sequences fit) and `--max-num-seqs`.
Every LLM route the chosen model does not serve goes to the cloud where policy allows, else is unavailable.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from appliance.catalog import (
    Catalog,
    CatalogModel,
    Route,
    RunProfile,
    gateway_min_driver,
    model_engine_args,
    model_min_driver,
    model_profiles,
)

MIB_PER_GIB = 1024
SHARE_STEPS = 10_000  # --gpu-memory-utilization is given to 4 decimals
START_ORDER = {"tts": 0, "stt": 1, "llm": 2}  # vLLM last: its memory share must be free when it starts
COMPOSE_PROFILE = {"tts": "tts", "llm": "llm"}  # Whisper runs inside the gateway: no service of its own


@dataclass(frozen=True)
class PlanPolicy:
    """What the school allows and what the appliance needs from a local LLM to be worth running."""

    cloud_fallback: str | Mapping[str, str] = "on_failure"  # one policy, or public name -> policy
    headroom_fraction: float = 0.02
    headroom_min_mib: int = 512
    min_model_len: int = 8192  # capped at the model's own limit
    min_num_seqs: int = 4
    max_num_seqs: int = 64
    compute_capability: str | None = None  # of the card, when known ("8.9")

    def fallback(self, route: Route) -> str:
        if isinstance(self.cloud_fallback, str):
            return self.cloud_fallback
        return self.cloud_fallback.get(route.name, "on_failure")

    def cloud_allowed(self, route: Route) -> bool:
        return route.cloud is not None and self.fallback(route) != "never"


@dataclass
class Service:
    """An engine that runs locally, with what it is given."""

    kind: str
    model: str
    mib: int
    profile: RunProfile | None = None


@dataclass
class VllmPlan:
    model: str
    gpu_memory_utilization: float
    max_model_len: int
    max_num_seqs: int
    args: list[str]
    weights_mib: int
    overhead_mib: int
    kv_mib: int

    def command_args(self) -> list[str]:
        return [
            "--gpu-memory-utilization", str(self.gpu_memory_utilization),
            "--max-model-len", str(self.max_model_len),
            "--max-num-seqs", str(self.max_num_seqs),
            *self.args,
        ]  # fmt: skip


@dataclass
class Plan:
    gpu_memory_mib: int
    headroom_mib: int
    device: str = "gpu"  # "cpu": the plan for a machine without a usable GPU
    routes: list[dict[str, Any]] = field(default_factory=list)  # name, kind, placement, target, reason
    services: list[Service] = field(default_factory=list)  # in start order
    vllm: VllmPlan | None = None
    budget: list[tuple[str, int]] = field(default_factory=list)
    min_driver: str | None = None

    def names(self, placement: str) -> list[str]:
        return [r["name"] for r in self.routes if r["placement"] == placement]

    def service(self, kind: str) -> Service | None:
        return next((s for s in self.services if s.kind == kind), None)

    def to_dict(self) -> dict[str, Any]:
        return {
            "device": self.device,
            "gpu_memory_mib": self.gpu_memory_mib,
            "local": self.names("local"),
            "cloud": self.names("cloud"),
            "unavailable": self.names("unavailable"),
            "routes": self.routes,
            "start_order": [{"kind": s.kind, "model": s.model, "mib": s.mib} for s in self.services],
            "vllm": None
            if self.vllm is None
            else {
                "model": self.vllm.model,
                "gpu_memory_utilization": self.vllm.gpu_memory_utilization,
                "max_model_len": self.vllm.max_model_len,
                "max_num_seqs": self.vllm.max_num_seqs,
                "args": self.vllm.command_args(),
            },
            "stt": None if (s := self.service("stt")) is None else stt_settings(s),
            "budget": [{"item": item, "mib": mib} for item, mib in self.budget],
            "headroom_mib": self.headroom_mib,
            "min_driver": self.min_driver,
        }


def stt_settings(service: Service) -> dict[str, Any]:
    profile = service.profile or RunProfile(vram_mib=service.mib)
    return {"model": service.model, "compute_type": profile.compute_type, "batch_size": profile.batch_size}


def version_key(version: str | None) -> tuple[int, ...]:
    return tuple(int("".join(c for c in part if c.isdigit()) or 0) for part in (version or "0").split("."))


def engines_min_driver(catalog: Catalog) -> str | None:
    """The newest NVIDIA driver any catalog engine, or the gateway's own image, needs."""
    drivers = [d for m in catalog.models.values() if (d := model_min_driver(m))]
    drivers += filter(None, [gateway_min_driver(catalog)])
    return max(drivers, key=version_key, default=None)


def compatible(model: CatalogModel, policy: PlanPolicy) -> str | None:
    """Why the card cannot run this model at all, or None."""
    need = model.params.get("min_compute_capability")
    if policy.compute_capability and need and version_key(policy.compute_capability) < version_key(need):
        return f"needs compute capability {need}, the GPU has {policy.compute_capability}"
    return None


# --- LLM sizing ---------------------------------------------------------------------------------------


def per_seq_mib(model: CatalogModel, model_len: int) -> float:
    p = model.params
    return model_len * p["kv_bytes_per_token"] / 2**20 + p.get("state_mib_per_seq", 0)


def min_len(model: CatalogModel, policy: PlanPolicy) -> int:
    return min(policy.min_model_len, model.params["max_context"])


def llm_min_need(model: CatalogModel, policy: PlanPolicy) -> int:
    """Weights + runtime overhead + KV for the fewest useful sequences at the shortest useful length."""
    p = model.params
    kv = policy.min_num_seqs * per_seq_mib(model, min_len(model, policy))
    return p["weights_mib"] + p["runtime_overhead_mib"] + math.ceil(kv)


def size_kv(model: CatalogModel, kv_mib: int, policy: PlanPolicy) -> tuple[int, int]:
    """(max_model_len, max_num_seqs) for this much KV-cache room: the longest length with enough sequences."""
    p = model.params
    length = min(p.get("target_model_len", p["max_context"]), p["max_context"])
    shortest = min_len(model, policy)
    while length > shortest and kv_mib < policy.min_num_seqs * per_seq_mib(model, length):
        length = max(shortest, length // 2)
    seqs = min(policy.max_num_seqs, int(kv_mib // per_seq_mib(model, length)))
    return length, seqs


# --- the plan -----------------------------------------------------------------------------------------


def share_steps(free_mib: int, total_mib: int) -> int:
    """vLLM's share of the whole card in 1/10000s, rounded down: it must find that much free at start."""
    return max(free_mib, 0) * SHARE_STEPS // total_mib


def vllm_share(free_mib: int, total_mib: int) -> float:
    return share_steps(free_mib, total_mib) / SHARE_STEPS


def vllm_room(free_mib: int, total_mib: int) -> int:
    """The whole MiB vLLM gets for its share of the card (integer arithmetic: no float rounding)."""
    return share_steps(free_mib, total_mib) * total_mib // SHARE_STEPS


def headroom_for(total_mib: int, policy: PlanPolicy) -> int:
    return max(policy.headroom_min_mib, round(total_mib * policy.headroom_fraction))


def plan(catalog: Catalog, gpu_memory_mib: int, policy: PlanPolicy | None = None) -> Plan:
    policy = policy or PlanPolicy()
    headroom = headroom_for(gpu_memory_mib, policy)
    result = Plan(gpu_memory_mib=gpu_memory_mib, headroom_mib=headroom)
    free = gpu_memory_mib - headroom
    decided: dict[str, tuple[str, str | None, str]] = {}  # route -> (placement, target, reason)

    audio = place_audio(catalog, free, policy, decided)
    free -= sum(s.mib for s in audio)
    llm_model, llm_routes = choose_llm(catalog, vllm_room(free, gpu_memory_mib), policy, decided)
    llm_need = llm_min_need(llm_model, policy) if llm_model else 0
    free = upgrade_audio(catalog, audio, free, gpu_memory_mib, llm_need)
    for service in audio:  # say what each speech engine was finally given, as the budget does
        for name, (placement, target, _) in list(decided.items()):
            if (placement, target) == ("local", service.model):
                reason = f"{service.model} needs {service.mib} MiB{profile_detail(service.profile)}"
                decided[name] = (placement, target, reason)

    services = sorted(audio, key=lambda s: START_ORDER[s.kind])
    if llm_model is not None:
        result.vllm = size_vllm(llm_model, free, gpu_memory_mib, policy)
        services.append(Service("llm", llm_model.id, vllm_room(free, gpu_memory_mib)))
        for route in llm_routes:
            decided[route.name] = ("local", llm_model.id, f"served by {llm_model.id} on vLLM")
    result.services = services

    for route in catalog.routes:
        result.routes.append(route_entry(route, *decided[route.name]))
    result.budget = budget_lines(result, catalog)
    drivers = [catalog.models[s.model].params.get("min_driver") for s in services]
    result.min_driver = max(
        (d for d in (*drivers, gateway_min_driver(catalog)) if d), key=version_key, default=None
    )
    return result


CPU_COMPUTE_TYPE = "int8"  # CTranslate2's fastest type on a CPU


def cpu_plan(catalog: Catalog, policy: PlanPolicy, cloud_key: bool) -> Plan:
    """The plan for a machine without a usable GPU: speech-to-text on the CPU with the model the catalog
    sizes for it, chat from the cloud where a key and the policy allow, the GPU-only engines unavailable."""
    result = Plan(gpu_memory_mib=0, headroom_mib=0, device="cpu")
    for route in catalog.routes:
        model = catalog.models.get(route.cpu) if route.cpu else None
        if model is not None:
            profile = RunProfile(vram_mib=0, compute_type=CPU_COMPUTE_TYPE)
            result.services.append(Service(route.kind, model.id, 0, profile))
            placement, target = "local", model.id
            reason = f"{model.id} on the CPU{profile_detail(profile)}"
        elif route.kind == "llm" and policy.cloud_allowed(route) and not cloud_key:
            placement, target = "unavailable", None
            reason = "vLLM needs an NVIDIA GPU; set NVIDIA_NIM_API_KEY to serve it from NVIDIA's cloud"
        else:
            engine = "vLLM" if route.kind == "llm" else (route.local or ("its engine",))[0]
            placement, target, reason = not_local(route, policy, f"{engine} needs an NVIDIA GPU")
        result.routes.append(route_entry(route, placement, target, reason))
    return result


def route_entry(route: Route, placement: str, target: str | None, reason: str) -> dict[str, Any]:
    return dict(name=route.name, kind=route.kind, placement=placement, target=target, reason=reason)


def not_local(route: Route, policy: PlanPolicy, why: str) -> tuple[str, str | None, str]:
    """Cloud where the route has a cloud model and policy allows it; otherwise unavailable, saying why."""
    if policy.cloud_allowed(route):
        return "cloud", route.cloud, f"{why}; served by NVIDIA's cloud ({route.cloud})"
    if route.cloud is None:
        return "unavailable", None, f"{why}; it has no cloud stand-in (its data stays on the premises)"
    return "unavailable", None, f"{why}; cloud fallback is 'never' for it"


def place_audio(
    catalog: Catalog, free: int, policy: PlanPolicy, decided: dict[str, tuple[str, str | None, str]]
) -> list[Service]:
    """Reserve each speech engine at its smallest profile, smallest engine first."""
    wanted = []
    for route in catalog.routes:
        if route.kind == "llm":
            continue
        model = next((catalog.models[m] for m in route.local if m in catalog.models), None)
        if model is None or not model_profiles(model):
            decided[route.name] = not_local(route, policy, "no local model in the catalog")
            continue
        if (why := compatible(model, policy)) is not None:
            decided[route.name] = not_local(route, policy, f"{model.id} {why}")
            continue
        wanted.append((min(model_profiles(model), key=lambda p: p.vram_mib), route, model))
    services = []
    for profile, route, model in sorted(wanted, key=lambda w: w[0].vram_mib):
        if profile.vram_mib <= free:
            free -= profile.vram_mib
            services.append(Service(route.kind, model.id, profile.vram_mib, profile))
            decided[route.name] = ("local", model.id, f"{model.id} needs {profile.vram_mib} MiB")
        else:
            why = (
                f"{model.id} needs {profile.vram_mib} MiB, {free} MiB left after the headroom and the others"
            )
            decided[route.name] = not_local(route, policy, why)
    return services


def ranked_llm_models(catalog: Catalog) -> list[CatalogModel]:
    """The catalog's vLLM models, those that serve the most LLM routes first, then the most preferred."""
    candidates: dict[str, tuple[int, int]] = {}  # model id -> (routes served, preference rank sum)
    for route in catalog.routes_of_kind("llm"):
        for rank, model_id in enumerate(route.local):
            served, ranks = candidates.get(model_id, (0, 0))
            candidates[model_id] = (served + 1, ranks + rank)
    ranked = sorted(
        (m for m in candidates if m in catalog.models and catalog.models[m].engine == "vllm"),
        key=lambda m: (-candidates[m][0], candidates[m][1]),
    )
    return [catalog.models[m] for m in ranked]


def choose_llm(
    catalog: Catalog, room: int, policy: PlanPolicy, decided: dict[str, tuple[str, str | None, str]]
) -> tuple[CatalogModel | None, list[Route]]:
    """The one vLLM model to run, and the LLM routes it serves; decides the other LLM routes."""
    llm_routes = catalog.routes_of_kind("llm")
    chosen = next(
        (
            m
            for m in ranked_llm_models(catalog)
            if compatible(m, policy) is None and llm_min_need(m, policy) <= room
        ),
        None,
    )
    served = [r for r in llm_routes if chosen is not None and chosen.id in r.local]
    for route in llm_routes:
        if route not in served:
            decided[route.name] = not_local(
                route, policy, llm_shortfall(catalog, route, room, policy, chosen)
            )
    return chosen, served


def llm_shortfall(
    catalog: Catalog, route: Route, room: int, policy: PlanPolicy, chosen: CatalogModel | None
) -> str:
    """Why no local model serves this LLM route, in terms of its most preferred model."""
    reasons = []
    for model_id in route.local:
        model = catalog.models.get(model_id)
        if model is None:
            continue
        if (why := compatible(model, policy)) is not None:
            reasons.append(f"{model_id} {why}")
        elif (need := llm_min_need(model, policy)) > room:
            reasons.append(f"{model_id} needs {need} MiB, {room} MiB left for vLLM after speech")
        elif chosen is not None:
            reasons.append(f"only one vLLM model runs and {chosen.id} serves more routes")
    return "; ".join(reasons[:1]) or "no local model"


def upgrade_audio(catalog: Catalog, audio: list[Service], free: int, total: int, keep_mib: int) -> int:
    """Move each speech engine to its best profile that still leaves `keep_mib` for vLLM."""
    for service in audio:
        for profile in model_profiles(catalog.models[service.model]):  # best first
            extra = profile.vram_mib - service.mib
            if extra <= 0 or vllm_room(free - extra, total) >= keep_mib:
                free -= max(extra, 0)
                if extra > 0:
                    service.mib, service.profile = profile.vram_mib, profile
                break
    return free


def size_vllm(model: CatalogModel, free: int, total: int, policy: PlanPolicy) -> VllmPlan:
    utilization = vllm_share(free, total)
    budget = vllm_room(free, total)
    weights, overhead = model.params["weights_mib"], model.params["runtime_overhead_mib"]
    kv = budget - weights - overhead
    max_model_len, max_num_seqs = size_kv(model, kv, policy)
    args = list(model_engine_args(model))
    return VllmPlan(model.id, utilization, max_model_len, max_num_seqs, args, weights, overhead, kv)


def profile_detail(p: RunProfile | None) -> str:
    """' (compute float16, batch 8)': how a speech engine runs, as the reasons and the budget say it."""
    detail = ", ".join(
        f"{k} {val}" for k, val in (("compute", p and p.compute_type), ("batch", p and p.batch_size)) if val
    )
    return f" ({detail})" if detail else ""


def budget_lines(result: Plan, catalog: Catalog) -> list[tuple[str, int]]:
    """Where the card's memory goes, line by line; the lines add up to the card."""
    lines = []
    for s in result.services:
        if s.kind == "llm" and result.vllm is not None:
            v = result.vllm
            lines += [
                (f"vLLM weights: {v.model}", v.weights_mib),
                ("vLLM runtime overhead (CUDA context, activations, graphs)", v.overhead_mib),
                (
                    f"vLLM KV cache and state: {v.max_num_seqs} sequences of up to {v.max_model_len} tokens",
                    v.kv_mib,
                ),
            ]
        else:
            lines.append((f"{s.kind}: {s.model}{profile_detail(s.profile)}", s.mib))
    lines.append(("kept free (headroom)", result.gpu_memory_mib - sum(mib for _, mib in lines)))
    return lines


def smallest_card_for_all_local(catalog: Catalog, policy: PlanPolicy | None = None) -> int | None:
    """The smallest card, in whole GiB up to 256, on which every route runs locally."""
    for gib in range(8, 257):
        if len(plan(catalog, gib * MIB_PER_GIB, policy).names("local")) == len(catalog.routes):
            return gib
    return None


# --- the env file docker-compose.gpu.yml reads -------------------------------------------------------


def env_file(result: Plan, cloud_fallback: str) -> str:
    """KEY=value lines for compose interpolation (names shared with docker-compose.gpu.yml)."""
    v, stt = result.vllm, result.service("stt")
    stt_profile = stt.profile if stt else None
    profiles = [COMPOSE_PROFILE[s.kind] for s in result.services if s.kind in COMPOSE_PROFILE]
    values = {
        "COMPOSE_PROFILES": ",".join(profiles),
        "LLM_MODEL": v.model if v else "",
        "LLM_SERVED_NAME": v.model if v else "",
        "LLM_GPU_MEMORY_UTILIZATION": str(v.gpu_memory_utilization) if v else "",
        "LLM_MAX_MODEL_LEN": str(v.max_model_len) if v else "",
        "LLM_MAX_NUM_SEQS": str(v.max_num_seqs) if v else "",
        "LLM_EXTRA_ARGS": " ".join(v.args) if v else "",
        "STT_MODEL": stt.model if stt else "",
        "STT_COMPUTE_TYPE": (stt_profile.compute_type or "") if stt_profile else "",
        "STT_BATCH_SIZE": str(stt_profile.batch_size or "") if stt_profile else "",
        "TTS_ENABLED": "true" if result.service("tts") else "false",
        "APPLIANCE_CLOUD_FALLBACK": cloud_fallback,
    }
    card = "no GPU" if result.device == "cpu" else f"a {result.gpu_memory_mib} MiB GPU"
    header = f"# Written by `appliance plan` for {card}; rerun it after a GPU change.\n"
    return header + "".join(f"{key}={quote(value)}\n" for key, value in values.items())


def quote(value: str) -> str:
    """Compose .env values: quote only what needs it."""
    return f'"{value}"' if any(c in value for c in " #\"'$") else value
