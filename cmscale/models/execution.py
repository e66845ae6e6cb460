"""How a network executes: memory layout and compilation (the ``channels_last`` and ``compile`` run options).

Neither changes what the network computes, only how fast: both are kept out of the config hash.
"""

from __future__ import annotations

import torch
from torch import nn


def to_channels_last(*modules: nn.Module | None) -> None:
    """NHWC weights: cuDNN then runs convolutions in NHWC (tensor-core friendly); outputs follow the layout."""
    for module in modules:
        if module is not None:
            module.to(memory_format=torch.channels_last)


def compile_network(net: nn.Module, backend: str = "inductor") -> nn.Module:
    """``torch.compile`` the network in place; its state_dict keys (and so checkpoints) stay the same.

    Call it after taking deep copies (EMA): a copy would share the compiled callable of the original.
    Forward, backward and no-grad passes compile separately on first use; a JVP through it (sCM)
    is traced by torch.func's compile support.
    """
    net.compile(backend=backend)
    return net
