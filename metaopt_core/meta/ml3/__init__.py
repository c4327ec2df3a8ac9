"""ML3 — Meta-Learning via Learned Loss (Bechtle et al. 2021): a small neural loss network learned by
differentiating through a few inner SGD steps.

    inner:  θ_{t+1} = θ_t − η ∇_θ L_ω(f_θt(x_t), y_t)       T steps from a fresh, seeded base model
    outer:  min_ω  CE(f_θT(x_val), y_val)                    the task loss of the updated model

ω is the flat parameter vector of the loss network (:class:`NeuralLossFamily`, the ``neural`` family
of the representation table: an MLP over each class's (probability, label) plus a linear skip that
can express cross-entropy). Each outer step draws ``tasks_per_step`` tasks, takes the exact
hypergradient of each through the T unrolled steps (``hypergrad.unrolled_hypergradient``),
averages, clips and steps ω with Adam. The learned loss is exported as a ``neural-loss``
(``loss.json`` + ``loss.safetensors``), registered, served by ``load_loss`` and ``mlflow models
serve``, and meta-tested by the shared loss meta-test against tuned baselines.

Read the modules in this order:

- :mod:`.family` — the neural loss: :class:`NeuralLossFamily`, :class:`NeuralLoss`;
- :mod:`.export` — the ``neural-loss`` export kind;
- :mod:`.config` — :class:`ML3Config` and its parts;
- :mod:`.state` — :class:`ML3State` (the checkpoint) and :class:`Hypergradient`;
- :mod:`.step` — the tasks of a step, one task's hypergradient, the outer update;
- :mod:`.learner` — :class:`ML3Learner`, the protocol on top of the above (the driver runs it).
"""

from metaopt_core.meta.ml3.config import InnerConfig, LossNetwork, ML3Config, OuterConfig
from metaopt_core.meta.ml3.family import NeuralLoss, NeuralLossFamily
from metaopt_core.meta.ml3.state import Hypergradient, ML3State
from metaopt_core.meta.ml3.step import SCALAR_METRICS, hypergradient, jobs_for_step, outer_update

__all__ = [
    "SCALAR_METRICS",
    "Hypergradient",
    "InnerConfig",
    "LossNetwork",
    "ML3Config",
    "ML3State",
    "NeuralLoss",
    "NeuralLossFamily",
    "OuterConfig",
    "hypergradient",
    "jobs_for_step",
    "outer_update",
]
