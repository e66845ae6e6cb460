"""cmscale.models."""
