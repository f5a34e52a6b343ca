"""Values as the report's text: each formatter takes anything, and gives "n/a" for what it cannot read."""

from __future__ import annotations

import json
from typing import Any

from ..metrics import accuracy_interval
from .load import number

NA = "n/a"


def pct(value: Any, digits: int = 2) -> str:
    """A fraction as a percentage; values above 1 are taken as already in percent."""
    x = number(value)
    if x is None:
        return NA
    return f"{x * 100 if abs(x) <= 1.0 else x:.{digits}f}%"


def flt(value: Any, digits: int = 4) -> str:
    x = number(value)
    return NA if x is None else f"{x:.{digits}f}"


def lr(value: Any) -> str:
    x = number(value)
    return NA if x is None else f"{x:.4g}"


def count(value: Any) -> str:
    x = number(value)
    return NA if x is None else f"{round(x):,}"


def yes_no(value: Any) -> str:
    return NA if value is None else ("yes" if value else "no")


def tta(r: dict[str, Any]) -> str:
    """ "level 2", or "level 2 on 28% of the images (top-two margin < 0.4)" for selective TTA."""
    if not r.get("tta"):
        return yes_no(r.get("tta"))
    margin, share = number(r.get("tta_margin")), number(r.get("tta_share"))
    if margin is None or margin >= 1 or share is None:
        return f"level {r['tta']}"
    return f"level {r['tta']} on {share:.0%} of the images (top-two margin < {margin:g})"


def duration(value: Any) -> str:
    x = number(value)
    if x is None:
        return NA
    if x < 60:
        return f"{x:.1f} s"
    minutes, seconds = divmod(round(x), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m {seconds:02d}s" if hours else f"{minutes}m {seconds:02d}s"


def params(value: Any) -> str:
    x = number(value)
    if x is None:
        return NA
    return f"{int(x):,} ({x / 1e6:.2f}M)" if x >= 1e5 else f"{int(x):,}"


def value(v: Any) -> str:
    """A config value as text: JSON for containers, plain text for scalars."""
    if v is None:
        return NA
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (dict, list, tuple)):
        return json.dumps(v, sort_keys=True)
    return str(v)


def ci(results: dict[str, Any]) -> tuple[float, float] | None:
    """The stored 95% Wilson interval of the test accuracy, else the same computed from accuracy and size."""
    p, n = number(results.get("test_accuracy")), number(results.get("test_size"))
    stored = results.get("test_accuracy_ci95")
    if isinstance(stored, list) and len(stored) == 2 and all(number(v) is not None for v in stored):
        lo, hi = float(stored[0]), float(stored[1])
        if 0.0 <= lo <= hi <= 1.0 and (p is None or lo <= p <= hi):  # else it is not this accuracy's interval
            return lo, hi
    if p is None or n is None or n < 1 or not 0.0 <= p <= 1.0:
        return None
    return accuracy_interval(round(p * n), round(n))


def ci_text(results: dict[str, Any]) -> str:
    interval = ci(results)
    return NA if interval is None else f"{interval[0] * 100:.2f}% to {interval[1] * 100:.2f}%"


def ece_text(results: dict[str, Any]) -> str:
    ece = pct(results.get("test_ece"))
    after, t = number(results.get("test_ece_calibrated")), number(results.get("temperature"))
    if ece != NA and after is not None and t is not None:
        return f"{ece} ({after * 100:.2f}% after temperature {t:.3f})"
    return ece


def ece_after(results: dict[str, Any]) -> str:
    """The ECE after temperature scaling, for the summary card."""
    after, t = number(results.get("test_ece_calibrated")), number(results.get("temperature"))
    return (
        f"{after * 100:.2f}% after temperature {t:.3f}"
        if after is not None and t is not None
        else "no temperature"
    )
