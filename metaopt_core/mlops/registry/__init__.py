"""The MLflow model registry for learned losses and optimisers: register, promote, load.

A downstream training job needs two lines::

    from metaopt_core import load_loss, load_optimizer
    criterion = load_loss("models:/itl/production")              # TaylorLoss, like nn.CrossEntropyLoss
    optimizer = load_optimizer("models:/metamd/production", model)  # MirrorDescent

What a registered version holds (an MLflow model with a pyfunc flavour, logged from code so
nothing is pickled; see ``metaopt_core.mlops.pyfunc``):

- ``artifacts/export.json`` and the files of the export kind (``metaopt_core.exports``):
  ``artifacts/loss.json`` (a loss document, schema in ``metaopt_core.losses.document``),
  ``artifacts/divergence/{divergence.safetensors, manifest.json}`` (an optimiser), ...;
- a signature (probabilities + label -> loss; parameter + gradient -> step direction);
- version tags: ``metaopt.kind`` (the role), ``metaopt.export_kind``, ``metaopt.family``, the
  sha256 of every artifact file (``metaopt.sha256.<file>``), the deployment settings the meta-test
  measured and the files carry (``metaopt.deploy.lr_scale`` / ``metaopt.deploy.lr``), the
  meta-train provenance (``metaopt.config`` JSON, ``metaopt.data_fingerprint``,
  ``metaopt.git_commit``, meta-test scores as ``metaopt.score.<metric>``) and, after a promotion
  attempt, ``metaopt.promotion.*``.

Modules: ``common`` (tag names, errors, shared helpers), ``register`` (``register_export`` for any
export folder; ``register_loss``, ``register_optimizer`` for a document, module or divergence),
``resolve`` (``models:/`` URIs to versions), ``load`` (``load_loss``, ``load_optimizer``: only the
white-box files of the version's export kind, sha256-checked, never unpickled; ``integrity``: that
check, shared with the pyfunc flavour; ``fallback``: the explicit opt-in for a job that accepts an
unpromoted version), ``reuse`` (the version a killed run registered), ``promotion`` (production's
alias and stage, the promotion lock), ``gate`` (the champion for a meta-test, recording the gate's
decision: ``metaopt.gate.*`` tags, ``gate.json``; ``promote``: the same gate by hand, or an
override with its reason) and ``listing`` (``metaopt models``).
"""

from metaopt_core.mlops.registry.common import (
    ALIAS,
    DEFAULT_METRIC,
    DEPLOY_PREFIX,
    LOCK_EXPIRES,
    LOCK_OWNER,
    LOCK_SUFFIX,
    PROMOTION_PREFIX,
    PYFUNC_CODE,
    SCORE_PREFIX,
    SHA_PREFIX,
    STAGE,
    TAG_CONFIG,
    TAG_EXPORT_KIND,
    TAG_FAMILY,
    TAG_KIND,
    TAG_SCORES,
    ArtifactValidationError,
    ModelNotFoundError,
    NoProductionVersionError,
    PromotionLockTimeout,
    RegistryError,
    WrongModelKindError,
    loss_from_doc,
    validate_loss_doc,
)
from metaopt_core.mlops.registry.fallback import UnpromotedVersionWarning
from metaopt_core.mlops.registry.gate import (
    GATE_FILE,
    GATE_PREFIX,
    apply_gate,
    gate_tags,
    load_champion,
    promote,
    recorded_decision,
    recorded_gate_inputs,
)
from metaopt_core.mlops.registry.listing import architecture_of, describe_model, describe_version, iter_versions, list_models, production_fits
from metaopt_core.mlops.registry.load import fetch_export, load_loss, load_loss_doc, load_optimizer
from metaopt_core.mlops.registry.promotion import PromotionDecision, production_version, reconcile
from metaopt_core.mlops.registry.register import (
    DISTRIBUTION,
    RegisteredVersion,
    find_version,
    pip_requirements,
    register_export,
    register_loss,
    register_optimizer,
)
from metaopt_core.mlops.registry.resolve import ModelRef, parse_models_uri, resolve_version
from metaopt_core.mlops.registry.reuse import unfinished_registration
from metaopt_core.mlops.tracking import TrackingServerUnreachable, resolve_tracking_uri

__all__ = [
    "ALIAS",
    "ArtifactValidationError",
    "DEFAULT_METRIC",
    "DEPLOY_PREFIX",
    "DISTRIBUTION",
    "GATE_FILE",
    "GATE_PREFIX",
    "LOCK_EXPIRES",
    "LOCK_OWNER",
    "LOCK_SUFFIX",
    "ModelNotFoundError",
    "ModelRef",
    "NoProductionVersionError",
    "PROMOTION_PREFIX",
    "PYFUNC_CODE",
    "PromotionDecision",
    "PromotionLockTimeout",
    "RegisteredVersion",
    "RegistryError",
    "SCORE_PREFIX",
    "SHA_PREFIX",
    "STAGE",
    "TAG_CONFIG",
    "TAG_EXPORT_KIND",
    "TAG_FAMILY",
    "TAG_KIND",
    "TAG_SCORES",
    "TrackingServerUnreachable",
    "UnpromotedVersionWarning",
    "WrongModelKindError",
    "apply_gate",
    "architecture_of",
    "describe_model",
    "describe_version",
    "fetch_export",
    "find_version",
    "gate_tags",
    "iter_versions",
    "list_models",
    "load_champion",
    "load_loss",
    "load_loss_doc",
    "load_optimizer",
    "loss_from_doc",
    "parse_models_uri",
    "production_fits",
    "production_version",
    "promote",
    "reconcile",
    "recorded_decision",
    "recorded_gate_inputs",
    "pip_requirements",
    "register_export",
    "register_loss",
    "register_optimizer",
    "resolve_tracking_uri",
    "resolve_version",
    "unfinished_registration",
    "validate_loss_doc",
]
