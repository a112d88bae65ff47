"""The regularised-likelihood engine shared by class2d, class3d and refine3d."""
