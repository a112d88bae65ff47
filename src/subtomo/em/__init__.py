"""The regularised-likelihood engine shared by class2d, class3d and refine3d.

The engine computes and returns typed results; it never reads STAR columns, writes files
or draws (the jobs do, through :mod:`subtomo.io` and :mod:`subtomo.plot`). Poses are
rotation matrices (n, 3, 3) and origins (n, 3) px.

Core (dimension-agnostic first):

* :mod:`components` - the Fourier components inside the current resolution, flattened
  (one half of Fourier space, each Hermitian pair once); everything in the E-step and the
  sufficient statistics works on (batch, M) tensors of these components.
* :mod:`expectation` - scoring as matrix products, posteriors, coarse-to-fine passes.
* :mod:`maximisation` - additive sufficient statistics (``SufficientStats.__add__``).
* :mod:`reconstruct` - Wiener/MAP reconstruction, FSC, tau^2, resolution.
* :mod:`model` - the model (references, sigma^2, tau^2, priors).
* :mod:`iteration` - particle sources, pose tables and one E-step pass over a set of particles.
* dimension-specific pieces: :mod:`projector3d` (rotate/sample a 3D reference, insert
  3D data back), :mod:`healpix` and :mod:`sampling` (rotation and translation grids, and
  the auto-sampling state of a refinement), :mod:`rotations2d` (in-plane rotations).
* :mod:`maps` - masks, low-pass and rotation of reference maps; :mod:`gold_standard` -
  half sets, symmetrised half grids, the low-resolution join.

Clients (each: options, a state to continue from, a typed per-iteration result, a typed
final result, and phases initialise / iteration / loop):

* :mod:`refine` - gold-standard auto-refine; :mod:`oracle` - reconstruction with given poses;
* :mod:`classify` - 3D and focused classification; :mod:`class2d` - 2D classification;
* :mod:`symmetry_align` - put a map's symmetry axes along the standard frame.
"""
