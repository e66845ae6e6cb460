"""cmscale: scaling-law studies of consistency models (ECT, sCT, sCD)."""

__version__ = "0.1.0"
