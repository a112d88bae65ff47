"""Simulation of realistic cryo-ET projects with ground truth (``subtomo simulate``).

Modules: ``potential`` (atomic model -> potential map, Peng 1996 scattering factors),
``sample`` (placement of particles, gold beads and junk in the ice slab), ``tiltseries``
(Fourier-slice projection with per-object CTF, dose damage, MTF, ice and shot noise),
``reconstruct`` (weighted back-projection), ``presets`` (parameters and the tiny / demo /
benchmark presets) and ``project`` (writes ``Tomograms/`` and ``GroundTruth/``).
"""
