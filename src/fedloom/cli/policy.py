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
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
import yaml
from rich.markup import escape

from fedloom.cli.common import Overrides, WorkspaceArg, console, count, friendly, site_name
from fedloom.cli.policy_file import approve_plan, starting_policy, write_policy
from fedloom.core.errors import PolicyError

# The plan and the policy (pydantic) are imported by each command as it runs: `fedloom
# --help` stays light.
if TYPE_CHECKING:
    pass

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
    from fedloom.core.strict_yaml import StrictLoader
    from fedloom.plan import load_plan, plan_hash
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
    validate_policy(yaml.load(text, Loader=StrictLoader), source=str(path))  # noqa: S506
    write_policy(path, text)
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
        kept = approve_plan(policy, rules, digest, f"{plan.name}, approved {datetime.date.today()}")
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
