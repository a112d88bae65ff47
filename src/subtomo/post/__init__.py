"""Postprocessing: masks, corrected FSC, sharpening, local resolution."""
