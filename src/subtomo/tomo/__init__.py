"""Tomogram geometry: per-particle 3D CTF models, position-dependent defocus, extraction."""
