"""The regularised-likelihood engine shared by class2d, class3d and refine3d.

Layers (dimension-agnostic core first):

* :mod:`components` - the Fourier components inside the current resolution, flattened
  (one half of Fourier space, each Hermitian pair once); everything in the E-step and the
  sufficient statistics works on (batch, M) tensors of these components.
* :mod:`expectation` - scoring as matrix products, posteriors, coarse-to-fine passes.
* :mod:`maximisation` - additive sufficient statistics (``SufficientStats.__add__``).
* :mod:`reconstruct` - Wiener/MAP reconstruction, FSC, tau^2, resolution.
* :mod:`model` - the model (references, sigma^2, tau^2, priors) and model.star.
* dimension-specific pieces: :mod:`projector3d` (rotate/sample a 3D reference, insert
  3D data back), :mod:`healpix` and :mod:`sampling` (rotation and translation grids).
  A 2D client supplies the same two callables (project, insert) for 2D rotations.
* clients: :mod:`refine` (gold-standard auto-refine) and :mod:`classify` (class3d).
"""
