"""Content, not location: the new-data check's configuration hash leaves out where the data lives
(the data fingerprint covers what is there), so the same images pushed under another prefix,
bucket or volume are not meta-trained again; a different packaged source still is."""

from __future__ import annotations

import json
import uuid

import yaml

from components.runtime import check_new_data, record_meta_training
from metaopt_core.meta import registry
from metaopt_core.mlops import datasets
from metaopt_core.mlops.tracking import Tracker, config_hash
from tests.fixtures_mlflow import mlflow_server  # noqa: F401  (the session server)
from tests.fixtures_s3 import moto_server_url, s3_endpoint  # noqa: F401  (fixtures)
from tests.test_datasets import image_folder


def test_the_hash_ignores_where_the_data_lives():
    itl = {"algorithm": "itl", "data": {"source": "s3://metaopt/datasets/pets/", "val_fraction": 0.25}, "outer": {"steps": 2}}
    moved = json.loads(json.dumps(itl))
    moved["data"]["source"] = "s3://archive/2024/pets-copy/"
    on_a_volume = json.loads(json.dumps(itl))
    on_a_volume["data"]["source"] = "folder:/data/pets"
    assert config_hash(itl) == config_hash(moved) == config_hash(on_a_volume)
    changed = json.loads(json.dumps(itl))
    changed["data"]["val_fraction"] = 0.3
    assert config_hash(changed) != config_hash(itl)

    arl = {"algorithm": "arl", "pool": {"datasets": [{"source": "mnist", "root": "/home/a/data"}, {"source": "digits"}]}}
    relocated = {"algorithm": "arl", "pool": {"datasets": [{"source": "mnist", "root": "/mnt/cache"}, {"source": "digits"}]}}
    swapped = {"algorithm": "arl", "pool": {"datasets": [{"source": "digits"}, {"source": "mnist"}]}}
    assert config_hash(arl) == config_hash(relocated) != config_hash(swapped)  # a packaged source's name says which data


def test_the_same_data_under_another_prefix_is_not_meta_trained_again(mlflow_server, s3_endpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("METAOPT_DATA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", str(mlflow_server))
    local = image_folder(tmp_path / "pets", per_class=16)
    learner = registry.get("itl")
    with open("configs/itl-tiny.yaml") as handle:
        doc = yaml.safe_load(handle)
    settings = {"held_out": ["env2"], "epochs": 1}
    resolved = {}
    for prefix in ("datasets/pets/", "moved/elsewhere/pets/"):
        datasets.push(local, s3_endpoint.uri(prefix), progress=False)
        config = learner.resolve_config({**doc, "data": {"source": s3_endpoint.uri(prefix), "val_fraction": 0.25, "seed": 0}})
        resolved[prefix] = (learner.prepare(config, settings).fingerprint, json.dumps(config.model_dump(mode="json")))
    (fingerprint, first), (moved_fingerprint, moved) = resolved.values()
    assert fingerprint == moved_fingerprint

    model = f"moved-{uuid.uuid4().hex[:6]}"
    with Tracker(run_name="trained on datasets/pets/") as tracker:  # a finished meta-training of the first prefix
        tracker.set_tags({"metaopt.model_name": model})
        record_meta_training(tracker, model, fingerprint, first, "1")
    should, _, _, reason = check_new_data(moved_fingerprint, model, False, moved)
    assert not should and "unchanged" in reason
