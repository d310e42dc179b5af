"""The privacy policy in force: for each public model name, whether a request may leave the box, and
on what. `appliance serve` logs it at start and `appliance doctor` prints it, so an admin sees what the
gateway understood rather than what they meant to write."""

from __future__ import annotations

from dataclasses import dataclass

from appliance.catalog import Catalog, Route
from appliance.config import Settings


@dataclass(frozen=True)
class ModelPolicy:
    name: str
    kind: str
    cloud_fallback: str  # the policy in force: never, on_failure, on_overload
    cloud_model: str | None  # what a request may be sent to outside the box; None: it never leaves
    reason: str  # one phrase, for people

    @property
    def leaves_box(self) -> bool:
        return self.cloud_model is not None


def model_policy(settings: Settings, route: Route) -> ModelPolicy:
    if route.kind != "llm":
        # Audio has no cloud stand-in, whatever the settings say.
        reason = "stays on the box: audio has no cloud fallback"
        return ModelPolicy(route.name, route.kind, "never", None, reason)
    policy = settings.fallback_policy(route.name, "on_failure")
    if policy == "never":
        return ModelPolicy(route.name, route.kind, policy, None, "stays on the box: cloud_fallback is never")
    if not settings.cloud_enabled:
        return ModelPolicy(route.name, route.kind, policy, None, "stays on the box: no NVIDIA_NIM_API_KEY")
    if route.cloud is None:
        return ModelPolicy(route.name, route.kind, policy, None, "stays on the box: no cloud model")
    when = "fails" if policy == "on_failure" else "fails or is overloaded"
    reason = f"may go to {settings.nvidia_nim_base_url} ({route.cloud}) when the local engine {when}"
    return ModelPolicy(route.name, route.kind, policy, route.cloud, reason)


def effective_policies(settings: Settings, catalog: Catalog) -> list[ModelPolicy]:
    return [model_policy(settings, route) for route in catalog.routes]
