"""MetaMD's optimiser: mirror descent with a learned (Kronecker-factored) Bregman divergence.

from metaopt_core.optim import KroneckerBregman, MirrorDescent
div = KroneckerBregman.for_model(model)          # M = I: starts as SGD
opt = MirrorDescent(model.parameters(), div, lr=0.1)
...
save_divergence(div, "out/metamd", lr=0.1)
opt = MirrorDescent.from_pretrained("out/metamd", new_model)
"""

from .divergence import DenseBregman, DiagonalBregman, Divergence, ShapeMismatchError
from .io import DivergenceFormatError, attach, load_divergence, save_divergence
from .kronecker import KroneckerBlock, KroneckerBregman
from .mirror_descent import MirrorDescent

__all__ = [
    "DenseBregman",
    "DiagonalBregman",
    "Divergence",
    "DivergenceFormatError",
    "KroneckerBlock",
    "KroneckerBregman",
    "MirrorDescent",
    "ShapeMismatchError",
    "attach",
    "load_divergence",
    "save_divergence",
]
