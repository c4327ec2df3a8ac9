"""The mechanics of production: the record of a promotion decision, the lock that serialises
promotions of one model, and the alias/stage writes with their reconciliation. The decision itself
is the gate's (:mod:`metaopt_core.gate`; :mod:`.gate` applies it, also for ``metaopt models promote``).

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
import random
import time
import uuid
from typing import Any

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from metaopt_core.mlops.registry.common import (
    ALIAS,
    LOCK_EXPIRES,
    LOCK_OWNER,
    LOCK_SUFFIX,
    STAGE,
    TAG_KIND,
    PromotionLockTimeout,
    RegistryError,
    quiet_stages,
)
from metaopt_core.mlops.registry.resolve import existing_store, list_versions, registered_model


@dataclasses.dataclass(frozen=True)
class PromotionDecision:
    """The outcome of :func:`promote`, also recorded as ``metaopt.promotion.*`` tags on the version."""

    name: str
    version: str
    promoted: bool
    decision: str  # promoted | rejected | overridden
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


__all__ = [
    "PromotionDecision",
    "PromotionLock",
    "current_production",
    "production_version",
    "reconcile",
    "set_production",
]
