"""Writing a site's policy.yaml for ``fedloom policy``: a commented starting policy from
the plan (``init``), and a plan hash added to ``approved_plans`` keeping the file's
comments and layout where that reads back the same (``approve``).
"""

from __future__ import annotations

import datetime
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from fedloom.core.errors import PolicyError
from fedloom.docpages import doc_ref

# pydantic stays out of `fedloom --help`: the plan and the policy are imported as used
if TYPE_CHECKING:
    from fedloom.plan import Plan
    from fedloom.privacy.policy import Policy


def starting_policy(plan: Plan, digest: str, workspace: Path) -> str:
    """A commented policy approving ``digest`` with the plan's privacy as its minimums."""
    from fedloom.privacy.settings import DPPlan, DPSGDPlan, NoisePlacement, SecureAggregationPlan

    privacy = plan.privacy
    dp, sgd, sa = privacy.dp, privacy.dp_sgd, privacy.secure_aggregation
    parts = [
        _HEADER.format(name=plan.name, workspace=workspace, docs=doc_ref("cli/policy")),
        "version: 1\n",
        _APPROVED,
        f"approved_plans:\n  - {_scalar(digest)}  # {plan.name}, approved "
        f"{datetime.date.today()}\n",
        "\n# The most rounds this site takes part in.\n",
        f"max_rounds: {plan.rounds}\n",
    ]
    example_dp = dp or DPPlan()
    adaptive = dp is not None and dp.adaptive_clip is not None
    parts.append(
        _section(
            "dp",
            "User-level differential privacy (the plan's privacy.dp): each site's update is "
            "clipped, and noise is added to their sum.",
            active=dp is not None,
            entries=[
                ("required", True, "false: DP is optional, but bounded when the plan uses it"),
                ("min_noise_multiplier", example_dp.noise_multiplier, "noise_multiplier >= this"),
                (
                    "max_clip",
                    _Off(example_dp.clip, "the plan's adaptive_clip can grow past any bound")
                    if adaptive
                    else example_dp.clip,
                    "clip <= this",
                ),
                (
                    "max_epsilon",
                    8.0
                    if dp is None
                    else (dp.epsilon_budget or _Off(8.0, "the plan sets no epsilon_budget")),
                    "epsilon_budget set and <= this",
                ),
                ("max_delta", example_dp.delta, "delta <= this"),
                (
                    "distributed_noise",
                    example_dp.noise is NoisePlacement.DISTRIBUTED,
                    "true: noise: distributed (the sites add it, not the aggregator)",
                ),
            ],
        )
    )
    example_sgd = sgd or DPSGDPlan()
    parts.append(
        _section(
            "dp_sgd",
            "Sample-level DP-SGD in each site's training (the plan's privacy.dp_sgd; torch tasks).",
            active=sgd is not None,
            entries=[
                ("required", True, None),
                ("min_noise_multiplier", example_sgd.noise_multiplier, "noise_multiplier >= this"),
                ("max_grad_norm", example_sgd.max_grad_norm, "max_grad_norm <= this"),
            ],
        )
    )
    example_sa = sa or SecureAggregationPlan()
    parts.append(
        _section(
            "secure_aggregation",
            "Secure aggregation (the plan's privacy.secure_aggregation): the aggregator sees "
            "only the sum of the updates, never this site's own.",
            active=sa is not None,
            entries=[
                ("required", True, None),
                ("min_threshold", example_sa.threshold, "threshold >= this"),
                ("min_bits", example_sa.bits, "bits >= this (32 or 64)"),
            ],
        )
    )
    query = plan.analysis
    parts.append(
        _section(
            "analysis",
            "A federated analysis (the plan's analysis:, `fedloom analyze`): the columns and "
            "kinds of statistic that may leave this site, and the least min_count. Without "
            "this section no analysis runs here.",
            active=query is not None,
            entries=[
                ("columns", list(query.columns) if query else ["age"], "whose statistics leave"),
                (
                    "statistics",
                    sorted({s.stat for s in query.statistics}) if query else ["count", "mean"],
                    "the kinds that may leave",
                ),
                ("min_count", query.min_count if query else 10, "analysis.min_count >= this"),
            ],
            dormant="to allow one",
        )
    )
    parts.append(_METRICS)
    return "".join(parts)


_HEADER = """\
# fedloom site policy: this site's own rules. Its collaborator checks every plan against
# them before it reads any data, and they always win over the plan. This file never
# leaves the site. Every key is described in
# {docs}.
#
# Written by `fedloom policy init` from the plan {name!r} of {workspace}: its
# privacy settings are the minimums below. Tighten them to what your regulator demands.
"""

_APPROVED = """
# Plans this site reviewed and approved, by plan hash (`fedloom plan show` prints it).
# A change to federation.yaml, an override or a .py file gives a new hash: review it,
# then add it with `fedloom policy approve`. Without this list any plan passes.
"""

_METRICS = """
# Metrics that may leave this site (the task's, e.g. global_accuracy, global_loss,
# val_samples). Without this section, all of them. sample_level: false keeps every
# metric computed on this site's samples here. To restrict them, uncomment:
# metrics:
#   allowed: [global_accuracy, global_loss, val_samples]
#   sample_level: true
"""


def _section(
    name: str,
    about: str,
    *,
    active: bool,
    entries: list[tuple[str, Any, str | None]],
    dormant: str = "to require it",
) -> str:
    """A policy section, commented out unless ``active``. An entry whose value is a
    :class:`_Off` is written commented out, with the value as an example."""
    intro = about if active else f"{about} The plan has none; {dormant}, uncomment:"
    lines = [f"{name}:"]
    for key, value, note in entries:
        if isinstance(value, _Off):
            body, note = f"  # {key}: {_scalar(value.example)}", value.note
        else:
            body = f"  {key}: {_scalar(value)}"
        lines.append(f"{body:<30}  # {note}" if note else body)
    if not active:
        lines = [f"# {line}" for line in lines]
    return "\n".join(["", *_wrap(intro), *lines]) + "\n"


@dataclass(frozen=True)
class _Off:
    """A key left commented out in a starting policy, with an example value and why."""

    example: Any
    note: str


def _wrap(text: str) -> list[str]:
    lines, line = [], "#"
    for word in text.split():
        if len(line) + 1 + len(word) > 88:
            lines.append(line)
            line = "#"
        line += " " + word
    return [*lines, line]


def _scalar(value: Any) -> str:
    """``value`` as one YAML scalar that reads back as the same value."""
    return yaml.safe_dump(value, default_flow_style=True).splitlines()[0]


_KEY = re.compile(r"approved_plans\s*:\s*(#.*)?$")
_EMPTY = re.compile(r"approved_plans\s*:\s*\[\s*\]\s*(#.*)?$")
_ITEM = re.compile(r"(\s*)-\s")


def approve_plan(path: Path, policy: Policy, digest: str, note: str) -> bool:
    """Add ``digest`` to the policy file's approved_plans; True if the file's comments and
    layout were kept (a line added), False if it had to be rewritten from its values.
    Either text is read back, and written only if it is the old policy plus ``digest``."""
    wanted = policy.model_copy(update={"approved_plans": (*(policy.approved_plans or ()), digest)})
    edited = _with_item(path.read_text(encoding="utf-8"), f"{_scalar(digest)}  # {note}")
    if _reads_as(edited, wanted):
        write_policy(path, edited)
        return True
    values = yaml.safe_dump(
        wanted.model_dump(mode="json", exclude_none=True), sort_keys=False, width=88
    )
    rewritten = f"# fedloom site policy, rewritten by `fedloom policy approve`.\n{values}"
    if not _reads_as(rewritten, wanted):
        raise PolicyError(
            f"cannot add the plan hash to {path} safely; it was left as it was",
            hint=f"add `- {digest}` to its approved_plans by hand",
        )
    write_policy(path, rewritten)
    return False


def _reads_as(text: str, wanted: Policy) -> bool:
    from fedloom.core.strict_yaml import StrictLoader
    from fedloom.privacy.policy import validate_policy

    try:
        read = validate_policy(yaml.load(text, Loader=StrictLoader))  # noqa: S506
    except (yaml.YAMLError, PolicyError):
        return False
    return read.model_dump() == wanted.model_dump()


def _with_item(text: str, item: str) -> str:
    """``text`` with ``- item`` added to its top-level approved_plans block list (the
    list made if there is none)."""
    lines = text.splitlines(keepends=True)
    if lines and not lines[-1].endswith("\n"):
        lines[-1] += "\n"
    for i, line in enumerate(lines):
        if _EMPTY.match(line):
            lines[i] = f"approved_plans:\n  - {item}\n"
            return "".join(lines)
        if _KEY.match(line):
            at, indent = i + 1, "  "
            for j in range(i + 1, len(lines)):
                if not lines[j].strip() or lines[j].lstrip().startswith("#"):
                    continue
                found = _ITEM.match(lines[j])
                if found is None:
                    break
                at, indent = j + 1, found.group(1)
            lines.insert(at, f"{indent}- {item}\n")
            return "".join(lines)
    return "".join(lines) + f"\n# added by `fedloom policy approve`\napproved_plans:\n  - {item}\n"


def write_policy(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename, keeping the
    mode of the file it replaces: a crash leaves the old policy or the new one."""
    from fedloom.core.files import write_atomic

    path.parent.mkdir(parents=True, exist_ok=True)
    mode = path.stat().st_mode & 0o777 if path.exists() else 0o644
    write_atomic(path, text.encode("utf-8"), mode=mode, error=PolicyError)
