"""What the new-data gate remembers: every meta-training run that finished (registered a version,
promoted or not) carries the data fingerprint and the configuration hash it trained on, and the
gate finds the last such run of a model in MLflow that ended FINISHED.

Tags on the run: ``metaopt.data_fingerprint`` (set when the run starts), ``metaopt.config_hash``,
``metaopt.meta_training = finished``, ``metaopt.model_name`` and ``metaopt.registered_version``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from metaopt_core.mlops.tracking.server import TAG_FINGERPRINT, connect

TAG_CONFIG_HASH = "metaopt.config_hash"
TAG_META_TRAINING = "metaopt.meta_training"
TAG_MODEL_NAME = "metaopt.model_name"
TAG_REGISTERED_VERSION = "metaopt.registered_version"
FINISHED = "finished"


# A dataset spec's location: a folder or bucket (``folder:<path>``, ``s3://bucket/prefix/``), and the
# local ``root`` a packaged source is read from. The data fingerprint covers what is there.
LOCATION = "<location: the data fingerprint covers the content>"


def _is_location(source: Any) -> bool:
    return isinstance(source, str) and (source.startswith("folder:") or "://" in source)


def without_locations(value: Any) -> Any:
    """A copy of a configuration with where its data lives left out: in every mapping that names a
    ``source``, a folder or bucket source becomes a placeholder and ``root`` is dropped (packaged
    sources such as ``digits`` keep their name: it says which data, not where)."""
    if isinstance(value, Mapping):
        out = {str(key): without_locations(item) for key, item in value.items()}
        if "source" in out:
            out.pop("root", None)
            if _is_location(out["source"]):
                out["source"] = LOCATION
        return out
    if isinstance(value, (list, tuple)):
        return [without_locations(item) for item in value]
    return value


def config_hash(config: Mapping[str, Any]) -> str:
    """sha256 of a resolved run configuration (canonical JSON: key order does not matter), without
    where its data lives (:func:`without_locations`): the same data under another prefix, bucket or
    volume is the same configuration, and the data fingerprint says whether it is the same data."""
    return hashlib.sha256(json.dumps(without_locations(dict(config)), sort_keys=True, separators=(",", ":")).encode()).hexdigest()


@dataclass(frozen=True)
class FinishedTraining:
    """The last finished meta-training run of a model: what it trained on and what it registered."""

    run_id: str
    fingerprint: str
    config_hash: str
    version: str
    end_time: int


def finished_training_tags(model_name: str, fingerprint: str, config_digest: str, version: str) -> dict[str, str]:
    """The tags that mark a run as a finished meta-training (set after registration)."""
    return {TAG_META_TRAINING: FINISHED, TAG_MODEL_NAME: model_name, TAG_FINGERPRINT: fingerprint, TAG_CONFIG_HASH: config_digest,
            TAG_REGISTERED_VERSION: str(version)}  # fmt: skip


def last_finished_training(model_name: str, tracking_uri: str | None = None) -> FinishedTraining | None:
    """The most recently ended run of ``model_name`` tagged as a finished meta-training, in any
    experiment (None: there is none). Only runs that ended FINISHED count: a run that registered a
    version and then failed (or is still running, or was killed) did not finish, so the data it read
    is trained on again."""
    client = connect(tracking_uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    if not experiments:
        return None
    quoted = model_name.replace("'", "\\'")
    query = f"tags.`{TAG_META_TRAINING}` = '{FINISHED}' and tags.`{TAG_MODEL_NAME}` = '{quoted}' and attributes.status = 'FINISHED'"
    best = None
    for start in range(0, len(experiments), 100):  # the search takes a bounded list of experiments
        for run in client.search_runs(experiments[start : start + 100], query, max_results=50, order_by=["attributes.end_time DESC"]):
            end = run.info.end_time or run.info.start_time or 0
            if best is None or end > best.end_time:
                tags = run.data.tags
                best = FinishedTraining(run.info.run_id, tags.get(TAG_FINGERPRINT, ""), tags.get(TAG_CONFIG_HASH, ""),
                                        tags.get(TAG_REGISTERED_VERSION, ""), end)  # fmt: skip
    return best


__all__ = [
    "FINISHED",
    "TAG_CONFIG_HASH",
    "TAG_META_TRAINING",
    "TAG_MODEL_NAME",
    "TAG_REGISTERED_VERSION",
    "FinishedTraining",
    "config_hash",
    "finished_training_tags",
    "last_finished_training",
    "without_locations",
]
