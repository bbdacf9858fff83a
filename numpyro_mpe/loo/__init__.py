"""Leave-one-out over a Fit: one public concept per module."""
