"""Listing and describing registered models and versions (what ``metaopt models list/show`` print)."""

from __future__ import annotations

import datetime as _dt
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from metaopt_core.mlops.registry.common import (
    DEFAULT_METRIC,
    LOCK_SUFFIX,
    PROMOTION_PREFIX,
    TAG_FAMILY,
    TAG_KIND,
    score_tag,
)
from metaopt_core.mlops.registry.gate import GATE_PREFIX
from metaopt_core.mlops.registry.load import ROLES, fetch_export
from metaopt_core.mlops.registry.promotion import current_production
from metaopt_core.mlops.registry.resolve import ModelRef, existing_store, list_versions, registered_model, resolve_version


def list_models(*, metric: str = DEFAULT_METRIC, tracking_uri: str | None = None) -> list[dict]:
    """One row per registered model: name, kind, latest version, production version and its score."""
    client = existing_store(tracking_uri)
    rows, token = [], None
    while True:
        page = client.search_registered_models(max_results=100, page_token=token)
        for model in page:
            if model.name.endswith(LOCK_SUFFIX) or model.tags.get(TAG_KIND) == "lock":
                continue
            versions = list_versions(client, model.name)
            production = current_production(client, model.name)
            prod = next((v for v in versions if str(v.version) == production), None)
            rows.append(
                {
                    "name": model.name,
                    "kind": model.tags.get(TAG_KIND, ""),
                    "versions": len(versions),
                    "latest": str(versions[-1].version) if versions else None,
                    "production": production,
                    metric: score_tag(prod, metric) if prod is not None else None,
                    "updated": _timestamp(model.last_updated_timestamp),
                }
            )
        token = page.token
        if not token:
            return sorted(rows, key=lambda r: r["name"])


def describe_model(name: str, *, metric: str = DEFAULT_METRIC, tracking_uri: str | None = None) -> dict:
    """A registered model and a row per version (stage, aliases, score, last promotion decision and its reason)."""
    client = existing_store(tracking_uri)
    model = registered_model(client, name)
    by_version: dict[str, list[str]] = {}
    for alias, v in model.aliases.items():
        by_version.setdefault(str(v), []).append(alias)
    versions = [
        {
            "version": str(v.version),
            "stage": v.current_stage,
            "aliases": ",".join(sorted(by_version.get(str(v.version), []))),
            "family": v.tags.get(TAG_FAMILY, ""),
            metric: score_tag(v, metric),
            "decision": v.tags.get(PROMOTION_PREFIX + "decision", ""),
            "reason": v.tags.get(GATE_PREFIX + "reason") or v.tags.get(PROMOTION_PREFIX + "reason", ""),
            "created": _timestamp(v.creation_timestamp),
            "run_id": v.run_id,
        }
        for v in list_versions(client, name)
    ]
    production = current_production(client, name)
    return {
        "name": model.name,
        "kind": model.tags.get(TAG_KIND, ""),
        "description": model.description,
        "production": production,
        "fits": production_fits(name, tracking_uri=tracking_uri) if production and model.tags.get(TAG_KIND) == "optimizer" else "",
        "aliases": dict(model.aliases),
        "versions": versions,
    }


def describe_version(name: str, version: int | str, *, tracking_uri: str | None = None) -> dict:
    """One version: where it comes from, its tags (provenance, scores, promotion) and its artifact."""
    client = existing_store(tracking_uri)
    mv = resolve_version(client, ModelRef(name, version=str(version)), f"models:/{name}/{version}")
    out = {
        "name": name,
        "version": str(mv.version),
        "stage": mv.current_stage,
        "aliases": sorted(a for a, v in client.get_registered_model(name).aliases.items() if str(v) == str(mv.version)),
        "source": mv.source,
        "run_id": mv.run_id,
        "created": _timestamp(mv.creation_timestamp),
        "description": mv.description,
        "tags": dict(sorted(mv.tags.items())),
    }
    if mv.tags.get(TAG_KIND) in ROLES:
        with tempfile.TemporaryDirectory() as tmp:
            kind, folder, _ = fetch_export(f"models:/{name}/{mv.version}", mv.tags[TAG_KIND], Path(tmp), tracking_uri)
            out["artifact"] = kind.describe(folder)  # what the export kind shows: family, parameters, deployment, fits
        if out["artifact"].get("fits"):
            out["fits"] = out["artifact"]["fits"]
    return out


def architecture_of(mv: Any, tracking_uri: str | None = None) -> str:
    """What a registered optimiser version fits, in words (``an MLP 784-256-10 (parameters ...)``),
    as its export kind describes it ("" for a kind that fits any model)."""
    with tempfile.TemporaryDirectory() as tmp:
        kind, folder, _ = fetch_export(f"models:/{mv.name}/{mv.version}", mv.tags.get(TAG_KIND, "optimizer"), Path(tmp), tracking_uri)
        return str(kind.describe(folder).get("fits", ""))


def production_fits(name: str, *, tracking_uri: str | None = None) -> str:
    """What the production version of optimiser ``name`` fits ("" for a loss or no production version)."""
    client = existing_store(tracking_uri)
    version = current_production(client, name)
    if version is None:
        return ""
    mv = client.get_model_version(name, version)
    return architecture_of(mv, tracking_uri) if mv.tags.get(TAG_KIND) == "optimizer" else ""


def _timestamp(millis: int | None) -> str:
    if not millis:
        return ""
    return _dt.datetime.fromtimestamp(millis / 1000, _dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def iter_versions(name: str, *, tracking_uri: str | None = None) -> Iterator[Any]:
    """All ``ModelVersion`` objects of ``name``, oldest first."""
    client = existing_store(tracking_uri)
    registered_model(client, name)
    yield from list_versions(client, name)


__all__ = ["architecture_of", "describe_model", "describe_version", "iter_versions", "list_models", "production_fits"]
