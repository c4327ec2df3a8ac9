"""Hypergradients for bilevel meta-learning (pure torch).

- :func:`implicit_hypergradient` — IFT hypergradient at an inner optimum, inverse Hessian by a
  truncated Neumann series or conjugate gradients, Hessian-vector products only (ITL, MetaMD).
- :func:`unrolled_hypergradient` / :func:`forward_mode_hypergradient` — exact hypergradient of
  T steps of (momentum) SGD, by reverse or forward mode (validation, tiny meta-models).
- :func:`pcgrad` — gradient surgery to combine per-task hypergradients.
"""

from .implicit import ALLOWED_METHODS, HypergradResult, implicit_hypergradient
from .surgery import pcgrad
from .unrolled import forward_mode_hypergradient, unrolled_hypergradient

__all__ = [
    "ALLOWED_METHODS",
    "HypergradResult",
    "implicit_hypergradient",
    "unrolled_hypergradient",
    "forward_mode_hypergradient",
    "pcgrad",
]
