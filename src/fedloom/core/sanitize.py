"""What a site reports, checked before the aggregator uses, stores, shows or logs it.

A site is another organisation's process: whatever it sends may be wrong, by mistake
or on purpose. Two things live here, both pure:

- :func:`checked_numbers`: every number a site's answer carries (its sample count and
  its metrics) is checked where the answer enters the aggregator (both transports call
  :meth:`fedloom.aggregator.Aggregator.upload`), before anything averages, stores or
  prints it. A refusal names what was wrong; the aggregator records it as that site's
  failure and the federation carries on.
- :func:`printable`: the one helper that makes text a site chose (failure reasons,
  metric or tensor names, attempt ids) safe for a log line, ``fedloom status`` and the
  state database: control characters escaped (a newline cannot forge a log line, an
  escape sequence cannot drive a terminal), and at most a bounded number of characters.

The limits are documented in ``docs/architecture.md`` ("What a site may send").
"""

from __future__ import annotations

import math
import unicodedata
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from fedloom.core.errors import UpdateRejected

MAX_METRICS = 256
"""Metrics one answer may carry."""

MAX_NAME_CHARS = 100
"""Characters in one metric's name."""

MAX_METRIC_MAGNITUDE = 1e30
"""The largest absolute value a metric may have: far beyond any loss or accuracy, far
below where a sample-weighted sum of them overflows."""

MAX_SAMPLES_CLAIMED = 10**12
"""The largest sample count a site may claim at all (the plan's ``max_samples`` caps the
count an update is weighted by; the claim is kept as it was made)."""

MAX_REASON_CHARS = 4096
"""Characters of a site's failure reason that are logged, stored and shown."""

MAX_TEXT_CHARS = 200
"""Characters of any other text a site chose (an attempt id, a tensor or step name) where it
appears in a message, a log line or a status."""

COUNT_METRICS = frozenset({"val_samples"})
"""Metrics that count samples: whole numbers, not negative, capped like sample counts.
``val_samples`` weighs a site's metrics in their mean."""

RESERVED_METRIC_NAMES = frozenset(
    {
        "round",
        "kind",
        "attempt",
        "close_reason",
        "site",
        "status",
        "num_samples",
        "claimed_samples",
        "reason",
        "epsilon",
        "delta",
        "noise_multiplier",
        "clip",
        "accountant",
        "dp_sgd_accountant",
    }
)
"""Names the aggregator's own columns use in ``metrics.jsonl``: a metric may not shadow
them."""

_ESCAPED_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})
# controls (newline, escape), format characters (bidirectional overrides, zero-width
# joiners), lone surrogates, and the Unicode line and paragraph separators


def printable(text: object, limit: int = MAX_REASON_CHARS) -> str:
    """``text`` fit for one log line, a status table or a database row.

    Every control or format character becomes a visible escape (``\\n``, ``\\x1b``,
    ``\\u202e``); text that would be longer than ``limit`` characters keeps its beginning
    and its end (where a traceback says what went wrong), with the number of characters
    cut between. The result never exceeds ``limit`` characters, and ``printable`` of it
    is itself. Only the ends are looked at: 60 MB of text cost no more than 4 KB.
    """
    raw = str(text)
    if len(raw) <= limit:
        out = "".join(_visible(c) for c in raw)
        if len(out) <= limit:
            return out
    return _shortened(raw, limit, _visible)


def shorten(text: str, limit: int = MAX_REASON_CHARS) -> str:
    """``text`` cut to at most ``limit`` characters like :func:`printable` cuts, but with
    newlines and every other character kept as they are (what an honest site does to its
    own failure reason before it sends it)."""
    return text if len(text) <= limit else _shortened(text, limit, lambda c: c)


def _shortened(raw: str, limit: int, show: Callable[[str], str]) -> str:
    """The beginning and end of ``raw`` (each character as ``show`` writes it) around a
    marker that says how many characters of ``raw`` were left out, in ``limit``
    characters at most; an escape is never split."""
    longest = len(f" […{len(raw)} characters cut…] ")  # the marker, with the largest count
    keep = limit - longest
    if keep < 2:
        return "".join(_taken(raw, limit, show))[:limit]
    head = _taken(raw, (keep + 1) // 2, show)
    tail = _taken(reversed(raw), keep - (keep + 1) // 2, show)
    cut = len(raw) - len(head) - len(tail)
    return f"{''.join(head)} […{cut} characters cut…] {''.join(reversed(tail))}"


def _taken(raw: Iterable[str], budget: int, show: Callable[[str], str]) -> list[str]:
    """The first characters of ``raw``, as ``show`` writes them, that fit in ``budget``."""
    taken: list[str] = []
    for char in raw:
        shown = show(char)
        budget -= len(shown)
        if budget < 0:
            break
        taken.append(shown)
    return taken


def _visible(char: str) -> str:
    return _escape(char) if unicodedata.category(char) in _ESCAPED_CATEGORIES else char


def _escape(char: str) -> str:
    code = ord(char)
    if char == "\n":
        return "\\n"
    if char == "\r":
        return "\\r"
    if char == "\t":
        return "\\t"
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


MAX_DIGEST_CHARS = 128
"""Characters of the audit hash an upload names (a SHA-256 hex digest has 64)."""

_HEX = frozenset("0123456789abcdef")


def check_audit_hash(value: str) -> None:
    """Refuse an upload's audit hash (what the aggregator's receipt signs) unless it is
    empty or a lowercase hex digest of at most :data:`MAX_DIGEST_CHARS` characters."""
    if len(value) > MAX_DIGEST_CHARS or not _HEX.issuperset(value):
        raise UpdateRejected(
            f"the audit hash must be a lowercase hex digest of at most {MAX_DIGEST_CHARS} "
            f"characters, got '{printable(value, 80)}'"
        )


@dataclass(frozen=True, slots=True)
class CheckedNumbers:
    """A site's answer's numbers once checked: the sample count it is weighted by (its
    claim capped by the plan), the claim as made, and its metrics."""

    num_samples: int
    claimed_samples: int
    metrics: dict[str, float]


def checked_numbers(
    num_samples: Any, metrics: Mapping[Any, Any], *, max_samples: int, training: bool
) -> CheckedNumbers:
    """Check every number of one answer; raise :class:`UpdateRejected` naming the first
    that is wrong.

    The sample count is a whole number, at least 1 for a training update (0 is allowed
    for an evaluation), at most :data:`MAX_SAMPLES_CLAIMED`, and is capped at
    ``max_samples`` (the plan's). There are at most :data:`MAX_METRICS` metrics, each
    named by 1 to :data:`MAX_NAME_CHARS` printable characters (none of
    :data:`RESERVED_METRIC_NAMES`), each a finite number of magnitude at most
    :data:`MAX_METRIC_MAGNITUDE`; a count (:data:`COUNT_METRICS`) is a whole number, not
    negative, capped at ``max_samples`` like the sample count.
    """
    claimed = _count(num_samples, "sample count")
    least = 1 if training else 0
    if claimed < least:
        raise UpdateRejected(f"sample count must be at least {least}, got {claimed}")
    if len(metrics) > MAX_METRICS:
        raise UpdateRejected(
            f"{len(metrics)} metrics sent; an answer may carry at most {MAX_METRICS} "
            "(report fewer, e.g. a summary of per-class metrics)"
        )
    checked: dict[str, float] = {}
    for key, raw in metrics.items():
        name = _metric_name(key)
        value = _metric_value(name, raw)
        if name in COUNT_METRICS:
            value = float(min(_count(value, f"metric {name!r}"), max_samples))
        checked[name] = value
    return CheckedNumbers(min(claimed, max_samples), claimed, checked)


def _count(value: Any, what: str) -> int:
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        raise UpdateRejected(f"{what} must be a number, got {printable(value, 40)}") from None
    if not math.isfinite(number) or number != math.floor(number):
        raise UpdateRejected(f"{what} must be a whole number, got {number}")
    if number < 0:
        raise UpdateRejected(f"{what} must not be negative, got {number:.0f}")
    if number > MAX_SAMPLES_CLAIMED:
        raise UpdateRejected(f"{what} of {number:.0f} is beyond {MAX_SAMPLES_CLAIMED:.0e}")
    return int(value) if isinstance(value, int) else int(number)


def _metric_name(key: Any) -> str:
    name = str(key)
    if not name or len(name) > MAX_NAME_CHARS:
        raise UpdateRejected(
            f"metric name '{printable(name, 40)}' must have 1 to {MAX_NAME_CHARS} characters "
            f"(it has {len(name)})"
        )
    if not name.isprintable():
        raise UpdateRejected(
            f"metric name '{printable(name, MAX_TEXT_CHARS)}' holds control characters"
        )
    if name in RESERVED_METRIC_NAMES:
        raise UpdateRejected(
            f"metric name {name!r} is reserved for the aggregator's own records "
            f"({', '.join(sorted(RESERVED_METRIC_NAMES))}); rename it"
        )
    return name


def _metric_value(name: str, raw: Any) -> float:
    try:
        value = float(raw)
    except (TypeError, ValueError, OverflowError):
        raise UpdateRejected(
            f"metric {name!r} must be a number, got {printable(raw, 40)}"
        ) from None
    if not math.isfinite(value):
        raise UpdateRejected(f"metric {name!r} is {value}")
    if abs(value) > MAX_METRIC_MAGNITUDE:
        raise UpdateRejected(f"metric {name!r} is {value:.3g}, beyond ±{MAX_METRIC_MAGNITUDE:.0e}")
    return value
