"""``fedloom policy``: the data owner's site policy, written, approved and checked.

``check`` gives the verdict the collaborator gives before it reads any data; ``init``
writes a starting policy from the workspace's plan; ``approve`` adds the plan's hash to
a policy's ``approved_plans``. None of them starts anything or reads site data.

All three find the policy where the site's collaborator reads it, STATE/policy.yaml
(``--name`` or ``--state``, as for ``fedloom collaborator start``), unless ``--policy``
(``--out``) names another file; each prints the file it uses.
"""

from __future__ import annotations

import datetime
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
import yaml
from rich.markup import escape

from fedloom.cli.common import Overrides, WorkspaceArg, console, count, friendly, site_name
from fedloom.core.errors import PolicyError
from fedloom.docpages import doc_ref

# The plan and the policy (pydantic) are imported by each command as it runs: `fedloom
# --help` stays light.
if TYPE_CHECKING:
    from fedloom.plan import Plan
    from fedloom.privacy.policy import Policy

POLICY_FILE = "policy.yaml"  # fedloom.privacy.policy.POLICY_FILE (tests/test_cli.py checks)

policy_app = typer.Typer(
    help="The site policy: the data owner's rules, checked before any data is read.",
    no_args_is_help=True,
)


def _site_name(value: str | None) -> str | None:
    return None if value is None else site_name(value)


NameOption = Annotated[
    str | None,
    typer.Option(
        "--name",
        help="The site whose policy it is: WORKSPACE/sites/NAME/policy.yaml, where "
        "`fedloom collaborator start --name NAME` reads it.",
        callback=_site_name,
    ),
]
StateOption = Annotated[
    Path | None,
    typer.Option(
        "--state",
        help="The site's state folder, if not WORKSPACE/sites/NAME (the collaborator's "
        "--state): the policy is STATE/policy.yaml.",
    ),
]
PolicyOption = Annotated[
    Path | None,
    typer.Option(
        "--policy",
        help="Another policy file (the collaborator reads it only with the same --policy).",
    ),
]


def site_policy(workspace: Path, name: str | None, state: Path | None) -> Path | None:
    """Where the collaborator of the site named by ``name`` or ``state`` reads its
    policy (STATE/policy.yaml); None when neither names a site."""
    if state is not None:
        return state / POLICY_FILE
    if name is not None:
        from fedloom.pki.common import site_state_dir

        return site_state_dir(workspace, name) / POLICY_FILE
    return None


def policy_path(
    workspace: Path, name: str | None, state: Path | None, given: Path | None, option: str
) -> Path:
    """The policy file a command works on: ``given`` (its ``option``), else the site's
    own; a usage error (exit code 2) if nothing names one."""
    path = given or site_policy(workspace, name, state)
    if path is None:
        here = Path(POLICY_FILE)
        stray = (
            f"; {here.resolve()} is not read unless named: {option} {here}"
            if here.is_file()
            else ""
        )
        raise typer.BadParameter(
            f"none given: name the site whose policy it is, --name SITE for "
            f"{workspace / 'sites' / 'SITE' / POLICY_FILE}, where `fedloom collaborator "
            f"start --name SITE` reads it (--state DIR as the collaborator's --state), or "
            f"another file with {option} FILE{stray}",
            param_hint=f"'--name', '--state' or '{option}'",
        )
    return path


def _naming(name: str | None, state: Path | None, given: Path | None, option: str) -> str:
    """The options that name the same policy file again, for the next command shown."""
    if given is not None:
        return f"{option} {given}"
    return f"--state {state}" if state is not None else f"--name {name}"


@policy_app.command("check")
@friendly
def check(
    workspace: WorkspaceArg,
    overrides: Overrides = None,
    name: NameOption = None,
    state: StateOption = None,
    policy: PolicyOption = None,
) -> None:
    """Check the workspace's plan against a site policy, as the site's collaborator does
    before it reads any data. Exit code 12 if the plan breaks a rule."""
    from fedloom.plan import load_plan, plan_hash
    from fedloom.privacy.policy import check_policy, load_policy, policy_refusal, policy_warnings

    policy = policy_path(workspace, name, state, policy, "--policy")
    console.print(f"site policy: {escape(str(policy))}", highlight=False)
    plan = load_plan(workspace, overrides or [])
    digest = plan_hash(plan, workspace)
    console.print(f"plan hash {digest}", highlight=False)
    rules = load_policy(policy)
    for warning in policy_warnings(rules):
        console.print(f"[yellow]warning:[/] {escape(warning)}", highlight=False)
    violations = check_policy(rules, plan, digest)
    if violations:
        raise policy_refusal(violations, source=str(policy))
    console.print(
        f"[green]allowed:[/] the plan meets every rule of {escape(str(policy))}", highlight=False
    )
    if rules.metrics is not None and not rules.metrics.sample_level:
        console.print("metrics: none leaves this site (metrics.sample_level: false)")
    elif rules.metrics is not None and rules.metrics.allowed is not None:
        allowed = ", ".join(rules.metrics.allowed) or "none"
        console.print(f"metrics that may leave this site: {escape(allowed)}", highlight=False)


@policy_app.command("init")
@friendly
def init(
    workspace: WorkspaceArg,
    overrides: Overrides = None,
    name: NameOption = None,
    state: StateOption = None,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            help="Write it elsewhere (the collaborator reads it only with --policy FILE).",
        ),
    ] = None,
    force: Annotated[bool, typer.Option(help="Overwrite an existing file.")] = False,
) -> None:
    """Write a starting policy: it approves the plan as it is now, and takes the plan's
    privacy settings as its minimums. Review and tighten it before use."""
    from fedloom.plan import _StrictLoader, load_plan, plan_hash
    from fedloom.privacy.policy import validate_policy

    """Write a starting policy where the site's collaborator reads it: it approves the
    plan as it is now, and takes the plan's privacy settings as its minimums. Review
    and tighten it before use."""
    path = policy_path(workspace, name, state, out, "--out")
    naming = _naming(name, state, out, "--policy")
    plan = load_plan(workspace, overrides or [])
    digest = plan_hash(plan, workspace)
    if path.exists() and not force:
        raise PolicyError(
            f"{path} exists",
            hint="pass --force to overwrite it, or add this plan to it with "
            f"`fedloom policy approve {workspace} {naming}`",
        )
    text = starting_policy(plan, digest, workspace)
    validate_policy(yaml.load(text, Loader=_StrictLoader), source=str(path))  # noqa: S506
    _write(path, text)
    console.print(f"Wrote {escape(str(path))}. It approves the plan as it is now:", highlight=False)
    console.print(f"plan hash {digest}", highlight=False)
    console.print(_read_by(workspace, name, state, path), highlight=False)
    console.print("Review it, tighten it to what your regulator demands, then check a plan:")
    console.print(
        f"[cyan]fedloom policy check {escape(str(workspace))} {escape(naming)}[/]",
        highlight=False,
    )


def _read_by(workspace: Path, name: str | None, state: Path | None, path: Path) -> str:
    """Which collaborator reads the policy at ``path``, and with which options."""
    own = site_policy(workspace, name, state)
    site = escape(name or "SITE")
    start = f"fedloom collaborator start {escape(str(workspace))} --name {site}"
    if state is not None:
        start += f" --state {escape(str(state))}"
    if own is not None and own.resolve() == path.resolve():
        return f"The collaborator reads it there: [cyan]{start}[/]"
    return (
        f"The collaborator reads it only when named: [cyan]{start} --policy {escape(str(path))}[/]"
    )


@policy_app.command("approve")
@friendly
def approve(
    workspace: WorkspaceArg,
    overrides: Overrides = None,
    name: NameOption = None,
    state: StateOption = None,
    policy: PolicyOption = None,
) -> None:
    """Add the workspace's plan hash to the policy's approved_plans, once you have
    reviewed the plan (`fedloom plan show`) and its task code."""
    from fedloom.plan import load_plan, plan_hash
    from fedloom.privacy.policy import check_policy, load_policy

    policy = policy_path(workspace, name, state, policy, "--policy")
    console.print(f"site policy: {escape(str(policy))}", highlight=False)
    plan = load_plan(workspace, overrides or [])
    digest = plan_hash(plan, workspace)
    rules = load_policy(policy)
    approved = rules.approved_plans or ()
    if digest in approved:
        console.print(f"plan hash {digest} is already approved in {policy}", highlight=False)
    else:
        kept = _approve(policy, rules, digest, f"{plan.name}, approved {datetime.date.today()}")
        total = count(len(approved) + 1, "plan")
        console.print(
            f"approved: plan hash {digest} added to {escape(str(policy))} ({total} approved)",
            highlight=False,
        )
        if rules.approved_plans is None:
            console.print(
                "[yellow]note:[/] the policy accepted any plan before; now only the plans "
                "in approved_plans pass"
            )
        if not kept:
            console.print(
                f"[yellow]note:[/] approved_plans in {escape(str(policy))} is not a plain "
                "list, so the file was rewritten from its values: its comments were not kept",
                highlight=False,
            )
    left = check_policy(load_policy(policy), plan, digest)
    if left:
        rules_left = ", ".join(v.rule for v in left)
        console.print(
            f"[yellow]note:[/] the plan still breaks {count(len(left), 'rule')} of the "
            f"policy ({rules_left}); `fedloom policy check` says how to fix each",
            highlight=False,
        )


# ----------------------------------------------------------------- writing policies


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
    name: str, about: str, *, active: bool, entries: list[tuple[str, Any, str | None]]
) -> str:
    """A policy section, commented out unless ``active``. An entry whose value is a
    :class:`_Off` is written commented out, with the value as an example."""
    intro = about if active else f"{about} The plan has none; to require it, uncomment:"
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


def _approve(path: Path, policy: Policy, digest: str, note: str) -> bool:
    """Add ``digest`` to the policy file's approved_plans; True if the file's comments and
    layout were kept (a line added), False if it had to be rewritten from its values.
    Either text is read back, and written only if it is the old policy plus ``digest``."""
    wanted = policy.model_copy(update={"approved_plans": (*(policy.approved_plans or ()), digest)})
    edited = _with_item(path.read_text(encoding="utf-8"), f"{_scalar(digest)}  # {note}")
    if _reads_as(edited, wanted):
        _write(path, edited)
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
    _write(path, rewritten)
    return False


def _reads_as(text: str, wanted: Policy) -> bool:
    from fedloom.plan import _StrictLoader
    from fedloom.privacy.policy import validate_policy

    try:
        read = validate_policy(yaml.load(text, Loader=_StrictLoader))  # noqa: S506
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


def _write(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename, keeping the
    mode of the file it replaces: a crash leaves the old policy or the new one."""
    from fedloom.pki.common import write_atomic

    path.parent.mkdir(parents=True, exist_ok=True)
    mode = path.stat().st_mode & 0o777 if path.exists() else 0o644
    write_atomic(path, text.encode("utf-8"), mode=mode, error=PolicyError)
