"""End to end: each pipeline's DAG run by ``kfp.local`` (every step a subprocess) against a real
MLflow server process, with tiny configurations.

- the run is tracked (config params, fingerprint tag, one metric point per outer step);
- a version is registered with its provenance and the gate's decision (the tiny meta-tests have too
  few units to promote: rejected with that reason); put in production by a recorded override, a
  fresh process loads it with the two lines a downstream job writes;
- a second run on the same data skips meta-training; a run on changed data (a new image in the
  source folder) meta-trains again;
- ARL's sharded DAG (ask → evaluate × 2 → tell, ParallelFor + Collected) learns exactly the loss
  the in-process blocks learned, and the gate, which re-evaluates the champion in the same
  meta-test run, keeps the champion.
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

from pipelines.builder import PipelineOptions
from pipelines.local import run_local
from tests.fixtures_mlflow import mlflow_server  # noqa: F401  (the session server)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
# the tiny configurations take 2 outer steps: 2 blocks keep the hand-over without an idle third block
TWO_BLOCKS = PipelineOptions(blocks=2, cluster_env=False, retries=False)
ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow
# The session's MLflow server is shared with the registry tests; these tests register their own
# model names, so their versions count from 1.
ARL, ITL, METAMD = "e2e-arl", "e2e-itl", "e2e-metamd"
# Tiny meta-tests have too few units for the gate to promote anything (it needs >= 10): a test that
# needs a production version puts one there by a recorded override, as an operator would.
OVERRIDE = "the pipeline test needs a production version"


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
    from metaopt_core.mlops.registry import promote

    settings = {"epochs": 2, "seeds": 2, "lr_grid": [0.01, 0.1], "tasks": [{"source": "digits", "image_size": 8, "model": "mlp2", "max_examples": 300}]}
    lines: list[str] = []
    first = run_local("arl", CONFIGS / "arl-tiny.yaml", model_name=ARL, tracking_uri=mlflow_server, workdir=tmp_path,
                      meta_test_settings=settings, echo=lines.append)  # fmt: skip
    assert (first["status"], first["version"], first["decision"], first["production_version"]) == ("trained", "1", "rejected", "")
    # the gate: 2 independent units, tuned CE/GCE/SCE, no champion; too few units to promote anything
    assert first["gate"]["units"] == 2 and not first["gate"]["champion"] and "only 2 independent unit(s)" in first["reason"]
    assert first["gate"]["best_baseline"] in ("ce", "gce", "sce")
    assert promote(ARL, "1", override_reason=OVERRIDE, tracking_uri=mlflow_server).production_version == "1"
    _assert_tracked(mlflow_server, first, "best_accuracy", 2, {"population_size": "4", "generations": "2"})
    assert any("arl: outer step 2/2: " in line for line in lines) and any(line.startswith("  ✓ arl block 3/3") for line in lines)

    second = run_local(
        "arl", CONFIGS / "arl-tiny.yaml", model_name=ARL, tracking_uri=mlflow_server, workdir=tmp_path, meta_test_settings=settings, echo=lines.append
    )
    assert second["status"] == "skipped" and second["production_version"] == "1"
    assert "unchanged" in second["reason"]

    # forced, and fanned out: 2 blocks = 2 generations, each over 2 evaluate shards
    sharded = run_local("arl", CONFIGS / "arl-tiny.yaml", model_name=ARL, options=PipelineOptions(blocks=2, shards=2, cluster_env=False, retries=False), force_retrain=True,
                        tracking_uri=mlflow_server, workdir=tmp_path, meta_test_settings=settings, echo=lines.append)  # fmt: skip
    assert sharded["status"] == "trained" and sharded["version"] == "2"
    assert any("shard 2/2" in line for line in lines)
    from metaopt_core.mlops.registry import load_loss_doc

    blocks_doc = load_loss_doc(f"models:/{ARL}/1", tracking_uri=mlflow_server)
    sharded_doc = load_loss_doc(f"models:/{ARL}/2", tracking_uri=mlflow_server)
    assert sharded_doc["params"] == blocks_doc["params"]
    # the same loss meta-tests the same, and so does the champion re-evaluated beside it in the same
    # run: a tie does not beat the champion
    assert sharded["scores"]["meta_test_accuracy"] == first["scores"]["meta_test_accuracy"]
    assert sharded["champion_version"] == "1" and sharded["gate"]["champion"]
    assert sharded["gate"]["champion_mean"] == sharded["gate"]["challenger_mean"] and sharded["gate"]["mean_difference"] == 0
    assert (sharded["decision"], sharded["production_version"]) == ("rejected", "1")
    version = _client(mlflow_server).get_model_version(ARL, "2")
    assert version.tags["metaopt.gate.decision"] == "rejected" and version.tags["metaopt.gate.champion_version"] == "1"


def _image_folder(root: Path, per_class: int, extra: int = 0) -> None:
    """Three domains x two classes of 8x8 RGB images (class 1 brighter; domains tinted). ITL's
    meta-test holds env2 out, so meta-training leaves one out of env0 and env1."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for d, domain in enumerate(("env0", "env1", "env2")):
        for c, name in enumerate(("cat", "dog")):
            folder = root / domain / name
            folder.mkdir(parents=True, exist_ok=True)
            count = per_class + (extra if (d, c) == (0, 0) else 0)
            for i in range(count):
                pixels = np.clip(rng.normal(0.3 + 0.4 * c, 0.1, (8, 8, 3)) + [0.1 * d, 0, 0], 0, 1)
                Image.fromarray((pixels * 255).astype(np.uint8)).save(folder / f"{i:03d}.png")


def test_itl_pipeline_retrains_only_on_new_data(mlflow_server, tmp_path):
    data = tmp_path / "images"
    _image_folder(data, per_class=10)  # enough that every split the meta-test trains or scores on holds both classes
    config = yaml.safe_load((CONFIGS / "itl-tiny.yaml").read_text())
    config["data"] = {"source": f"folder:{data}", "val_fraction": 0.25, "seed": 0}
    path = tmp_path / "itl.yaml"
    path.write_text(yaml.safe_dump(config))
    settings = {"held_out": ["env2"], "epochs": 1}
    run = lambda: run_local("itl", path, model_name=ITL, options=TWO_BLOCKS, tracking_uri=mlflow_server, workdir=tmp_path,  # noqa: E731
                            meta_test_settings=settings, echo=lambda line: None)  # fmt: skip
    from metaopt_core.mlops.registry import promote

    first = run()
    assert (first["status"], first["version"], first["decision"]) == ("trained", "1", "rejected")
    promote(ITL, "1", override_reason=OVERRIDE, tracking_uri=mlflow_server)
    _assert_tracked(mlflow_server, first, "heldout_ce", 2, {"outer.steps": "2", "family.order": "4"})
    out = _fresh_process(
        "import torch\n"
        "from metaopt_core import load_loss\n"
        f'criterion = load_loss("models:/{ITL}/production")\n'
        "logits = torch.tensor([[2.0, -1.0], [0.5, 0.5]]); labels = torch.tensor([0, 1])\n"
        "print(type(criterion).__name__, float(criterion(logits, labels)))\n",
        mlflow_server,
    )
    name, value = out.split()
    import torch

    from metaopt_core.mlops.registry import load_loss_doc, loss_from_doc

    with torch.no_grad():
        registered = loss_from_doc(load_loss_doc(f"models:/{ITL}/1", tracking_uri=mlflow_server))  # with the lr scale its meta-test measured
        expected = registered(torch.tensor([[2.0, -1.0], [0.5, 0.5]]), torch.tensor([0, 1]))
    assert name == type(registered).__name__ and float(value) == pytest.approx(float(expected), rel=1e-6)

    second = run()
    assert second["status"] == "skipped" and second["production_version"] == "1"

    _image_folder(data, per_class=10, extra=1)  # one new image arrives in the source
    third = run()
    assert third["status"] == "trained" and third["version"] == "2"
    assert third["fingerprint"] != first["fingerprint"]
    assert third["champion_version"] == "1" and third["gate"]["champion"]  # version 1 re-evaluated on the new data
    versions = {v.version: v for v in _client(mlflow_server).search_model_versions(f"name='{ITL}'")}
    assert versions["2"].tags["metaopt.data_fingerprint"] == third["fingerprint"]


def test_metamd_pipeline_registers_a_loadable_optimizer(mlflow_server, tmp_path):
    from metaopt_core.mlops.registry import promote

    summary = run_local("metamd", CONFIGS / "metamd-tiny.yaml", model_name=METAMD, options=TWO_BLOCKS, tracking_uri=mlflow_server, workdir=tmp_path,
                        meta_test_settings={"seeds": 3, "lr_grid": [0.01, 0.1, 1.0]}, echo=lambda line: None)  # fmt: skip
    assert (summary["status"], summary["decision"], summary["production_version"]) == ("trained", "rejected", "")
    assert summary["gate"]["units"] == 6 and summary["gate"]["best_baseline"] in ("sgd", "sgd-m", "adam")  # 3 seeds x 2 horizons
    assert "per stratum" in summary["reason"]  # the horizons are tested apart: 3 units each
    assert summary["downstream"] == []  # "use it" only for what is in production; the opt-in instead:
    assert summary["fallback"] == ["from metaopt_core import load_optimizer",
                                   f'optimizer = load_optimizer("models:/{METAMD}/production", model, fallback="models:/{METAMD}/1")']  # fmt: skip
    promote(METAMD, "1", override_reason=OVERRIDE, tracking_uri=mlflow_server)
    assert summary["fits"].startswith("an MLP 784-256-10 (parameters 1.weight (256, 784)")  # what `model` must be: mlp2 below
    _assert_tracked(mlflow_server, summary, "objective", 2, {"outer.steps": "2", "divergence.kind": "diagonal"})
    out = _fresh_process(
        "import json, torch\n"
        "from metaopt_core import load_optimizer\n"
        "from metaopt_core.models import build_model\n"
        "model = build_model('mlp2', 1, 28, 10, seed=0)\n"
        f'optimizer = load_optimizer("models:/{METAMD}/production", model)\n'
        "before = [p.detach().clone() for p in model.parameters()]\n"
        "loss = torch.nn.functional.cross_entropy(model(torch.randn(4, 1, 28, 28)), torch.tensor([0, 1, 2, 3]))\n"
        "loss.backward(); optimizer.step()\n"
        "print(json.dumps({'type': type(optimizer).__name__, 'moved': any(bool((p != b).any()) for p, b in zip(model.parameters(), before))}))\n",
        mlflow_server,
    )
    assert json.loads(out.strip().splitlines()[-1]) == {"type": "MirrorDescent", "moved": True}
