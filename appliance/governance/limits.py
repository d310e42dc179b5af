"""Rate limits and quotas, enforced in-process on the hot path: token buckets per key (requests, tokens,
audio seconds and characters a minute) and daily and monthly quota counters.

Tokens are taken up front from an estimate and corrected when the engine reports its `usage`, so the
bucket may go briefly into debt; a request larger than a whole minute's allowance passes when the
bucket is full rather than never.
"""

from __future__ import annotations

import math
import time

from appliance.errors import APIError
from appliance.governance.clock import Clock
from appliance.governance.tiers import Tier
from appliance.metrics import limited, quota_refused

# Quota dimensions, in the order the counters hold them.
TOKENS, AUDIO, CHARACTERS = 0, 1, 2
QUOTA_NAMES = ("tokens", "audio_seconds", "characters")


class TokenBucket:
    """Holds up to one minute's allowance and refills continuously."""

    __slots__ = ("capacity", "level", "rate", "stamp")

    def __init__(self, per_minute: float) -> None:
        self.capacity = float(per_minute)
        self.rate = per_minute / 60.0
        self.level = self.capacity
        self.stamp = time.monotonic()

    def wait(self, amount: float, now: float) -> float:
        """Seconds until `amount` can be taken; 0 when it can be now."""
        level = self.refilled(now)
        if level >= amount or level >= self.capacity:
            return 0.0
        # A bucket in debt (corrected after a larger answer than estimated) waits the debt off too.
        return 60.0 if self.rate <= 0 else (amount - level) / self.rate

    def take(self, amount: float) -> None:
        """Take (or, negative, give back) without asking: corrections after the fact."""
        self.level = min(self.capacity, self.level - amount)

    def refilled(self, now: float) -> float:
        """The level now: what may be taken (negative while in debt)."""
        level = self.level + (now - self.stamp) * self.rate
        self.level = level = level if level < self.capacity else self.capacity
        self.stamp = now
        return level

    def remaining(self, now: float) -> int:
        return max(0, int(self.refilled(now)))


def _bucket(per_minute: float | None) -> TokenBucket | None:
    return None if per_minute is None else TokenBucket(per_minute)


def duration_text(seconds: float) -> str:
    """OpenAI's reset format: `20ms`, `1s`, `6m0s`."""
    if seconds < 1:
        return f"{int(seconds * 1000) if seconds > 0 else 0}ms"
    whole = math.ceil(seconds)
    return f"{whole // 60}m{whole % 60}s" if whole >= 60 else f"{whole}s"


class QuotaUsage:
    """One key's counts for the current day and month: [tokens, audio seconds, characters]."""

    __slots__ = ("day", "day_used", "month", "month_used")

    def __init__(
        self, clock: Clock, day_used: list[float] | None = None, month_used: list[float] | None = None
    ):
        self.day, self.month = clock.day, clock.month
        self.day_used = day_used or [0.0, 0.0, 0.0]
        self.month_used = month_used or [0.0, 0.0, 0.0]

    def roll(self, clock: Clock) -> None:
        if clock.day != self.day:
            self.day, self.day_used = clock.day, [0.0, 0.0, 0.0]
        if clock.month != self.month:
            self.month, self.month_used = clock.month, [0.0, 0.0, 0.0]

    def add(self, tokens: float, audio: float, characters: float) -> None:
        for used in (self.day_used, self.month_used):
            used[TOKENS] += tokens
            used[AUDIO] += audio
            used[CHARACTERS] += characters


class Allowance:
    """A key's live limits: its tier's buckets and its quota counts. What the tier limits is worked out
    once here, so that a request pays only for the limits its key has."""

    __slots__ = (
        "audio",
        "buckets",
        "characters",
        "headers",
        "limited",
        "quotas",
        "requests",
        "shown",
        "tier",
        "tokens",
        "usage",
    )

    def __init__(self, tier: Tier, usage: QuotaUsage) -> None:
        self.tier = tier
        self.usage = usage
        self.requests = _bucket(tier.requests_per_minute)
        self.tokens = _bucket(tier.tokens_per_minute)
        self.audio = _bucket(tier.audio_seconds_per_minute)
        self.characters = _bucket(tier.characters_per_minute)
        # (period, dimension, quota) for each quota the tier sets.
        self.quotas = [
            (period, index, quota)
            for period in ("day", "month")
            for index, name in enumerate(QUOTA_NAMES)
            if (quota := getattr(tier, f"{name}_per_{period}")) is not None
        ]
        # The buckets this tier has, by their place in `admit`'s amounts.
        every = (self.requests, self.tokens, self.characters, self.audio)
        self.buckets = [(index, bucket) for index, bucket in enumerate(every) if bucket is not None]
        # OpenAI's headers describe the request and token limits; an unlimited tier has none to show.
        self.shown = [
            (
                bucket,
                b"x-ratelimit-limit-" + name,
                b"%d" % bucket.capacity,
                b"x-ratelimit-remaining-" + name,
                b"x-ratelimit-reset-" + name,
            )
            for name, bucket in ((b"requests", self.requests), (b"tokens", self.tokens))
            if bucket is not None
        ]
        self.headers = bool(self.shown)
        self.limited = not tier.unlimited

    def admit(
        self,
        clock: Clock,
        tokens: float = 0,
        characters: float = 0,
        audio: bool = False,
        audio_seconds: float = 0.0,
        requests: int = 1,
    ) -> None:
        """Take this request from the buckets, or raise the 429 that says why not (nothing taken).
        `audio_seconds` is audio of known length (a live session's turn); `requests=0` admits a turn
        of a session already counted as a request."""
        if not self.limited:
            return
        audio = audio or audio_seconds > 0
        if self.quotas:
            self._check_quotas(clock, (tokens > 0, audio, characters > 0))
        now = time.monotonic()
        # An upload's length is known only after decoding: admit while some allowance is left, charge later.
        amounts = (requests, tokens, characters, audio_seconds or (1e-9 if audio else 0))
        wait = 0.0
        for index, bucket in self.buckets:
            if amounts[index]:
                wait = max(wait, bucket.wait(amounts[index], now))
        if wait > 0:
            limited(self.tier.name)
            raise APIError(
                429,
                f"Rate limit reached for this key (tier '{self.tier.name}'); "
                f"try again in {duration_text(wait)}.",
                code="rate_limit_exceeded",
                headers={"retry-after": str(max(1, math.ceil(wait)))},
            )
        for index, bucket in self.buckets:
            if amounts[index] and bucket is not self.audio:
                bucket.take(amounts[index])

    def _check_quotas(self, clock: Clock, wanted: tuple[bool, bool, bool]) -> None:
        usage = self.usage
        usage.roll(clock)
        for period, index, quota in self.quotas:
            used = usage.day_used if period == "day" else usage.month_used
            if wanted[index] and used[index] >= quota:
                quota_refused(self.tier.name)
                resets = clock.next_day() if period == "day" else clock.next_month()
                raise APIError(
                    429,
                    f"This key has used its {QUOTA_NAMES[index].replace('_', ' ')} quota for the {period} "
                    f"({quota:g}, tier '{self.tier.name}'); it resets on {resets} at 00:00 local time.",
                    type="insufficient_quota",
                    code="insufficient_quota",
                    headers={"x-should-retry": "false"},
                )

    def settle(self, estimated_tokens: float, tokens: float, audio: float, characters: float) -> None:
        """Correct the buckets with what the request really used, and count it against the quotas."""
        if self.tokens is not None and tokens != estimated_tokens:
            self.tokens.take(tokens - estimated_tokens)
        if self.audio is not None and audio:
            self.audio.take(audio)
        self.usage.add(tokens, audio, characters)

    def rate_headers(self) -> list[tuple[bytes, bytes]]:
        now = time.monotonic()
        headers = []
        for bucket, limit_name, limit, remaining_name, reset_name in self.shown:
            level = bucket.refilled(now)
            seconds = (bucket.capacity - level) / bucket.rate if bucket.rate > 0 else 0.0
            reset = b"%dms" % (seconds * 1000) if seconds < 1 else duration_text(seconds).encode()
            headers += ((limit_name, limit), (remaining_name, b"%d" % max(level, 0)), (reset_name, reset))
        return headers
