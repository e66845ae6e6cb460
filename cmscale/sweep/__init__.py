"""cmscale.sweep."""
