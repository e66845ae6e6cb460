"""cmscale.data."""
