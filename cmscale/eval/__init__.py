"""Evaluation: FID through torch-fidelity (offline), cached reference statistics, sampling compute.

- :mod:`cmscale.eval.features`: the feature spaces (Inception-v3 for real data, a domain CNN for
  digits) and where their weights come from.
- :mod:`cmscale.eval.fid`: reference statistics cached per (dataset, resolution, extractor) and
  FID by ``torch_fidelity.calculate_metrics``.
- :mod:`cmscale.eval.run`: ``evaluate_model`` (what the trainer calls) and the eval rows.
- :mod:`cmscale.eval.cache`: the cache folder and its file locks.

The command ``cmscale eval RUN_DIR`` lives in :mod:`cmscale.cli.eval`. Nothing here imports
:mod:`cmscale.train`: the trainer calls evaluation, never the other way round.
"""

from importlib import import_module

# Importing torch and torch-fidelity costs seconds: names resolve on first use, so that
# `cmscale --help` and the CLI modules that only register `cmscale eval` stay fast.
_EXPORTS = {
    "DIGITS_CNN": "features",
    "INCEPTION": "features",
    "FeatureSpace": "features",
    "InceptionWeightsNotFoundError": "features",
    "feature_space": "features",
    "resolve_inception_weights": "features",
    "fid_between": "fid",
    "fid_to_reference": "fid",
    "reference_statistics": "fid",
    "EVAL_ROW_KEYS": "run",
    "eval_num_samples": "run",
    "evaluate_model": "run",
}


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(f"cmscale.eval.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'cmscale.eval' has no attribute {name!r}")


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
    "reference_statistics",
    "resolve_inception_weights",
]
