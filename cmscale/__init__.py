"""cmscale: scaling-law studies of consistency models (ECT, sCT, sCD)."""

import warnings

# torchvision (imported by torch-fidelity) scripts a helper at import time, and torch 2.14 warns
# that torch.jit.script is deprecated; the warning is about torchvision, not about anything a
# cmscale user can change, so it would only clutter every run's log.
warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)

__version__ = "0.1.0"
