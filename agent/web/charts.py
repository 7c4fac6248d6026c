"""The activity charts as geometry: bars with their positions, for the template to draw
as SVG on the server (no script, no library, nothing to build).

Pure functions of the page data, so a test checks the picture by its numbers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["Bar", "drift_chart", "pass_chart"]

WIDTH = 720
HEIGHT = 180
PAD = 30  # left margin for the scale; top and bottom for labels


@dataclass(frozen=True, slots=True)
class Bar:
    x: float
    y: float
    width: float
    height: float
    css: str  # the class that colours it (the pass's outcome)
    title: str  # shown on hover (an SVG <title>): what the bar is
    label: str = ""
    href: str = ""


def pass_chart(passes: list[dict[str, Any]]) -> dict[str, Any]:
    """One bar per pass, oldest left: height the duration, colour the outcome."""
    longest = max((p["duration"] or 0.0 for p in passes), default=0.0) or 1.0
    plot_w, plot_h = WIDTH - PAD - 10, HEIGHT - 2 * PAD
    step = plot_w / max(len(passes), 1)
    bars = []
    for index, item in enumerate(passes):
        seconds = item["duration"]
        height = max(2.0, plot_h * (seconds or 0.0) / longest)
        took = f"{seconds:.1f} s" if seconds is not None else "not finished"
        bars.append(
            Bar(
                x=round(PAD + index * step + step * 0.1, 1),
                y=round(PAD + plot_h - height, 1),
                width=round(max(step * 0.8, 1.0), 1),
                height=round(height, 1),
                css=f"o-{item['status']}",
                title=f"{item['run']} ({item['trigger']}): {item['status']}, {took}",
            )
        )
    return {
        "width": WIDTH,
        "height": HEIGHT,
        "bars": bars,
        "max_label": f"{longest:.1f} s",
        "axis_y": PAD + plot_h,
        "top": PAD,
        "left": PAD,
    }


def drift_chart(counts: dict[str, int]) -> dict[str, Any]:
    """One horizontal bar per unit that drifted: its length the number of drift events."""
    row_h, label_w = 22, 160
    most = max(counts.values(), default=0) or 1
    bars = []
    for index, (unit, count) in enumerate(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))):
        length = max(2.0, (WIDTH - label_w - 60) * count / most)
        bars.append(
            Bar(
                x=label_w,
                y=10 + index * row_h,
                width=round(length, 1),
                height=row_h - 6,
                css="drift",
                title=f"{unit}: {count} drift event(s)",
                label=unit,
                href=f"/units/{unit}",
            )
        )
    return {
        "width": WIDTH,
        "height": 20 + row_h * max(len(bars), 1),
        "bars": bars,
        "label_x": label_w - 8,
    }
