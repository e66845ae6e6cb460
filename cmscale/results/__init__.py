"""cmscale.results."""
