"""cmscale: scaling-law studies of consistency models (ECT, sCT, sCD).

Layout (imports only point down; see README's "Layout" and tests/test_imports.py): ``rundir``
(the on-disk contract), ``models``, ``data``, ``distributed``, ``config``, ``methods`` (the only
method switch), ``eval``, ``train``, ``cluster`` (executors, launchers), ``sweep``, ``tune``,
``results`` (the DuckDB store), ``analysis``, ``demo``, and ``cli`` (the only user of click).
"""

import warnings

# torchvision (imported by torch-fidelity) scripts a helper at import time, and torch 2.14 warns
# that torch.jit.script is deprecated; the warning is about torchvision, not about anything a
# cmscale user can change, so it would only clutter every run's log.
warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)

__version__ = "0.1.0"
