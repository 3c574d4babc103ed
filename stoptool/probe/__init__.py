"""Frozen-feature probes: logistic regression, a torch linear layer, k-NN (paper §5)."""

from stoptool.probe.features import extract_features, pooled_features
from stoptool.probe.knn import knn_probe
from stoptool.probe.linear import linear_probe
from stoptool.probe.logreg import logreg_probe
from stoptool.probe.run import ProbeConfig, ProbeReport, run_probe
from stoptool.probe.subset import balanced_subset

__all__ = [
    "ProbeConfig", "ProbeReport", "balanced_subset", "extract_features", "knn_probe",
    "linear_probe", "logreg_probe", "pooled_features", "run_probe",
]
