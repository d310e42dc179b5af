"""The planner for a box with several GPUs: which engine runs on which card.

Built on the one-card planner's rules (`appliance.planner`), standard library only like it:
1. The speech engines go on the card with the most memory, as on one card (they have no cloud
   stand-in, so they come first).
2. vLLM models, those serving the most routes first: a model is placed when it serves some LLM route
   better than what is already placed (a route's earlier `local` entry). It goes on one card when it fits
   one (the card with the least room that fits, so larger cards stay free for larger models), else
   tensor parallel over 2, 4, ... cards that have no engine yet, each holding its share.
3. Every card still without an engine gets one more copy of a placed single-card model that fits: the
   gateway pools the copies (one vLLM per GPU, each request to the least busy).
4. The speech engines move up a profile where the engine on their card keeps its room; each vLLM gets
   what is left of its cards.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from appliance.catalog import Catalog, CatalogModel
from appliance.planner import (
    START_ORDER,
    PlanPolicy,
    Service,
    VllmPlan,
    compatible,
    headroom_for,
    llm_min_need,
    model_engine_args,
    not_local,
    place_audio,
    quote,
    ranked_llm_models,
    size_kv,
    size_vllm,
    stt_settings,
    upgrade_audio,
    version_key,
    vllm_room,
    vllm_share,
)

VLLM_PORT = 8000  # every vLLM listens here in its own container


@dataclass
class Engine:
    """One vLLM server: its model and the cards it runs on (several: tensor parallel)."""

    model: CatalogModel
    gpus: tuple[int, ...]
    vllm: VllmPlan | None = None
    index: int = 0  # its place among the box's engines

    @property
    def service(self) -> str:
        """Its compose service name: `vllm` for the first, `vllm-1`, `vllm-2`, ... for the others."""
        return "vllm" if self.index == 0 else f"vllm-{self.index}"


@dataclass
class GpuPlan:
    gpu_memory_mib: list[int]
    headroom_mib: list[int]
    speech_gpu: int
    speech: list[Service] = field(default_factory=list)
    engines: list[Engine] = field(default_factory=list)
    routes: list[dict[str, Any]] = field(default_factory=list)
    min_driver: str | None = None

    def names(self, placement: str) -> list[str]:
        return [r["name"] for r in self.routes if r["placement"] == placement]

    def llm_urls(self) -> list[str]:
        return [f"http://{e.service}:{VLLM_PORT}/v1" for e in self.engines]

    def to_dict(self) -> dict[str, Any]:
        stt = next((s for s in self.speech if s.kind == "stt"), None)
        return {
            "gpu_memory_mib": self.gpu_memory_mib,
            "local": self.names("local"),
            "cloud": self.names("cloud"),
            "unavailable": self.names("unavailable"),
            "routes": self.routes,
            "speech": {
                "gpu": self.speech_gpu,
                "engines": [{"kind": s.kind, "model": s.model, "mib": s.mib} for s in self.speech],
            },
            "engines": [
                {
                    "service": e.service,
                    "model": e.model.id,
                    "gpus": list(e.gpus),
                    "tensor_parallel_size": len(e.gpus),
                    "args": e.vllm.command_args() if e.vllm else [],
                }
                for e in self.engines
            ],
            "llm_urls": self.llm_urls(),
            "stt": None if stt is None else stt_settings(stt),
            "headroom_mib": self.headroom_mib,
            "min_driver": self.min_driver,
        }


def tp_need(model: CatalogModel, tp: int, policy: PlanPolicy) -> int:
    """What each of `tp` cards must give a tensor-parallel engine: its share of the weights and the
    fewest useful sequences' KV cache, and a whole runtime overhead (each card has its own)."""
    shared = llm_min_need(model, policy) - model.params["runtime_overhead_mib"]
    return math.ceil(shared / tp) + model.params["runtime_overhead_mib"]


def fit(
    model: CatalogModel, free: list[int], cards: list[int], taken: set[int], policy: PlanPolicy
) -> tuple[int, ...] | None:
    """The cards for one engine of `model`: one card if it fits one, else the fewest for tensor
    parallelism; None if it fits nowhere."""
    open_cards = [g for g in range(len(cards)) if g not in taken]
    need = llm_min_need(model, policy)
    single = [g for g in open_cards if vllm_room(free[g], cards[g]) >= need]
    if single:
        return (min(single, key=lambda g: (vllm_room(free[g], cards[g]), g)),)
    roomiest = sorted(open_cards, key=lambda g: (-vllm_room(free[g], cards[g]), g))
    tp = 2
    while tp <= len(roomiest):
        chosen = roomiest[:tp]
        if all(vllm_room(free[g], cards[g]) >= tp_need(model, tp, policy) for g in chosen):
            return tuple(sorted(chosen))
        tp *= 2
    return None


def size_tensor_parallel(
    model: CatalogModel, free: list[int], cards: list[int], gpus: tuple[int, ...], policy: PlanPolicy
) -> VllmPlan:
    """One share of every card (vLLM's --gpu-memory-utilization is per card), the least any card allows."""
    share = min(vllm_share(free[g], cards[g]) for g in gpus)
    rooms = [math.floor(share * cards[g]) for g in gpus]
    weights, overhead = model.params["weights_mib"], model.params["runtime_overhead_mib"]
    kv = sum(rooms) - weights - overhead * len(gpus)
    max_model_len, max_num_seqs = size_kv(model, kv, policy)
    args = [*model_engine_args(model), "--tensor-parallel-size", str(len(gpus))]
    return VllmPlan(model.id, share, max_model_len, max_num_seqs, args, weights, overhead * len(gpus), kv)


def place_engines(catalog: Catalog, free: list[int], cards: list[int], policy: PlanPolicy) -> list[Engine]:
    """Steps 2 and 3: engines for the routes they serve best, then a copy on every card left empty."""
    best: dict[str, int] = {}  # route -> the preference rank of the model that serves it
    engines: list[Engine] = []
    taken: set[int] = set()
    for model in ranked_llm_models(catalog):
        if compatible(model, policy) is not None:
            continue
        gains = [
            r.name
            for r in catalog.routes_of_kind("llm")
            if model.id in r.local and r.local.index(model.id) < best.get(r.name, len(r.local))
        ]
        gpus = fit(model, free, cards, taken, policy) if gains else None
        if gpus is None:
            continue
        engines.append(Engine(model, gpus))
        taken.update(gpus)
        for route in catalog.routes_of_kind("llm"):
            if route.name in gains:
                best[route.name] = route.local.index(model.id)
    for g in range(len(cards)):
        if g in taken:
            continue
        room = vllm_room(free[g], cards[g])
        copy = next(
            (e.model for e in engines if len(e.gpus) == 1 and llm_min_need(e.model, policy) <= room), None
        )
        if copy is not None:
            engines.append(Engine(copy, (g,)))
            taken.add(g)
    for index, engine in enumerate(engines):
        engine.index = index
    return engines


def plan_gpus(catalog: Catalog, cards: list[int], policy: PlanPolicy | None = None) -> GpuPlan:
    policy = policy or PlanPolicy()
    headroom = [headroom_for(c, policy) for c in cards]
    free = [c - h for c, h in zip(cards, headroom, strict=True)]
    decided: dict[str, tuple[str, str | None, str]] = {}
    speech_gpu = min(range(len(cards)), key=lambda g: (-free[g], g))
    speech = place_audio(catalog, free[speech_gpu], policy, decided)
    free[speech_gpu] -= sum(s.mib for s in speech)
    result = GpuPlan(cards, headroom, speech_gpu)
    result.engines = place_engines(catalog, free, cards, policy)

    on_speech_card = [e for e in result.engines if speech_gpu in e.gpus]
    keep = tp_need(on_speech_card[0].model, len(on_speech_card[0].gpus), policy) if on_speech_card else 0
    free[speech_gpu] = upgrade_audio(catalog, speech, free[speech_gpu], cards[speech_gpu], keep)
    result.speech = sorted(speech, key=lambda s: START_ORDER[s.kind])
    for engine in result.engines:
        g = engine.gpus[0]
        engine.vllm = (
            size_vllm(engine.model, free[g], cards[g], policy)
            if len(engine.gpus) == 1
            else size_tensor_parallel(engine.model, free, cards, engine.gpus, policy)
        )
    rooms = [vllm_room(free[g], cards[g]) for g in range(len(cards))]
    decide_llm_routes(catalog, result, policy, decided, rooms)
    result.routes = [
        {"name": r.name, "kind": r.kind, "placement": p, "target": t, "reason": why}
        for r in catalog.routes
        for p, t, why in (decided[r.name],)
    ]
    models = [s.model for s in result.speech] + [e.model.id for e in result.engines]
    drivers = [catalog.models[m].params.get("min_driver") for m in models]
    result.min_driver = max(drivers, key=version_key, default=None)
    return result


def decide_llm_routes(
    catalog: Catalog,
    result: GpuPlan,
    policy: PlanPolicy,
    decided: dict[str, tuple[str, str | None, str]],
    rooms: list[int],
) -> None:
    """Each LLM route: on its most preferred engine, or where policy sends it, saying why."""
    for route in catalog.routes_of_kind("llm"):
        serving = [e for e in result.engines if e.model.id in route.local]
        if not serving:
            first = next((catalog.models[m] for m in route.local if m in catalog.models), None)
            why = "no local model" if first is None else (
                f"{first.id} needs {llm_min_need(first, policy)} MiB on one card or "
                f"{tp_need(first, 2, policy)} MiB on each of two; after speech the cards have "
                f"{', '.join(map(str, rooms))} MiB for vLLM"
            )  # fmt: skip
            decided[route.name] = not_local(route, policy, why)
            continue
        best = min(serving, key=lambda e: route.local.index(e.model.id)).model.id
        where = [e for e in serving if e.model.id == best]
        cards = "; ".join(
            f"GPU {e.gpus[0]}"
            if len(e.gpus) == 1
            else f"GPUs {', '.join(map(str, e.gpus))} (tensor parallel)"
            for e in where
        )
        copies = f", {len(where)} engines pooled" if len(where) > 1 else ""
        decided[route.name] = ("local", best, f"served by {best} on {cards}{copies}")


def env_file_gpus(result: GpuPlan, cloud_fallback: str) -> str:
    """KEY=value lines for compose: the one-card names for the speech engines and the first vLLM, and
    numbered ones for the others."""
    stt = next((s for s in result.speech if s.kind == "stt"), None)
    profile = stt.profile if stt else None
    profiles = ["tts"] if any(s.kind == "tts" for s in result.speech) else []
    profiles += ["llm"] if result.engines else []
    values = {
        "COMPOSE_PROFILES": ",".join(profiles),
        **env_lines(result),
        "STT_MODEL": stt.model if stt else "",
        "STT_COMPUTE_TYPE": (profile.compute_type or "") if profile else "",
        "STT_BATCH_SIZE": str(profile.batch_size or "") if profile else "",
        "TTS_ENABLED": "true" if "tts" in profiles else "false",
        "APPLIANCE_CLOUD_FALLBACK": cloud_fallback,
    }
    sizes = "+".join(str(m) for m in result.gpu_memory_mib)
    header = f"# Written by `appliance plan` for GPUs of {sizes} MiB; rerun it after a GPU change.\n"
    return header + "".join(f"{key}={quote(value)}\n" for key, value in values.items())


def env_lines(result: GpuPlan) -> dict[str, str]:
    """The compose variables of every vLLM engine: LLM_* for the first (service `vllm`), LLM_<n>_* for
    the others, the cards each runs on, and the gateway's pool of their URLs."""
    values: dict[str, str] = {"APPLIANCE_LLM_URLS": ",".join(result.llm_urls())}
    for engine in result.engines:
        v = engine.vllm
        assert v is not None
        prefix = "LLM_" if engine.index == 0 else f"LLM_{engine.index}_"
        values |= {
            f"{prefix}MODEL": v.model,
            f"{prefix}SERVED_NAME": v.model,
            f"{prefix}GPUS": ",".join(map(str, engine.gpus)),
            f"{prefix}GPU_MEMORY_UTILIZATION": str(v.gpu_memory_utilization),
            f"{prefix}MAX_MODEL_LEN": str(v.max_model_len),
            f"{prefix}MAX_NUM_SEQS": str(v.max_num_seqs),
            f"{prefix}EXTRA_ARGS": " ".join(v.args),
        }
    values["SPEECH_GPU"] = str(result.speech_gpu)
    return values
