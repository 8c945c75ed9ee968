"""Optimiser wrappers the suite adds to timm's factory (``optimizer.sam_rho``: sharpness-aware minimisation)."""
