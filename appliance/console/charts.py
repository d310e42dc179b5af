"""Bar charts for the usage page, laid out here and drawn as inline SVG by the template: no JavaScript
and no chart library, so they show without scripts and print as they look."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

WIDTH, HEIGHT = 600, 180
LEFT, BOTTOM, TOP = 56, 22, 8  # room for the value axis, the day labels, and the top label
PLOT_HEIGHT = HEIGHT - BOTTOM - TOP


@dataclass
class Series:
    label: str
    css: str  # the class that colours it (and its legend swatch)
    values: list[float]


@dataclass
class Bar:
    x: float
    y: float
    width: float
    height: float
    css: str
    title: str  # the exact figure, shown as a tooltip and read by screen readers


@dataclass
class Chart:
    id: str
    title: str
    unit: str
    series: list[Series]
    bars: list[Bar] = field(default_factory=list)
    day_labels: list[tuple[float, str]] = field(default_factory=list)
    top: float = 0  # the value axis' top figure
    total: float = 0
    width: int = WIDTH
    height: int = HEIGHT
    left: int = LEFT
    plot_bottom: int = HEIGHT - BOTTOM


def nice_ceiling(value: float) -> float:
    """The axis' top: 1, 2 or 5 times a power of ten, at least `value`."""
    if value <= 0:
        return 1
    power = 10 ** math.floor(math.log10(value))
    return next(step * power for step in (1, 2, 5, 10) if step * power >= value)


def figure(value: float | None) -> str:
    """A count or amount as people read it: thousands separated, one decimal where there is one."""
    if value is None:
        return "\u2013"  # an en dash: no figure
    return f"{value:,.1f}" if value % 1 else f"{int(value):,}"


def stacked_bars(chart_id: str, title: str, unit: str, days: Sequence[str], series: list[Series]) -> Chart:
    """One bar per day, the series stacked in order."""
    chart = Chart(chart_id, title, unit, series)
    sums = [sum(s.values[i] for s in series) for i in range(len(days))]
    chart.top = nice_ceiling(max(sums, default=0))
    chart.total = sum(sums)
    slot = (WIDTH - LEFT) / max(len(days), 1)
    for i, day in enumerate(days):
        x = LEFT + i * slot + slot * 0.15
        base = HEIGHT - BOTTOM
        for s in series:
            value = s.values[i]
            if value <= 0:
                continue
            height = max(1.0, value / chart.top * PLOT_HEIGHT)
            base -= height
            chart.bars.append(
                Bar(round(x, 1), round(base, 1), round(slot * 0.7, 1), round(height, 1), s.css,
                    f"{day}: {figure(value)} {unit} {s.label}".replace("  ", " "))
            )  # fmt: skip
        if (len(days) - 1 - i) % 7 == 0:  # weekly, counted back from today
            chart.day_labels.append((round(x + slot * 0.35, 1), day[5:]))
    return chart


def usage_charts(daily: list[dict[str, Any]]) -> list[Chart]:
    """Requests (on the box, by the cloud, refused), tokens, audio minutes and characters per day."""
    days = [row["day"] for row in daily]

    def column(name: str, scale: float = 1) -> list[float]:
        return [row.get(name, 0) / scale for row in daily]

    requests, box, cloud = column("requests"), column("served_box"), column("served_cloud")
    refused = [max(0.0, r - b - c) for r, b, c in zip(requests, box, cloud, strict=True)]
    return [
        stacked_bars(
            "requests",
            "Requests per day",
            "requests",
            days,
            [
                Series("on the box", "box", box),
                Series("by the cloud", "cloud", cloud),
                Series("refused or failed", "refused", refused),
            ],
        ),
        stacked_bars(
            "tokens",
            "Tokens per day",
            "tokens",
            days,
            [
                Series("prompt", "prompt", column("prompt_tokens")),
                Series("completion", "completion", column("completion_tokens")),
            ],
        ),
        stacked_bars(
            "audio",
            "Audio transcribed per day",
            "min",
            days,
            [Series("", "audio", column("audio_seconds", 60))],
        ),
        stacked_bars(
            "characters",
            "Characters spoken per day",
            "chars",
            days,
            [Series("", "speech", column("characters"))],
        ),
    ]
