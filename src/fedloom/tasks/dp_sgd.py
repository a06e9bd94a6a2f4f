"""Sample-level DP-SGD (Abadi et al., 2016): the accounting, as pure functions.

A site that trains with DP-SGD clips every record's gradient to ``max_grad_norm`` and
adds Gaussian noise of standard deviation ``noise_multiplier * max_grad_norm`` to each
batch's sum of clipped gradients. Batches are drawn by Poisson sampling: each record
joins each batch independently with probability ``q = batch_size / n``. The privacy
spent is that of the sampled Gaussian mechanism composed over every step the site has
taken, computed here by the plan's accountant (``privacy.accountant``): Opacus's Rényi
DP analysis (``rdp``, the default) or dp-accounting's privacy loss distributions
(``pld``, tighter).

The computation is stateless: a site's epsilon follows from the plan's settings, the
size of its training split and the number of rounds it has been selected for
(:attr:`~fedloom.tasks.SiteContext.rounds_selected`, an upper bound on the rounds it
trained). A restarted collaborator, or a simulation worker serving many sites, reports
the same value as a process that has trained the site from the start.

Only the accounting lives here; :class:`~fedloom.tasks.TorchTask` runs the training.
Opacus (and with it torch) or dp-accounting is imported when an epsilon is computed, not
before.
"""

from __future__ import annotations

import math
import warnings

from fedloom.core.errors import TaskError
from fedloom.core.records import Accountant, DPSGDSettings, TrainSettings
from fedloom.tasks.base import SiteContext

# the width of the bins in which the PLD of a sampled Gaussian is discretised
# (dp-accounting's default): finer is tighter and slower
PLD_DISCRETISATION = 1e-4


def sample_rate(num_samples: int, batch_size: int) -> float:
    """Poisson sampling rate ``q``: each record joins a batch with this probability."""
    if num_samples <= 0:
        return 0.0
    return min(1.0, max(1, batch_size) / num_samples)


def steps_per_round(num_samples: int, batch_size: int, epochs: int) -> int:
    """Noised steps in one round: ``epochs * ceil(n / batch_size)``.

    Each step draws a fresh Poisson batch; an epoch is as many steps as a shuffled pass
    over the data would take, so one epoch samples every record ``ceil(n / b) * q >= 1``
    times in expectation.
    """
    if num_samples <= 0:
        return 0
    return max(0, epochs) * math.ceil(num_samples / max(1, batch_size))


def epsilon(
    *,
    noise_multiplier: float,
    sample_rate: float,
    steps: int,
    delta: float,
    accountant: Accountant = Accountant.RDP,
) -> float:
    """Epsilon at ``delta`` of ``steps`` sampled Gaussian mechanisms (add/remove one
    record), by ``accountant``: Opacus's Rényi DP analysis (RDP at Opacus's default
    orders, composed additively, then converted to (epsilon, delta)-DP), or the privacy
    loss distributions of dp-accounting's ``PLDAccountant`` (pessimistic discretisation:
    an upper bound, tighter than RDP's). Zero steps (or a zero rate) spend nothing; a
    zero noise multiplier gives ``inf``.
    """
    if steps <= 0 or sample_rate <= 0:
        return 0.0
    if noise_multiplier <= 0:
        return math.inf
    if accountant is Accountant.PLD:
        from dp_accounting import dp_event
        from dp_accounting.pld.pld_privacy_accountant import PLDAccountant

        pld = PLDAccountant(value_discretization_interval=PLD_DISCRETISATION)
        event: dp_event.DpEvent = dp_event.GaussianDpEvent(noise_multiplier)
        if sample_rate < 1:
            event = dp_event.PoissonSampledDpEvent(sample_rate, event)
        pld.compose(event, steps)
        return float(pld.get_epsilon(delta))
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

    orders = RDPAccountant.DEFAULT_ALPHAS
    rdp = compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=steps, orders=orders)
    with warnings.catch_warnings():
        # "Optimal order is the largest alpha": the bound is still valid, only looser
        warnings.filterwarnings("ignore", message="Optimal order is the", category=UserWarning)
        eps, _ = get_privacy_spent(orders=orders, rdp=rdp, delta=delta)
    return float(eps)


def site_epsilon(
    dp: DPSGDSettings, settings: TrainSettings, *, num_samples: int, rounds: int
) -> float:
    """Epsilon a site has spent after training ``rounds`` rounds with these settings.

    Every round is assumed to have had ``settings``' epochs and batch size over the
    same ``num_samples`` records: the current round's settings stand for the past ones.
    """
    steps = steps_per_round(num_samples, settings.batch_size, settings.epochs)
    return epsilon(
        noise_multiplier=dp.noise_multiplier,
        sample_rate=sample_rate(num_samples, settings.batch_size),
        steps=max(0, rounds) * steps,
        delta=dp.delta,
        accountant=dp.accountant,
    )


def _refusal(task_name: str) -> TaskError:
    return TaskError(
        f"sample-level DP-SGD (privacy.dp_sgd) needs a torch task (TorchTask, which trains "
        f"through Opacus); {task_name} cannot clip and noise per-record gradients",
        hint="use TorchTask in the workspace's task module, or remove privacy.dp_sgd from "
        "the plan (privacy.dp gives user-level DP with any task)",
    )


def require_no_dp_sgd(context: SiteContext, task_name: str) -> None:
    """Refuse a round that asks for DP-SGD from a task that cannot clip per record."""
    if context.dp_sgd is not None:
        raise _refusal(task_name)


def check_task_supports(task: object, asked: bool) -> None:
    """Refuse at once (before any round) a plan that asks for DP-SGD from a task that
    cannot do it, with the same message a site would give."""
    if asked and not getattr(task, "supports_dp_sgd", False):
        raise _refusal(type(task).__name__)
