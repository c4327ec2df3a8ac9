"""The registry side of the promotion gate (:mod:`metaopt_core.gate` decides): fetch the
production version for the meta-test to re-evaluate (:func:`load_champion`), record a version's
gate decision (tags ``metaopt.gate.*``, artifact ``gate.json``), moving production under the
promotion lock when the gate promotes (:func:`apply_gate`), and promote by hand (:func:`promote`:
the same gate on the version's recorded meta-test, or an explicit override whose reason is
recorded). A rejected version stays registered, its reason on its tags."""

from __future__ import annotations

import datetime as _dt
import getpass
import json
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from metaopt_core.mlops.registry.common import (
    PROMOTION_PREFIX,
    TAG_KIND,
    ModelNotFoundError,
    truncate_tag,
)
from metaopt_core.mlops.registry.promotion import PromotionDecision, PromotionLock, current_production, reconcile, set_production
from metaopt_core.mlops.registry.resolve import ModelRef, existing_store, registered_model, resolve_version

GATE_PREFIX = "metaopt.gate."
GATE_FILE = "gate.json"


def load_champion(name: str, directory: str | Path, *, tracking_uri: str | None = None) -> tuple[str | None, Path | None]:
    """(production version, its export folder under ``directory``: the version's files, verified
    against their registered sha256, as ``metaopt_core.exports`` reads them), or (None, None) when
    ``name`` is not registered or has no production version."""
    from metaopt_core.mlops.registry.load import fetch_export

    try:
        client = existing_store(tracking_uri)
        model = registered_model(client, name)
    except ModelNotFoundError:  # no store or no such model yet: nothing to re-evaluate
        return None, None
    version = current_production(client, name)
    if version is None:
        return None, None
    role = model.tags.get(TAG_KIND) or client.get_model_version(name, version).tags.get(TAG_KIND)
    _, folder, _ = fetch_export(f"models:/{name}/{version}", role, Path(directory), tracking_uri)
    return version, folder


def gate_tags(gate: Mapping[str, Any], record: Mapping[str, Any]) -> dict[str, str]:
    """The ``metaopt.gate.*`` tags of a decision (``gate``: ``GateDecision.to_dict()``) and of what it
    was decided on (``record``: champion version, metric, settings, fingerprint)."""
    tags = {"decision": gate["decision"], "promoted": str(bool(gate["promoted"])).lower(), "reason": gate["reason"]}
    for key, value in (gate.get("numbers") or {}).items():
        tags[key] = json.dumps(value) if isinstance(value, (dict, list)) else repr(value) if isinstance(value, float) else str(value)
    for key in ("champion_version", "metric", "fingerprint"):
        tags[key] = str(record.get(key) or "none")
    tags["settings"] = json.dumps(record.get("settings") or {}, sort_keys=True)
    # which examples and domains each phase read (the summary; every id is in gate.json)
    tags["split_manifest"] = json.dumps((record.get("split_manifest") or {}).get("summary") or {}, sort_keys=True)
    return {GATE_PREFIX + key: truncate_tag(value) for key, value in tags.items()}


def apply_gate(
    name: str,
    version: int | str,
    gate: Mapping[str, Any],
    record: Mapping[str, Any],
    *,
    tracking_uri: str | None = None,
    lock_timeout_s: float = 60.0,
    lock_ttl_s: float = 120.0,
) -> PromotionDecision:
    """Record the gate's decision on ``name`` version ``version`` and promote it when the gate says
    so. ``gate``: ``GateDecision.to_dict()``; ``record``: what the meta-test ran on (``champion_version``
    it re-evaluated, ``metric``, ``greater_is_better``, ``settings``, ``fingerprint``,
    ``split_manifest``, ``paired``, ``units``). Under the promotion lock: if production moved since
    the meta-test re-evaluated its champion, the challenger is rejected (it was not compared with
    the version it would replace). Tags ``metaopt.gate.*`` and ``metaopt.promotion.*`` and the
    artifact ``gate.json`` (on the version's logged model, else its run) record it all."""
    version = str(int(version))
    client = existing_store(tracking_uri)
    metric = str(record.get("metric") or "")
    compared = record.get("champion_version") or None
    with PromotionLock(client, name, ttl_s=lock_ttl_s, timeout_s=lock_timeout_s):
        champion = current_production(client, name)
        promoted, decision, reason = bool(gate["promoted"]), str(gate["decision"]), str(gate["reason"])
        # champion == version: a retry of a registration step whose earlier attempt promoted it already
        if promoted and champion != compared and champion != version:
            promoted, decision = False, "rejected"
            reason = f"rejected: production moved from version {compared or 'none'} to {champion} during this run; the gate compared with {compared or 'no champion'}"
        gate = {**gate, "promoted": promoted, "decision": decision, "reason": reason}
        tags = gate_tags(gate, record)
        tags.update({PROMOTION_PREFIX + "decision": decision, PROMOTION_PREFIX + "reason": truncate_tag(reason),
                     PROMOTION_PREFIX + "metric": metric, PROMOTION_PREFIX + "champion_version": str(compared or "none"),
                     PROMOTION_PREFIX + "decided_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")})  # fmt: skip
        for key, value in tags.items():
            client.set_model_version_tag(name, version, key, value)
        if promoted:
            set_production(client, name, version)
            if champion is not None and champion != version:
                client.set_model_version_tag(name, champion, PROMOTION_PREFIX + "replaced_by", version)
        current = reconcile(client, name)
    _log_gate_file(client, name, version, {"name": name, "version": version, **gate, **dict(record)})
    numbers = gate.get("numbers") or {}
    return PromotionDecision(
        name=name, version=version, promoted=promoted, decision=decision, reason=reason, metric=metric,
        challenger_score=numbers.get("challenger_mean"), champion_version=compared, champion_score=numbers.get("champion_mean"),
        margin=float(numbers.get("margin", 0.0)), greater_is_better=bool(record.get("greater_is_better", True)), production_version=current,
    )  # fmt: skip


def recorded_decision(name: str, version: int | str, *, tracking_uri: str | None = None) -> PromotionDecision | None:
    """The gate decision :func:`apply_gate` recorded on ``name`` version ``version``, or None when it
    recorded none, or not all of it (the ``gate.json`` artifact is its last write): a retried
    registration step reuses a complete record instead of deciding again."""
    version = str(int(version))
    client = existing_store(tracking_uri)
    tags = client.get_model_version(name, version).tags
    if GATE_PREFIX + "artifact" not in tags or GATE_PREFIX + "decision" not in tags:
        return None

    def number(key: str) -> float | None:
        try:
            return float(tags[GATE_PREFIX + key])
        except (KeyError, ValueError):
            return None

    compared = tags.get(GATE_PREFIX + "champion_version", "none")
    return PromotionDecision(
        name=name, version=version, promoted=tags.get(GATE_PREFIX + "promoted") == "true", decision=tags[GATE_PREFIX + "decision"],
        reason=tags.get(GATE_PREFIX + "reason", ""), metric=tags.get(GATE_PREFIX + "metric", ""), challenger_score=number("challenger_mean"),
        champion_version=None if compared == "none" else compared, champion_score=number("champion_mean"), margin=number("margin") or 0.0,
        greater_is_better=tags.get(GATE_PREFIX + "greater_is_better", "True") != "False", production_version=current_production(client, name),
    )  # fmt: skip


def recorded_gate_inputs(name: str, version: int | str, *, tracking_uri: str | None = None) -> dict | None:
    """The ``gate.json`` a pipeline recorded on ``name`` version ``version`` (its meta-test's paired
    scores, units, settings, the champion it re-evaluated, the decision), or None without one."""
    import mlflow

    client = existing_store(tracking_uri)
    where = client.get_model_version(name, str(int(version))).tags.get(GATE_PREFIX + "artifact")
    if not where:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        path = mlflow.artifacts.download_artifacts(artifact_uri=where, dst_path=tmp, tracking_uri=tracking_uri or mlflow.get_tracking_uri())
        return json.loads(Path(path).read_text())


def promote(
    name: str,
    version: int | str,
    *,
    margin: float | None = None,
    confidence: float | None = None,
    override_reason: str | None = None,
    tracking_uri: str | None = None,
    lock_timeout_s: float = 60.0,
    lock_ttl_s: float = 120.0,
) -> PromotionDecision:
    """Promote ``name`` version ``version`` by hand, by the same rule as the pipelines.

    Without ``override_reason``: the gate (:func:`metaopt_core.gate.decide_gate`) on the version's
    recorded meta-test (``gate.json``), with ``margin`` and ``confidence`` (default: the ones the
    pipeline used). A version without a recorded meta-test, or whose meta-test re-evaluated another
    production version than today's, is rejected with that reason: only a meta-test run against the
    current production version can show that it beats it. With ``override_reason`` (non-empty):
    promoted regardless, the reason, who and when recorded as ``metaopt.promotion.*`` tags
    (decision ``overridden``). Returns the decision; a rejection is a normal outcome."""
    from metaopt_core.gate import CHALLENGER, decide_recorded

    if isinstance(version, bool) or not str(version).isdigit():
        raise ValueError(f"version: got {version!r}; allowed: a version number such as 3")
    if override_reason is not None and (not isinstance(override_reason, str) or not override_reason.strip()):
        raise ValueError("override_reason: got an empty reason; allowed: a sentence saying why the gate is overridden (it is recorded)")
    version = str(int(version))
    client = existing_store(tracking_uri)
    resolve_version(client, ModelRef(name, version=version), f"models:/{name}/{version}")
    record = recorded_gate_inputs(name, version, tracking_uri=tracking_uri)
    numbers = (record or {}).get("numbers") or {}
    margin = float(numbers.get("margin", 0.0)) if margin is None else margin
    confidence = float(numbers.get("confidence", 0.95)) if confidence is None else confidence
    if override_reason is not None:
        return _override(client, name, version, override_reason.strip(), record, lock_timeout_s, lock_ttl_s)
    if not record or CHALLENGER not in (record.get("paired") or {}):
        reason = (f"rejected: version {version} has no recorded meta-test (paired scores against tuned baselines), so nothing shows it "
                  f"beats them; meta-train and meta-test it with the pipeline (`metaopt run`), or override with a recorded reason")  # fmt: skip
        return _record_rejection(client, name, version, reason, record, lock_timeout_s, lock_ttl_s)
    gate = decide_recorded(record, margin=margin, confidence=confidence)
    return apply_gate(name, version, gate.to_dict(), record, tracking_uri=tracking_uri, lock_timeout_s=lock_timeout_s, lock_ttl_s=lock_ttl_s)


def _promotion_tags(decision: str, reason: str, champion: str | None, record: Mapping[str, Any] | None, **extra: str) -> dict[str, str]:
    tags = {"decision": decision, "reason": reason, "metric": str((record or {}).get("metric") or "none"),
            "champion_version": str(champion or "none"), "decided_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), **extra}  # fmt: skip
    return {PROMOTION_PREFIX + key: truncate_tag(value) for key, value in tags.items()}


def _record_rejection(
    client: Any, name: str, version: str, reason: str, record: Mapping[str, Any] | None, lock_timeout_s: float, lock_ttl_s: float
) -> PromotionDecision:
    with PromotionLock(client, name, ttl_s=lock_ttl_s, timeout_s=lock_timeout_s):
        champion = current_production(client, name)
        for key, value in _promotion_tags("rejected", reason, champion, record).items():
            client.set_model_version_tag(name, version, key, value)
    return PromotionDecision(name=name, version=version, promoted=False, decision="rejected", reason=reason, metric=str((record or {}).get("metric") or ""),
                             challenger_score=None, champion_version=champion, champion_score=None, margin=0.0,
                             greater_is_better=bool((record or {}).get("greater_is_better", True)), production_version=champion)  # fmt: skip


def _override(client: Any, name: str, version: str, why: str, record: Mapping[str, Any] | None, lock_timeout_s: float, lock_ttl_s: float) -> PromotionDecision:
    gate_said = str((record or {}).get("reason") or "no recorded meta-test")
    reason = f"overridden by hand: {why} (the gate said: {gate_said})"
    with PromotionLock(client, name, ttl_s=lock_ttl_s, timeout_s=lock_timeout_s):
        champion = current_production(client, name)
        tags = _promotion_tags("overridden", reason, champion, record, override_reason=why, overridden_by=_user())
        for key, value in tags.items():
            client.set_model_version_tag(name, version, key, value)
        if champion != version:
            set_production(client, name, version)
            if champion is not None:
                client.set_model_version_tag(name, champion, PROMOTION_PREFIX + "replaced_by", version)
        current = reconcile(client, name)
    return PromotionDecision(name=name, version=version, promoted=True, decision="overridden", reason=reason, metric=str((record or {}).get("metric") or ""),
                             challenger_score=None, champion_version=champion, champion_score=None, margin=0.0,
                             greater_is_better=bool((record or {}).get("greater_is_better", True)), production_version=current)  # fmt: skip


def _user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no login name in a container: still record the override
        return "unknown"


def _log_gate_file(client: Any, name: str, version: str, doc: Mapping[str, Any]) -> None:
    mv = client.get_model_version(name, version)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / GATE_FILE
        path.write_text(json.dumps(doc, indent=2, default=str))
        model_id = getattr(mv, "model_id", None)
        if model_id:
            client.log_model_artifact(model_id, str(path))
            where = f"models:/{model_id}/{GATE_FILE}"
        else:
            client.log_artifact(mv.run_id, str(path), f"registry/{name}/{version}")
            where = f"runs:/{mv.run_id}/registry/{name}/{version}/{GATE_FILE}"
    client.set_model_version_tag(name, version, GATE_PREFIX + "artifact", where)


__all__ = ["GATE_FILE", "GATE_PREFIX", "apply_gate", "gate_tags", "load_champion", "promote", "recorded_decision", "recorded_gate_inputs"]
