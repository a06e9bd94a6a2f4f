"""Federated statistics: counts, sums, means, variances, histograms and approximate
quantiles over every site's table, through the data owner's controls (docs/analysis.md).

The plan's ``analysis:`` section declares them (:class:`AnalysisPlan`); each site runs
:class:`StatisticsTask` instead of training, and the run's summary holds the results
(:func:`analysis_results`)."""

from fedloom.analysis.query import AnalysisDP, AnalysisPlan, Statistic
from fedloom.analysis.results import analysis_results, totals
from fedloom.analysis.task import StatisticsTask

__all__ = [
    "AnalysisDP",
    "AnalysisPlan",
    "Statistic",
    "StatisticsTask",
    "analysis_results",
    "totals",
]
