"""Example specs shipped with the package (the demo sweep)."""
