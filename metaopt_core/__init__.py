"""metaopt_core: meta-learned losses (ARL, ITL) and optimisers (MetaMD).

Downstream jobs need two lines::

    from metaopt_core import load_loss, load_optimizer
    criterion = load_loss("models:/itl/production")

``load_loss`` / ``load_optimizer`` live in ``metaopt_core.mlops`` (the only part that imports
mlflow); they are resolved lazily so ``import metaopt_core`` stays light.
"""

from metaopt_core.losses.taylor import PRESETS, TaylorLoss

__version__ = "0.1.0"
__all__ = ["PRESETS", "TaylorLoss", "load_loss", "load_optimizer", "__version__"]


def __getattr__(name: str):
    if name in ("load_loss", "load_optimizer"):
        from metaopt_core.mlops import registry

        return getattr(registry, name)
    raise AttributeError(f"module 'metaopt_core' has no attribute {name!r}")
