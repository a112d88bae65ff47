"""Readers (and writers, for round trips) of other programs' particle and tilt-series files.

One small module per source program; each module's docstring states that program's
conventions (origin, pixel size, angle order, handedness) and how they map onto ours
(``docs/conventions.md``, "Other programs' conventions"). Particle readers return
:class:`~subtomo.io.importers.picks.Picks`.
"""
