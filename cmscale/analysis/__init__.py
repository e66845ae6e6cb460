"""cmscale.analysis."""
