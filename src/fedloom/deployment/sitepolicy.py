"""What a site checks before it touches its data: the data owner's policy and the
privacy budget it keeps.

:func:`site_policy_files` finds the policy a collaborator enforces (and the
``policy.yaml`` files it leaves unread), :func:`enforce_policy` checks the plan
against it, and :func:`site_budget` is this site's own count of DP updates.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from fedloom.pki.common import site_state_dir
from fedloom.plan import Plan
from fedloom.privacy.budget import SPENT_FILE, SiteBudget
from fedloom.privacy.policy import (
    POLICY_FILE,
    Policy,
    check_policy,
    load_policy,
    policy_refusal,
    policy_warnings,
)

log = logging.getLogger("fedloom.collaborator")


@dataclass(frozen=True)
class PolicyFiles:
    """The site policy a collaborator enforces, and the ``policy.yaml`` files it found
    where a data owner may have put one and that it does not read: a policy in the
    wrong place must not go unnoticed."""

    path: Path  # the policy it checks the plan against, or where it looked for one
    in_use: bool  # False: there is no policy, and the site enforces only the plan
    unused: tuple[Path, ...]


def site_policy_files(ws: Path, name: str, state_dir: Path, given: Path | None) -> PolicyFiles:
    """Which policy the collaborator of ``name`` reads (``given``, else
    STATE/policy.yaml if it exists) and the ``policy.yaml`` files it leaves unread in
    the current folder, the workspace, the site's default state folder and STATE."""
    path = given if given is not None else state_dir / POLICY_FILE
    places = (Path.cwd(), ws, site_state_dir(ws, name), state_dir)
    unused: dict[Path, Path] = {}
    for place in places:
        found = place / POLICY_FILE
        if found.is_file() and found.resolve() != path.resolve():
            unused.setdefault(found.resolve(), found)
    return PolicyFiles(path, given is not None or path.is_file(), tuple(unused.values()))


def enforce_policy(plan: Plan, digest: str, files: PolicyFiles) -> Policy | None:
    """The site's policy (``files.path``), after checking the plan against it:
    :class:`PolicyError` naming every broken rule if it fails; None without one."""
    for other in files.unused:
        log.warning("%s is not read: this site's policy is %s", other, files.path)
    if not files.in_use:
        log.warning(
            "no site policy (%s): this site enforces nothing beyond the plan; write one "
            "with `fedloom policy init`",
            files.path,
        )
        return None
    policy = load_policy(files.path)
    violations = check_policy(policy, plan, digest)
    if violations:
        raise policy_refusal(violations, source=str(files.path))
    for warning in policy_warnings(policy):
        log.warning("policy: %s", warning)
    log.info("the plan (hash %s) meets the site policy %s", digest[:12], files.path)
    return policy


def site_budget(
    plan: Plan, digest: str, policy: Policy | None, state_dir: Path
) -> SiteBudget | None:
    """This site's own count of DP updates, limited by the plan's epsilon budget or its
    policy's max_epsilon, whichever is lower; None when neither sets a limit."""
    dp = plan.privacy.dp
    if dp is None:
        return None
    limits = [dp.epsilon_budget]
    if policy is not None and policy.dp is not None:
        limits.append(policy.dp.max_epsilon)
    known = [x for x in limits if x is not None]
    if not known:
        return None
    return SiteBudget(
        state_dir / SPENT_FILE,
        plan_hash=digest,
        noise_multiplier=dp.noise_multiplier,
        delta=dp.delta,
        limit=min(known),
        accountant=plan.privacy.accountant,
    )
