"""End to end, the scheduled re-meta-training use: a dataset in object storage (a moto S3 server),
a real MLflow server, and the ITL pipeline run by ``kfp.local``.

push an image folder -> run: trains, registers (the content manifest is an artifact of the run)
-> run again: skipped, no new version, the skip names the run it matched -> push one more image
-> run: trains again (here with a margin the challenger cannot meet: rejected) -> run again on the
same data: skipped, naming that rejected run (the gate remembers what it trained on, not only
what was promoted).
"""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
import yaml

from metaopt_core.mlops import datasets
from pipelines.builder import PipelineOptions
from pipelines.local import run_local
from tests.fixtures_mlflow import mlflow_server  # noqa: F401  (the session server)
from tests.fixtures_s3 import moto_server_url, s3_endpoint  # noqa: F401  (fixtures)
from tests.test_datasets import add_image, image_folder

pytestmark = pytest.mark.slow
CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TWO_BLOCKS = PipelineOptions(blocks=2, cluster_env=False, retries=False)
LENIENT = 1.0  # as in test_pipelines_local: the first version passes the baseline rule
UNBEATABLE = 1000.0  # a challenger must beat the champion by this much: it cannot


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def test_pipeline_on_a_bucket_retrains_only_on_new_data(mlflow_server, s3_endpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("METAOPT_DATA_CACHE", str(tmp_path / "cache"))
    model = f"e2e-s3-itl-{uuid.uuid4().hex[:6]}"
    local = image_folder(tmp_path / "images", per_class=10)  # enough that every split the meta-test reads holds both classes
    uri = s3_endpoint.uri("datasets/pets/")
    assert len(datasets.push(local, uri, progress=False).uploaded) == 60
    config = yaml.safe_load((CONFIGS / "itl-tiny.yaml").read_text())
    config["data"] = {"source": uri, "val_fraction": 0.25, "seed": 0}
    path = tmp_path / "itl.yaml"
    path.write_text(yaml.safe_dump(config))
    settings = {"held_out": ["env2"], "epochs": 1}

    def run(margin: float = LENIENT) -> dict:
        return run_local("itl", path, model_name=model, options=TWO_BLOCKS, tracking_uri=mlflow_server, workdir=tmp_path,
                         meta_test_settings=settings, promotion_margin=margin, echo=lambda line: None)  # fmt: skip

    client = _client(mlflow_server)
    versions = lambda: sorted(v.version for v in client.search_model_versions(f"name='{model}'"))  # noqa: E731

    first = run()
    assert (first["status"], first["version"]) == ("trained", "1")
    tags = client.get_run(first["run_id"]).data.tags
    assert tags["metaopt.meta_training"] == "finished" and tags["metaopt.data_fingerprint"] == first["fingerprint"] and tags["metaopt.config_hash"]
    logged = [a.path for a in client.list_artifacts(first["run_id"], "data/dataset-0")]
    assert "data/dataset-0/content_manifest.json" in logged  # what was really in the bucket

    second = run()
    assert second["status"] == "skipped" and first["run_id"] in second["reason"] and "unchanged" in second["reason"]
    assert versions() == ["1"]

    add_image(local, "env0/cat/new.png")
    assert datasets.push(local, uri, progress=False).uploaded == ["env0/cat/new.png"]
    third = run(UNBEATABLE)
    assert (third["status"], third["version"]) == ("trained", "2") and third["fingerprint"] != first["fingerprint"]
    if first["promoted"]:  # a champion to beat by UNBEATABLE: the challenger is rejected
        assert (third["decision"], third["production_version"]) == ("rejected", "1")

    fourth = run()
    assert fourth["status"] == "skipped" and third["run_id"] in fourth["reason"]
    assert versions() == ["1", "2"]
