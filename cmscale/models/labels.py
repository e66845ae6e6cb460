"""Class labels as networks take them: one-hot float vectors [N, label_dim].

Every class-conditional network in cmscale (EDM2's, and EDM's DDPM++ and ADM with ``label_dim``)
accepts int class indices [N] or one-hot (or soft) float labels [N, label_dim]; None is the
all-zero label, EDM's and EDM2's convention for a conditional network called without labels
(the unconditional branch that label dropout trains).
"""

from __future__ import annotations

import torch
from torch.nn import functional as F


def label_vector(class_labels: torch.Tensor | None, label_dim: int, batch: int, like: torch.Tensor) -> torch.Tensor:
    """``class_labels`` as float [batch, label_dim] in ``like``'s dtype and device; refuses out-of-range indices."""
    if class_labels is None:
        return torch.zeros(1, label_dim, dtype=like.dtype, device=like.device).expand(batch, -1)
    if not class_labels.is_floating_point():
        labels = class_labels.reshape(-1)
        if labels.numel() and not labels.is_meta and (labels.min() < 0 or labels.max() >= label_dim):
            raise ValueError(f"class_labels must be class indices in [0, {label_dim}), got values in "
                             f"[{int(labels.min())}, {int(labels.max())}]")
        return F.one_hot(labels.to(like.device), label_dim).to(like.dtype)
    if class_labels.ndim != 2 or class_labels.shape[1] != label_dim:
        raise ValueError(f"class_labels must be int indices [N] or one-hot [N, {label_dim}], "
                         f"got shape {tuple(class_labels.shape)}")
    return class_labels.to(like.dtype)
