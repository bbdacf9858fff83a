"""The NumPyro model as functions of the flat unconstrained θ: adapter, predictor, row slicing, rank-one
blocks."""

from numpyro_mpe.model.adapter import LatentSite, ModelAdapter, ObservedSite

__all__ = ["LatentSite", "ModelAdapter", "ObservedSite"]
