"""Data: sources, image inspection, splits, the manifest, and its validation."""
