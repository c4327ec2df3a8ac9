"""End to end: each pipeline's DAG run by ``kfp.local`` (every step a subprocess) against a real
MLflow server process, with tiny configurations.

- the run is tracked (config params, fingerprint tag, one metric point per outer step);
- a version is registered with its provenance and promoted; a fresh process loads it with the
  two lines a downstream job writes;
- a second run on the same data skips meta-training; a run on changed data (a new image in the
  source folder) meta-trains again;
- ARL's sharded DAG (ask → evaluate × 2 → tell, ParallelFor + Collected) learns exactly the loss
  the in-process blocks learned, and champion/challenger keeps the champion on a tie.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from pipelines.common import PipelineOptions
from pipelines.local import run_local
from tests.fixtures_mlflow import reset_mlflow_uri, start_mlflow_server, stop_server  # noqa: F401  (fixtures)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
# the tiny configurations take 2 outer steps: 2 blocks keep the hand-over without an idle third block
TWO_BLOCKS = PipelineOptions(blocks=2, cluster_env=False, retries=False)
ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """A tracking server of this module's own. The registry tests register 'arl', 'itl' and
    'metamd' versions on the session-wide server; these tests count versions from 1."""
    uri, process = start_mlflow_server(tmp_path_factory.mktemp("pipelines-mlflow"))
    try:
        yield uri
    finally:
        stop_server(process)


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _fresh_process(code: str, uri: str) -> str:
    """Run ``code`` in a new interpreter that knows only the tracking URI (what a downstream job has)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["MLFLOW_TRACKING_URI"] = uri
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def _assert_tracked(uri: str, summary: dict, step_metric: str, steps: int, params: dict) -> None:
    client = _client(uri)
    run = client.get_run(summary["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.tags["metaopt.data_fingerprint"] == summary["fingerprint"]
    assert run.data.tags["metaopt.registered_version"] == summary["version"]
    for key, value in params.items():
        assert run.data.params[key] == value
    history = client.get_metric_history(summary["run_id"], step_metric)
    assert sorted(m.step for m in history) == list(range(1, steps + 1))  # one point per outer step, across blocks
    assert summary["metric"] in run.data.metrics  # the meta-test scores
    version = client.get_model_version(summary["model_name"], summary["version"])
    assert version.run_id == summary["run_id"]
    assert version.tags["metaopt.data_fingerprint"] == summary["fingerprint"]
    assert float(version.tags[f"metaopt.score.{summary['metric']}"]) == pytest.approx(summary["scores"][summary["metric"]])


def test_arl_pipeline_trains_skips_and_shards(mlflow_server, tmp_path):
    settings = {"epochs": 2, "max_examples": 300}
    lines: list[str] = []
    first = run_local("arl", CONFIGS / "arl-tiny.yaml", tracking_uri=mlflow_server, workdir=tmp_path, meta_test_settings=settings, echo=lines.append)
    assert (first["status"], first["version"], first["decision"], first["production_version"]) == ("trained", "1", "promoted", "1")
    _assert_tracked(mlflow_server, first, "best_accuracy", 2, {"population_size": "4", "generations": "2"})
    assert any("generation 2/2" in line for line in lines) and any(line.startswith("  ✓ arl block 3/3") for line in lines)

    second = run_local("arl", CONFIGS / "arl-tiny.yaml", tracking_uri=mlflow_server, workdir=tmp_path, meta_test_settings=settings, echo=lines.append)
    assert second["status"] == "skipped" and second["production_version"] == "1"
    assert "unchanged" in second["reason"]

    # forced, and fanned out: 2 blocks = 2 generations, each over 2 evaluate shards
    sharded = run_local("arl", CONFIGS / "arl-tiny.yaml", options=PipelineOptions(blocks=2, shards=2, cluster_env=False, retries=False), force_retrain=True,
                        tracking_uri=mlflow_server, workdir=tmp_path, meta_test_settings=settings, echo=lines.append)  # fmt: skip
    assert sharded["status"] == "trained" and sharded["version"] == "2"
    assert any("shard 2/2" in line for line in lines)
    from metaopt_core.mlops.registry import load_loss_doc

    blocks_doc = load_loss_doc("models:/arl/1", tracking_uri=mlflow_server)
    sharded_doc = load_loss_doc("models:/arl/2", tracking_uri=mlflow_server)
    assert sharded_doc["params"] == blocks_doc["params"]
    # the same loss meta-tests the same: a tie does not beat the champion
    assert sharded["scores"]["meta_test_accuracy"] == first["scores"]["meta_test_accuracy"]
    assert (sharded["decision"], sharded["production_version"]) == ("rejected", "1")


def _image_folder(root: Path, per_class: int, extra: int = 0) -> None:
    """Two domains x two classes of 8x8 RGB images (class 1 brighter; domain 1 tinted)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for d, domain in enumerate(("env0", "env1")):
        for c, name in enumerate(("cat", "dog")):
            folder = root / domain / name
            folder.mkdir(parents=True, exist_ok=True)
            count = per_class + (extra if (d, c) == (0, 0) else 0)
            for i in range(count):
                pixels = np.clip(rng.normal(0.3 + 0.4 * c, 0.1, (8, 8, 3)) + [0.1 * d, 0, 0], 0, 1)
                Image.fromarray((pixels * 255).astype(np.uint8)).save(folder / f"{i:03d}.png")


def test_itl_pipeline_retrains_only_on_new_data(mlflow_server, tmp_path):
    data = tmp_path / "images"
    _image_folder(data, per_class=6)
    config = yaml.safe_load((CONFIGS / "itl-tiny.yaml").read_text())
    config["data"] = {"source": f"folder:{data}", "val_fraction": 0.25, "seed": 0}
    path = tmp_path / "itl.yaml"
    path.write_text(yaml.safe_dump(config))
    settings = {"held_out": [], "epochs": 1}
    run = lambda: run_local("itl", path, options=TWO_BLOCKS, tracking_uri=mlflow_server, workdir=tmp_path,  # noqa: E731
                            meta_test_settings=settings, echo=lambda line: None)  # fmt: skip

    first = run()
    assert (first["status"], first["version"], first["production_version"]) == ("trained", "1", "1")
    _assert_tracked(mlflow_server, first, "heldout_ce", 2, {"outer.steps": "2", "family.order": "4"})
    out = _fresh_process(
        "import torch\n"
        "from metaopt_core import load_loss\n"
        'criterion = load_loss("models:/itl/production")\n'
        "logits = torch.tensor([[2.0, -1.0], [0.5, 0.5]]); labels = torch.tensor([0, 1])\n"
        "print(type(criterion).__name__, float(criterion(logits, labels)))\n",
        mlflow_server,
    )
    name, value = out.split()
    from metaopt_core.mlops.registry import load_loss_doc, loss_from_doc

    import torch

    with torch.no_grad():
        expected = loss_from_doc(load_loss_doc("models:/itl/1", tracking_uri=mlflow_server))(torch.tensor([[2.0, -1.0], [0.5, 0.5]]), torch.tensor([0, 1]))
    assert name == "TaylorLoss" and float(value) == pytest.approx(float(expected), rel=1e-6)

    second = run()
    assert second["status"] == "skipped" and second["production_version"] == "1"

    _image_folder(data, per_class=6, extra=1)  # one new image arrives in the source
    third = run()
    assert third["status"] == "trained" and third["version"] == "2"
    assert third["fingerprint"] != first["fingerprint"]
    versions = {v.version: v for v in _client(mlflow_server).search_model_versions("name='itl'")}
    assert versions["2"].tags["metaopt.data_fingerprint"] == third["fingerprint"]


def test_metamd_pipeline_registers_a_loadable_optimizer(mlflow_server, tmp_path):
    summary = run_local("metamd", CONFIGS / "metamd-tiny.yaml", options=TWO_BLOCKS, tracking_uri=mlflow_server, workdir=tmp_path,
                        meta_test_settings={"seeds": 1}, echo=lambda line: None)  # fmt: skip
    assert (summary["status"], summary["decision"], summary["production_version"]) == ("trained", "promoted", "1")
    assert summary["downstream"] == ["from metaopt_core import load_optimizer",
                                     'optimizer = load_optimizer("models:/metamd/production", model)']  # fmt: skip
    _assert_tracked(mlflow_server, summary, "objective", 2, {"outer.steps": "2", "divergence.kind": "diagonal"})
    out = _fresh_process(
        "import json, torch\n"
        "from metaopt_core import load_optimizer\n"
        "from metaopt_core.models import build_model\n"
        "model = build_model('mlp2', 1, 28, 10, seed=0)\n"
        'optimizer = load_optimizer("models:/metamd/production", model)\n'
        "before = [p.detach().clone() for p in model.parameters()]\n"
        "loss = torch.nn.functional.cross_entropy(model(torch.randn(4, 1, 28, 28)), torch.tensor([0, 1, 2, 3]))\n"
        "loss.backward(); optimizer.step()\n"
        "print(json.dumps({'type': type(optimizer).__name__, 'moved': any(bool((p != b).any()) for p, b in zip(model.parameters(), before))}))\n",
        mlflow_server,
    )
    assert json.loads(out.strip().splitlines()[-1]) == {"type": "MirrorDescent", "moved": True}
