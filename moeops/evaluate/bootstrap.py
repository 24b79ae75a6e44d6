"""The paired bootstrap the gate judges a candidate with, torch-free (numpy + scipy), so that the canary's
quality probe (moeops.rollout.probe) judges exactly as the gate does from a serving image without torch."""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
import scipy.stats


def relative_change(candidate_bits_D: np.ndarray, champion_bits_D: np.ndarray, axis: int = -1) -> np.ndarray:
    """Relative change of aggregate bits-per-byte over the same documents (the bytes cancel)."""
    champion = champion_bits_D.sum(axis)
    return (candidate_bits_D.sum(axis) - champion) / champion


def paired_bootstrap(candidate_bits_D: np.ndarray, champion_bits_D: np.ndarray, confidence: float, samples: int,
                     seed: int) -> dict[str, Any]:
    """One-sided upper bound of `relative_change` at `confidence`, resampling documents in pairs
    (scipy's BCa bootstrap; percentile when BCa is undefined, e.g. every difference is zero)."""
    point = float(relative_change(candidate_bits_D, champion_bits_D))
    if np.array_equal(candidate_bits_D, champion_bits_D):
        return {"relative_change": 0.0, "upper_bound": 0.0, "method": "identical", "documents": len(champion_bits_D)}
    for method in ("BCa", "percentile"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a degenerate BCa warns, then returns nan; we fall back
            res = scipy.stats.bootstrap((candidate_bits_D, champion_bits_D), relative_change, paired=True,
                                        vectorized=True, n_resamples=samples, confidence_level=confidence,
                                        alternative="less", method=method, rng=np.random.default_rng(seed))
        upper = float(res.confidence_interval.high)
        if math.isfinite(upper):
            break
    return {"relative_change": point, "upper_bound": upper, "standard_error": float(res.standard_error),
            "method": method, "documents": len(champion_bits_D)}
