"""A live, read-only web page over the aggregator's state (``fedloom dashboard``, and
``fedloom aggregator start --dashboard``): the run, the round under way, every site's
status and last contact, failures and their reasons, metric curves, the privacy spent
and the bytes moved."""

from fedloom.dashboard.access import TOKEN_ENV, exposure_problem, token_from
from fedloom.dashboard.server import DEFAULT_HOST, DEFAULT_PORT, Dashboard
from fedloom.dashboard.view import SiteStatus, dashboard_view

__all__ = [
    "DEFAULT_HOST",
    "DEFAULT_PORT",
    "TOKEN_ENV",
    "Dashboard",
    "SiteStatus",
    "dashboard_view",
    "exposure_problem",
    "token_from",
]
