"""Loss functions: the learnable Taylor family and the hand-designed robust baselines."""

from metaopt_core.losses.taylor import PRESETS, TaylorLoss, exponents, num_params, polynomial, taylor_loss

__all__ = ["PRESETS", "TaylorLoss", "exponents", "num_params", "polynomial", "taylor_loss"]
