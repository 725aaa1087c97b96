"""The one error type of the perturb package."""


class PerturbError(ValueError):
    """A perturbation that cannot run as asked; the message says how to fix it."""
