"""The one rule for a site's name.

A site's name is its certificate's common name, the name of its state folder
(``WORKSPACE/sites/NAME``) and of its certificate file (``pki/issued/NAME.crt``), and
it appears in logs and on command lines. So it must be safe as all of these, on every
operating system, and unambiguous to a person reading it:

- 1 to :data:`MAX_SITE_NAME` ASCII characters: letters, digits, ``-``, ``_``, ``.``;
- starting with a letter or a digit (never ``.``, ``..``, ``-rf``, ``_x``);
- not ending with ``.`` (Windows drops a trailing dot from file names);
- not a name Windows keeps for a device (``con``, ``nul``, ``com1`` … in any case,
  with or without an extension).

The plan checks its ``sites`` with it, and every command checks ``--name`` with it
before it touches the disk.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

MAX_SITE_NAME = 64
"""The longest site name (the longest common name an X.509 certificate holds)."""

_ALLOWED = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_DEVICES = re.compile(r"(con|prn|aux|nul|com[0-9]|lpt[0-9])(\..*)?", re.IGNORECASE)

SITE_NAME_RULE = (
    f"1 to {MAX_SITE_NAME} ASCII letters, digits, '-', '_' or '.', starting with a letter "
    "or a digit and not ending with '.'"
)
"""The rule in words, for messages and help texts."""


def site_name_problem(name: object) -> str | None:
    """What is wrong with ``name`` as a site's name, or ``None`` if it is a good one."""
    reason = _reason(name)
    if reason is None:
        return None
    return f"{_shown(name)} cannot name a site: {reason}; use {SITE_NAME_RULE}"


def _reason(name: object) -> str | None:
    if not isinstance(name, str):
        return "it is not text"
    if not name:
        return "it is empty"
    if len(name) > MAX_SITE_NAME:
        return f"it is {len(name)} characters long"
    if not name.isascii():
        odd = sorted({c for c in name if not c.isascii()})
        return "it holds characters outside ASCII: " + ", ".join(
            f"{c!r} (U+{ord(c):04X})" for c in odd[:5]
        )
    if not name[0].isalnum():
        return f"it starts with {name[0]!r}"
    if not _ALLOWED.fullmatch(name):
        odd = sorted({c for c in name if not (c.isalnum() or c in "._-")})
        return "it holds " + ", ".join(repr(c) for c in odd[:5])
    if name.endswith("."):
        return "it ends with '.'"
    if _DEVICES.fullmatch(name):
        return "Windows keeps that name for a device"
    return None


def _shown(name: object) -> str:
    text = repr(name)
    return text if len(text) <= 40 else text[:37] + "..."


def roster_of(sites: int | Sequence[str]) -> tuple[str, ...]:
    """The site names a plan's ``sites`` gives, sorted: a count ``n`` names them
    ``site-01`` … ``site-n``."""
    if isinstance(sites, int):
        width = max(2, len(str(sites)))
        return tuple(f"site-{i:0{width}d}" for i in range(1, sites + 1))
    return tuple(sorted(sites))
