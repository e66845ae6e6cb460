"""Evaluation: FID through torch-fidelity (offline), cached reference statistics, sampling compute.

- :mod:`cmscale.eval.features`: the feature spaces (Inception-v3 for real data, a domain CNN for
  digits) and where their weights come from.
- :mod:`cmscale.eval.fid`: reference statistics cached per (dataset, resolution, extractor) and
  FID by ``torch_fidelity.calculate_metrics``.
- :mod:`cmscale.eval.run`: ``evaluate_model`` (what the trainer calls) and the eval rows.
- :mod:`cmscale.eval.cli`: ``cmscale eval RUN_DIR``.
"""

from cmscale.eval.features import (
    DIGITS_CNN,
    INCEPTION,
    FeatureSpace,
    InceptionWeightsNotFoundError,
    feature_space,
    resolve_inception_weights,
)
from cmscale.eval.fid import fid_between, fid_to_reference, reference_statistics
from cmscale.eval.run import EVAL_ROW_KEYS, eval_num_samples, evaluate_model, prepare_eval

__all__ = [
    "DIGITS_CNN",
    "EVAL_ROW_KEYS",
    "INCEPTION",
    "FeatureSpace",
    "InceptionWeightsNotFoundError",
    "eval_num_samples",
    "evaluate_model",
    "feature_space",
    "fid_between",
    "fid_to_reference",
    "prepare_eval",
    "reference_statistics",
    "resolve_inception_weights",
]
