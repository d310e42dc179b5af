"""The cloud budget: the NVIDIA key's own limits (its tier, or explicit requests and tokens a minute),
spent by cloud attempts so that a local outage never turns into a burst of NVIDIA 429s.

When NVIDIA answers 429 anyway, the budget is shut until its Retry-After passes.
"""

from __future__ import annotations

import time

from appliance.governance.limits import TokenBucket
from appliance.governance.tiers import DEFAULT_TIERS
from appliance.metrics import CLOUD_BUDGET_EXHAUSTED

PAUSE_WITHOUT_RETRY_AFTER = 5.0  # seconds, when NVIDIA's 429 does not say how long


class CloudBudget:
    def __init__(self, requests_per_minute: int | None, tokens_per_minute: int | None) -> None:
        self.requests = TokenBucket(requests_per_minute) if requests_per_minute is not None else None
        self.tokens = TokenBucket(tokens_per_minute) if tokens_per_minute is not None else None
        self.paused_until = 0.0

    @classmethod
    def configured(cls, tier: str | None, rpm: int | None, tpm: int | None) -> CloudBudget:
        """Explicit figures win over the tier's; neither set means NVIDIA's 429s are the only limit."""
        base = DEFAULT_TIERS[tier] if tier else None
        return cls(
            rpm if rpm is not None else (base.requests_per_minute if base else None),
            tpm if tpm is not None else (base.tokens_per_minute if base else None),
        )

    def spend(self, tokens: float) -> float:
        """Take one request of about `tokens` from the budget: 0 when taken, else seconds to wait."""
        now = time.monotonic()
        wait = self.paused_until - now
        for bucket, amount in ((self.requests, 1), (self.tokens, tokens)):
            if bucket is not None:
                wait = max(wait, bucket.wait(amount, now))
        if wait > 0:
            CLOUD_BUDGET_EXHAUSTED.inc()
            return wait
        for bucket, amount in ((self.requests, 1), (self.tokens, tokens)):
            if bucket is not None:
                bucket.take(amount)
        return 0.0

    def correct(self, estimated: float, tokens: float) -> None:
        if self.tokens is not None and tokens != estimated:
            self.tokens.take(tokens - estimated)

    def rejected(self, retry_after: float | None) -> None:
        """NVIDIA said 429: nothing more goes to the cloud until its Retry-After has passed."""
        pause = retry_after if retry_after else PAUSE_WITHOUT_RETRY_AFTER
        self.paused_until = max(self.paused_until, time.monotonic() + pause)

    def status(self) -> dict[str, object]:
        now = time.monotonic()
        return {
            "requests_per_minute": self.requests.capacity if self.requests else None,
            "tokens_per_minute": self.tokens.capacity if self.tokens else None,
            "requests_left": self.requests.remaining(now) if self.requests else None,
            "paused_for_seconds": round(max(0.0, self.paused_until - now), 1),
        }
