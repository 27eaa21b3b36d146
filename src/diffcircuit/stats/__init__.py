"""Statistics over images (numpy/scipy only): bootstrap intervals, permutation tests, corrections, effect sizes."""

from diffcircuit.stats.bootstrap import column_mean_cis, mean_ci
from diffcircuit.stats.tests import (
    cliffs_delta,
    cohens_d,
    correct_pvalues,
    paired_test,
    random_set_test,
    two_sample_test,
)

__all__ = [
    "cliffs_delta",
    "cohens_d",
    "column_mean_cis",
    "correct_pvalues",
    "mean_ci",
    "paired_test",
    "random_set_test",
    "two_sample_test",
]
