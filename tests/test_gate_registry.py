"""The registry side of the promotion gate against a real MLflow server: the champion fetched for
the meta-test, the decision recorded as ``metaopt.gate.*`` tags and ``gate.json``, a rejected
version kept with its reason (and shown by ``metaopt models show``), and ``metaopt models promote``:
the same gate on the recorded meta-test, or an override whose reason is recorded."""

from __future__ import annotations

import functools
import json
import uuid

import pytest
from mlflow import MlflowClient

from metaopt_core import exports
from metaopt_core.gate import decide_gate
from metaopt_core.losses.taylor import TaylorLoss
from metaopt_core.mlops.registry import GATE_PREFIX, apply_gate, load_champion, production_version, register_loss
from pipelines.cli import main as cli_main
from tests.fixtures_mlflow import mlflow_server  # noqa: F401

SETTINGS = {"lr_grid": [0.01, 0.1], "epochs": 2, "seeds": list(range(12)), "replicates": 12, "chosen_lr": {"learned": {"digits": 0.1}}}
UNITS = 12
CE = [0.70 + 0.01 * (i % 3) for i in range(UNITS)]
WORSE = {"learned": [v - 0.2 for v in CE], "ce": CE}
BETTER = {"learned": [v + 0.1 + 0.002 * i for i, v in enumerate(CE)], "ce": CE}


@functools.cache
def split_manifest() -> dict:
    """A real split manifest (prepared when a test first asks: not at collection)."""
    from metaopt_core.data.manifest import SplitManifest
    from metaopt_core.data.prepare import prepare

    spec = {"source": "digits", "max_examples": 60}
    train, test = prepare({**spec, "part": "meta-train"}), prepare({**spec, "part": "meta-test"})
    return SplitManifest().add("inner_training", train, ["train"]).add("meta_test", test, ["val"]).check().to_dict()


def record(champion: str | None) -> dict:
    return {"metric": "meta_test_accuracy", "greater_is_better": True, "champion_version": champion, "settings": SETTINGS,
            "fingerprint": "f" * 64, "split_manifest": split_manifest()}  # fmt: skip


def test_the_gate_decision_is_recorded_and_a_rejected_version_stays(mlflow_server, tmp_path, capsys):
    name = f"gate-{uuid.uuid4().hex[:8]}"
    loss = TaylorLoss.from_preset("itl")
    assert load_champion(name, tmp_path, tracking_uri=mlflow_server) == (None, None)  # not registered yet

    first = register_loss(loss, name, scores={"meta_test_accuracy": 0.7}, tracking_uri=mlflow_server)
    worse = decide_gate(WORSE, greater_is_better=True)
    decision = apply_gate(name, first.version, worse.to_dict(), record(None), tracking_uri=mlflow_server)
    assert (decision.decision, decision.production_version) == ("rejected", None)
    tags = MlflowClient(mlflow_server).get_model_version(name, first.version).tags
    assert tags[GATE_PREFIX + "decision"] == "rejected" and "does not beat tuned 'ce'" in tags[GATE_PREFIX + "reason"]
    assert json.loads(tags[GATE_PREFIX + "settings"])["lr_grid"] == [0.01, 0.1]
    assert tags[GATE_PREFIX + "fingerprint"] == "f" * 64 and tags[GATE_PREFIX + "best_baseline"] == "ce"
    assert tags["metaopt.promotion.decision"] == "rejected"

    second = register_loss(loss, name, scores={"meta_test_accuracy": 0.8}, tracking_uri=mlflow_server)
    better = decide_gate(BETTER, greater_is_better=True)
    assert apply_gate(name, second.version, better.to_dict(), record(None), tracking_uri=mlflow_server).promoted
    assert production_version(name, tracking_uri=mlflow_server) == second.version
    version, champion = load_champion(name, tmp_path, tracking_uri=mlflow_server)
    assert version == second.version and exports.kind_of(champion).role == "loss" and exports.read(champion)["family"] == "taylor"

    # a gate decided against a champion that is no longer production does not promote
    third = register_loss(loss, name, tracking_uri=mlflow_server)
    stale = apply_gate(name, third.version, better.to_dict(), record(first.version), tracking_uri=mlflow_server)
    assert not stale.promoted and "production moved" in stale.reason

    client = MlflowClient(mlflow_server)
    where = client.get_model_version(name, first.version).tags[GATE_PREFIX + "artifact"]
    import mlflow

    gate_file = mlflow.artifacts.download_artifacts(artifact_uri=where, dst_path=str(tmp_path / "gate"), tracking_uri=mlflow_server)
    doc = json.loads(open(gate_file).read())
    assert doc["decision"] == "rejected" and doc["settings"] == SETTINGS and doc["fingerprint"] == "f" * 64
    # the split manifest is on the version: its summary as a tag, every entry (with ids) in gate.json
    assert json.loads(tags[GATE_PREFIX + "split_manifest"]) == split_manifest()["summary"]
    assert doc["split_manifest"] == split_manifest() and doc["split_manifest"]["entries"][1]["phase"] == "meta_test"

    capsys.readouterr()
    assert cli_main(["models", "show", name, "--tracking-uri", mlflow_server]) == 0
    out = capsys.readouterr().out
    assert f"version {first.version}: rejected: not better in" in out and "(no production version yet)" in out
    assert f"version {second.version}: promoted:" in out and "production moved" in out


@pytest.mark.parametrize("margin", [0.0])
def test_the_gate_tags_hold_every_number(margin):
    from metaopt_core.mlops.registry import gate_tags

    paired = {"learned": [v + 0.1 for v in CE], "champion": [v + 0.05 for v in CE], "ce": CE}
    decision = decide_gate(paired, greater_is_better=True, margin=margin)
    tags = gate_tags(decision.to_dict(), record("1"))
    for key in ("decision", "reason", "lower_bound", "mean_difference", "comparisons", "binding", "champion_version", "settings", "fingerprint"):
        assert GATE_PREFIX + key in tags
    assert tags[GATE_PREFIX + "champion_version"] == "1"


def test_promote_by_hand_runs_the_same_gate_or_records_an_override(mlflow_server, capsys):
    """`metaopt models promote` re-decides with the gate on the version's recorded meta-test: a
    version without one, or whose meta-test compared with another production version, is
    rejected; --override needs a reason and records it, who and when."""
    client = MlflowClient(mlflow_server)
    name = f"manual-{uuid.uuid4().hex[:8]}"
    loss = TaylorLoss.from_preset("itl")
    bare = register_loss(loss, name, scores={"meta_test_accuracy": 0.99}, tracking_uri=mlflow_server).version
    cli = ["--tracking-uri", mlflow_server]

    # no recorded meta-test: a stored score alone promotes nothing (it used to promote a first version)
    capsys.readouterr()
    assert cli_main(["models", "promote", name, bare, "--fail-if-rejected", *cli]) == 3
    assert "has no recorded meta-test" in capsys.readouterr().out
    assert production_version(name, tracking_uri=mlflow_server) is None

    # the pipeline's gate rejected it; by hand the same gate (same margin) rejects it again
    rejected = register_loss(loss, name, tracking_uri=mlflow_server).version
    apply_gate(name, rejected, decide_gate(WORSE, greater_is_better=True).to_dict(), {**record(None), "paired": WORSE}, tracking_uri=mlflow_server)
    assert cli_main(["models", "promote", name, rejected, *cli]) == 0
    assert "rejected: not better in" in capsys.readouterr().out and production_version(name, tracking_uri=mlflow_server) is None

    # a recorded win the pipeline missed by its margin passes at margin 0, by the same rule
    near = register_loss(loss, name, tracking_uri=mlflow_server).version
    apply_gate(name, near, decide_gate(BETTER, greater_is_better=True, margin=0.5).to_dict(), {**record(None), "paired": BETTER}, tracking_uri=mlflow_server)
    assert production_version(name, tracking_uri=mlflow_server) is None
    assert cli_main(["models", "promote", name, near, "--margin", "0", *cli]) == 0
    assert production_version(name, tracking_uri=mlflow_server) == near

    # its meta-test compared with no champion; production is now `near`: only a new meta-test can decide
    assert cli_main(["models", "promote", name, rejected, "--margin", "0", *cli]) == 0
    assert production_version(name, tracking_uri=mlflow_server) == near

    # override: a reason is required and recorded
    assert cli_main(["models", "promote", name, bare, "--override", *cli]) == 2
    assert "--override: needs --reason" in capsys.readouterr().err
    assert cli_main(["models", "promote", name, bare, "--override", "--reason", "rollback after incident 42", *cli]) == 0
    assert production_version(name, tracking_uri=mlflow_server) == bare
    tags = client.get_model_version(name, bare).tags
    assert tags["metaopt.promotion.decision"] == "overridden" and tags["metaopt.promotion.override_reason"] == "rollback after incident 42"
    assert "the gate said: " in tags["metaopt.promotion.reason"] and tags["metaopt.promotion.overridden_by"]
    assert client.get_model_version(name, near).tags["metaopt.promotion.replaced_by"] == bare
