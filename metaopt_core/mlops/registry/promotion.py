"""Champion/challenger promotion to production: the decision (a pure function), the lock that
serialises promotions of one model, and the alias/stage writes with their reconciliation.

Production is both the alias ``production`` and the (deprecated, still supported) stage
``Production``. Promotions of one model are serialised by a registered model
``<name>.promotion-lock`` (``create_registered_model`` is atomic through the backend's unique name
constraint; the lock expires after ``lock_ttl_s`` so a crashed holder cannot block forever). Under
the lock the champion is read, the decision made, the alias set first (the commit point), then the
stage; a final reconciliation makes the stage follow the alias.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import math
import random
import time
import uuid
from collections.abc import Mapping
from typing import Any

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from metaopt_core.mlops.registry.common import (
    ALIAS,
    DEFAULT_METRIC,
    LOCK_EXPIRES,
    LOCK_OWNER,
    LOCK_SUFFIX,
    PROMOTION_PREFIX,
    SCORE_PREFIX,
    STAGE,
    TAG_KIND,
    PromotionLockTimeout,
    RegistryError,
    quiet_stages,
    score_tag,
    scores_of,
    truncate_tag,
)
from metaopt_core.mlops.registry.resolve import ModelRef, existing_store, list_versions, registered_model, resolve_version


@dataclasses.dataclass(frozen=True)
class PromotionDecision:
    """The outcome of :func:`promote`, also recorded as ``metaopt.promotion.*`` tags on the version."""

    name: str
    version: str
    promoted: bool
    decision: str  # promoted | forced | rejected | unchanged
    reason: str
    metric: str
    challenger_score: float | None
    champion_version: str | None
    champion_score: float | None
    margin: float
    greater_is_better: bool
    production_version: str | None  # after the call

    def __str__(self) -> str:
        return f"{self.name} version {self.version}: {self.decision} ({self.reason})"


@dataclasses.dataclass(frozen=True)
class PromotionVerdict:
    """What :func:`decide_promotion` concludes."""

    promoted: bool
    decision: str  # promoted | forced | rejected | unchanged
    reason: str


def check_promotion_settings(metric: Any, margin: Any) -> None:
    """Raise ``ValueError`` unless ``metric`` is a non-empty name and ``margin`` a finite number >= 0."""
    if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not math.isfinite(margin) or margin < 0:
        raise ValueError(f"margin: got {margin!r}; allowed: a finite number >= 0")
    if not isinstance(metric, str) or not metric:
        raise ValueError(f"metric: got {metric!r}; allowed: a non-empty metric name")


def _score(scores: Mapping[str, Any] | None, metric: str) -> float | None:
    value = (scores or {}).get(metric)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def decide_promotion(
    challenger_scores: Mapping[str, float] | None,
    champion_scores: Mapping[str, float] | None,
    *,
    metric: str = DEFAULT_METRIC,
    greater_is_better: bool = True,
    margin: float = 0.0,
    force: bool = False,
    already_production: bool = False,
    challenger: str = "the challenger",
    champion: str = "the production version",
) -> PromotionVerdict:
    """The champion/challenger decision, without MLflow.

    ``champion_scores`` is None when there is no production version (the challenger then wins),
    and a mapping (possibly without ``metric``) when there is one. The challenger wins if its
    ``metric`` beats the champion's by more than ``margin`` (higher is better when
    ``greater_is_better``, lower otherwise); a tie is a rejection. ``already_production`` (the
    challenger is the champion) gives "unchanged", ``force`` gives "forced". A champion without
    the metric is kept (use ``force``); a challenger without it, facing a champion, is a
    ``ValueError``. ``challenger`` and ``champion`` name the two in the reason.
    """
    check_promotion_settings(metric, margin)
    if already_production:
        return PromotionVerdict(True, "unchanged", "already the production version")
    if force:
        return PromotionVerdict(True, "forced", "promotion forced")
    if champion_scores is None:
        return PromotionVerdict(True, "promoted", "no production version yet")
    challenger_score = _score(challenger_scores, metric)
    if challenger_score is None:
        raise ValueError(f"scores: {challenger} has no {metric!r} score to compare with {champion}; pass scores={{{metric!r}: value}} or force=True")
    champion_score = _score(champion_scores, metric)
    if champion_score is None:
        return PromotionVerdict(False, "rejected", f"{champion} has no {metric!r} score to compare with; use force to replace it")
    delta = challenger_score - champion_score if greater_is_better else champion_score - challenger_score
    promoted = delta > margin
    relation = "beats" if promoted else "does not beat"
    better = "higher" if greater_is_better else "lower"
    reason = f"{metric} {challenger_score:.6g} {relation} {champion}'s {champion_score:.6g} by more than the margin {margin:g} ({better} is better)"
    return PromotionVerdict(promoted, "promoted" if promoted else "rejected", reason)


class PromotionLock:
    """Mutual exclusion between promotions of one model, held as a registered model ``<name>.promotion-lock``."""

    def __init__(self, client: MlflowClient, name: str, ttl_s: float, timeout_s: float) -> None:
        self.client, self.name = client, name + LOCK_SUFFIX
        self.ttl_s, self.timeout_s = ttl_s, timeout_s
        self.token = uuid.uuid4().hex

    def __enter__(self) -> PromotionLock:
        deadline = time.monotonic() + self.timeout_s
        while True:
            try:
                self.client.create_registered_model(
                    self.name,
                    tags={TAG_KIND: "lock", LOCK_OWNER: self.token, LOCK_EXPIRES: f"{time.time() + self.ttl_s:.3f}"},
                    description="transient lock held by metaopt promote(); expires on its own",
                )
                return self
            except MlflowException as exc:
                # On PostgreSQL a create that races the holder's release can fail with "does not
                # exist" (the server looks the clashing model up after it is gone): a lost race too.
                if exc.error_code not in ("RESOURCE_ALREADY_EXISTS", "RESOURCE_DOES_NOT_EXIST"):
                    raise
                if exc.error_code == "RESOURCE_DOES_NOT_EXIST" and self._owned():
                    return self
            self._break_if_expired()
            if time.monotonic() > deadline:
                raise PromotionLockTimeout(
                    f"promotion lock {self.name!r} still held after {self.timeout_s:g} s by another promotion; "
                    f"retry later (a crashed holder's lock expires after {self.ttl_s:g} s)"
                )
            time.sleep(random.uniform(0.02, 0.15))

    def _owned(self) -> bool:
        try:
            return self.client.get_registered_model(self.name).tags.get(LOCK_OWNER) == self.token
        except MlflowException:
            return False

    def _break_if_expired(self) -> None:
        try:
            held = self.client.get_registered_model(self.name)
        except MlflowException:
            return  # released meanwhile
        try:
            expires = float(held.tags.get(LOCK_EXPIRES, "inf"))
        except ValueError:
            expires = 0.0
        if time.time() > expires:
            with contextlib.suppress(MlflowException):
                self.client.delete_registered_model(self.name)

    def __exit__(self, *exc_info: Any) -> None:
        try:
            held = self.client.get_registered_model(self.name)
        except MlflowException:
            return
        if held.tags.get(LOCK_OWNER) == self.token:
            with contextlib.suppress(MlflowException):
                self.client.delete_registered_model(self.name)


def production_version(name: str, *, tracking_uri: str | None = None) -> str | None:
    """The version currently in production (alias ``production``; the stage as a fallback), or None."""
    client = existing_store(tracking_uri)
    registered_model(client, name)
    return current_production(client, name)


def current_production(client: MlflowClient, name: str) -> str | None:
    """The production version: the alias if set, else the newest version in the Production stage."""
    aliases = client.get_registered_model(name).aliases
    if ALIAS in aliases:
        return str(aliases[ALIAS])
    staged = [str(v.version) for v in list_versions(client, name) if v.current_stage == STAGE]
    return str(max(staged, key=int)) if staged else None


def set_production(client: MlflowClient, name: str, version: str) -> None:
    """Point the alias, then the stage, at ``version``."""
    # alias first: it is the commit point the reconciliation (and current_production) trusts
    client.set_registered_model_alias(name, ALIAS, version)
    with quiet_stages():
        client.transition_model_version_stage(name, version, STAGE, archive_existing_versions=True)


def reconcile(client: MlflowClient, name: str, attempts: int = 5) -> str | None:
    """Make the Production stage hold exactly the version the ``production`` alias names.

    Without an alias, a single (or the newest) Production-stage version becomes the alias target.
    Returns the production version (None if there is none).
    """
    for _ in range(attempts):
        aliases = client.get_registered_model(name).aliases
        staged = sorted((str(v.version) for v in list_versions(client, name) if v.current_stage == STAGE), key=int)
        target = str(aliases[ALIAS]) if ALIAS in aliases else (staged[-1] if staged else None)
        if target is None:
            return None
        if staged == [target] and str(aliases.get(ALIAS)) == target:
            return target
        set_production(client, name, target)
    raise RegistryError(f"model {name!r}: stage {STAGE} and alias {ALIAS!r} could not be reconciled after {attempts} attempts")


def promote(
    name: str,
    version: int | str,
    scores: Mapping[str, Any] | None = None,
    *,
    metric: str = DEFAULT_METRIC,
    margin: float = 0.0,
    greater_is_better: bool = True,
    force: bool = False,
    tracking_uri: str | None = None,
    lock_timeout_s: float = 60.0,
    lock_ttl_s: float = 120.0,
) -> PromotionDecision:
    """Champion/challenger promotion of ``name`` version ``version`` to production.

    ``scores``: meta-test scores of the challenger ({metric: value}); recorded as its tags. Without
    them, the scores recorded at registration are used. The challenger wins if its ``metric``
    beats the production version's by more than ``margin`` (``>`` when ``greater_is_better``,
    ``<`` otherwise), or there is no production version, or ``force``. A rejection is a normal
    outcome (``promoted=False``), recorded on the version like a promotion.
    """
    check_promotion_settings(metric, margin)
    if isinstance(version, bool) or not str(version).isdigit():
        raise ValueError(f"version: got {version!r}; allowed: a version number such as 3")
    version = str(int(version))
    client = existing_store(tracking_uri)
    challenger = resolve_version(client, ModelRef(name, version=version), f"models:/{name}/{version}")
    score_values = scores_of(scores)
    for key, value in score_values.items():
        client.set_model_version_tag(name, version, SCORE_PREFIX + key, repr(value))
    challenger_score = score_values.get(metric, score_tag(challenger, metric))

    with PromotionLock(client, name, ttl_s=lock_ttl_s, timeout_s=lock_timeout_s):
        champion = current_production(client, name)
        champion_score = None
        if champion is not None and champion != version:
            champion_score = score_tag(client.get_model_version(name, champion), metric)
        verdict = decide_promotion(
            None if challenger_score is None else {metric: challenger_score},
            None if champion is None else ({} if champion_score is None else {metric: champion_score}),
            metric=metric,
            greater_is_better=greater_is_better,
            margin=margin,
            force=force,
            already_production=champion == version,
            challenger=f"version {version} of {name!r}",
            champion=f"production version {champion}",
        )
        promoted, decision, reason = verdict.promoted, verdict.decision, verdict.reason
        record = {
            "decision": decision,
            "reason": reason,
            "metric": metric,
            "challenger_score": "none" if challenger_score is None else repr(challenger_score),
            "champion_version": "none" if champion is None else champion,
            "champion_score": "none" if champion_score is None else repr(champion_score),
            "margin": repr(float(margin)),
            "greater_is_better": str(bool(greater_is_better)).lower(),
            "decided_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }
        for key, value in record.items():
            client.set_model_version_tag(name, version, PROMOTION_PREFIX + key, truncate_tag(value))
        if promoted and champion != version:
            set_production(client, name, version)
            if champion is not None:
                client.set_model_version_tag(name, champion, PROMOTION_PREFIX + "replaced_by", version)
        current = reconcile(client, name)
    return PromotionDecision(
        name=name,
        version=version,
        promoted=promoted,
        decision=decision,
        reason=reason,
        metric=metric,
        challenger_score=challenger_score,
        champion_version=champion,
        champion_score=champion_score,
        margin=float(margin),
        greater_is_better=bool(greater_is_better),
        production_version=current,
    )


__all__ = [
    "PromotionDecision",
    "PromotionLock",
    "PromotionVerdict",
    "check_promotion_settings",
    "current_production",
    "decide_promotion",
    "production_version",
    "promote",
    "reconcile",
    "set_production",
]
