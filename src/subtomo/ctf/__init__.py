"""Contrast transfer function: the formula, estimation from tilt images, importers."""
