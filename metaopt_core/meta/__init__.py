"""Meta-learners behind one protocol (:mod:`~metaopt_core.meta.protocol`), found by name in the
learner registry (:mod:`~metaopt_core.meta.registry`), run by the one outer loop
(:mod:`~metaopt_core.meta.driver`) and for a pipeline by :mod:`~metaopt_core.meta.runner`. Each
built-in learner is one package under ``metaopt_core/meta/`` (``registry.BUILTIN``; import them by
name: they pull in torch-heavy modules)."""

from metaopt_core.meta.inputs import PreparedInputs
from metaopt_core.meta.protocol import LearnerBase, MetaLearner, MetaTestReport, shard_slice
from metaopt_core.meta.registry import UnknownLearnerError, get, names, reference, register, unregister

__all__ = [
    "LearnerBase",
    "MetaLearner",
    "MetaTestReport",
    "PreparedInputs",
    "UnknownLearnerError",
    "get",
    "names",
    "reference",
    "register",
    "shard_slice",
    "unregister",
]
