"""Rotations, Euler angles, symmetry groups and orientation sampling (see docs/conventions.md)."""
