"""subtomo: subtomogram averaging for electron cryo-tomography.

The workflow follows Bharat & Scheres, Nature Protocols 2016 (RELION subtomogram
averaging): import -> ctf -> prepare -> extract -> class2d -> select -> refine3d ->
class3d -> postprocess -> localres. Conventions (axes, Euler angles, Fourier layout,
units) are written down in ``docs/conventions.md``.
"""

__version__ = "0.1.0"
