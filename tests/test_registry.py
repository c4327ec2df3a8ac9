"""The model registry against a real ``mlflow server`` process (PostgreSQL backend, proxied artifacts):
register, champion/challenger promotion, racing promotions, safe loading by both production URIs,
tampered artifacts, missing models, an unreachable server, an S3 (moto) artifact store, the CLI."""

from __future__ import annotations

import json
import re
import threading
import time
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from mlflow import MlflowClient
from torch import nn

from metaopt_core.losses.taylor import TaylorLoss
from metaopt_core.mlops import registry
from metaopt_core.mlops.registry import (
    ArtifactValidationError,
    ModelNotFoundError,
    NoProductionVersionError,
    PromotionLockTimeout,
    WrongModelKindError,
    load_loss,
    load_optimizer,
    promote,
    register_loss,
    register_optimizer,
    validate_loss_doc,
)
from metaopt_core.mlops.tracking import TrackingServerUnreachable
from metaopt_core.optim import KroneckerBregman, MirrorDescent, ShapeMismatchError, save_divergence
from pipelines.cli import main as cli_main
from tests.fixtures_mlflow import mlflow_server, mlflow_server_s3, requires_postgres, reset_mlflow_uri  # noqa: F401
from tests.fixtures_s3 import free_port, moto_server_url  # noqa: F401

METRIC = "meta_test_accuracy"
SETUP = "test set-up: a version in production"  # the override reason of promotions that only set a test up


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def itl_loss() -> TaylorLoss:
    return TaylorLoss.from_preset("itl")


def hand_loss_doc() -> dict:
    """Order 2, plain monomials, centres 0: f(p, y) = 1*d + 0*d^2 + 2*d*e = p + 2 p y per class."""
    return {
        "family": "taylor",
        "order": 2,
        "form": "monomial",
        "sign": "negative-sum-over-classes",
        "class_reduction": "sum",
        "params": [0.0, 0.0, 1.0, 0.0, 2.0],
        "normalisation": {"enabled": False, "eta": 1.0},
    }


def register(server: str, name: str, score: float | None, loss=None) -> str:
    scores = None if score is None else {METRIC: score, "rank": 1.5}
    return register_loss(loss if loss is not None else itl_loss(), name, scores=scores, tracking_uri=server).version


def production_state(server: str, name: str) -> tuple[str | None, list[str]]:
    """(alias 'production' target, versions in stage Production), read straight from MLflow."""
    client = MlflowClient(server)
    alias = client.get_registered_model(name).aliases.get("production")
    staged = sorted(v.version for v in client.search_model_versions(f"name='{name}'") if v.current_stage == "Production")
    return (str(alias) if alias is not None else None), staged


# ---------------------------------------------------------------------------------------- register + load


def test_register_promote_load_by_both_production_uris(mlflow_server):
    name = unique("itl")
    original = itl_loss()
    config = {"algorithm": "itl", "inner": {"lr": 0.01, "steps": 15}}
    registered = register_loss(original, name, config=config, fingerprint="sha256:feedbeef", scores={METRIC: 0.77}, tracking_uri=mlflow_server)
    assert registered.version == "1" and registered.model_uri == f"models:/{name}/1"

    decision = promote(name, registered.version, override_reason=SETUP, tracking_uri=mlflow_server)
    assert decision.promoted and decision.decision == "overridden" and decision.production_version == "1"
    assert production_state(mlflow_server, name) == ("1", ["1"])

    logits = torch.randn(16, 10, generator=torch.Generator().manual_seed(0))
    target = torch.randint(0, 10, (16,), generator=torch.Generator().manual_seed(1))
    for uri in (f"models:/{name}/production", f"models:/{name}@production", f"models:/{name}/1"):
        loaded = load_loss(uri, tracking_uri=mlflow_server)
        assert isinstance(loaded, TaylorLoss)
        assert loaded.form == "monomial" and loaded.order == 4
        assert torch.equal(loaded.params.detach(), original.params.detach())
        assert torch.equal(loaded(logits, target), original(logits, target))

    # provenance on the version
    tags = MlflowClient(mlflow_server).get_model_version(name, "1").tags
    assert tags["metaopt.kind"] == "loss" and tags["metaopt.family"] == "taylor"
    assert json.loads(tags["metaopt.config"]) == config
    assert tags["metaopt.data_fingerprint"] == "sha256:feedbeef"
    assert float(tags["metaopt.score.meta_test_accuracy"]) == 0.77
    assert len(tags["metaopt.sha256.loss.json"]) == 64
    assert tags["metaopt.promotion.decision"] == "overridden" and tags["metaopt.promotion.override_reason"] == SETUP


def test_pyfunc_flavour_evaluates_the_loss_without_pickle(mlflow_server, tmp_path):
    name = unique("hand")
    version = register(mlflow_server, name, 0.5, loss=hand_loss_doc())
    promote(name, version, override_reason=SETUP, tracking_uri=mlflow_server)

    # the logged model is code + JSON: no pickle file anywhere in it
    mlflow.set_tracking_uri(mlflow_server)
    local = Path(mlflow.artifacts.download_artifacts(f"models:/{name}/production", dst_path=str(tmp_path)))
    files = {p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file()}
    assert "artifacts/loss.json" in files and "pyfunc.py" in files
    assert not [f for f in files if f.endswith((".pkl", ".pickle", ".cloudpickle"))]
    assert "loader_module: mlflow.pyfunc.loaders.code_model" in (local / "MLmodel").read_text()

    model = mlflow.pyfunc.load_model(f"models:/{name}@production")
    frame = pd.DataFrame({"probabilities": [[0.7, 0.3], [0.2, 0.8], [0.5, 0.25, 0.25]], "label": [0, 0, 2]})
    values = model.predict(frame)["loss"].to_numpy()
    # per class f = p + 2 p y; loss = -sum_c f
    expected = [-(0.7 + 1.4 + 0.3), -(0.2 + 0.4 + 0.8), -(0.5 + 0.25 + 0.25 + 0.5)]
    np.testing.assert_allclose(values, expected, rtol=1e-6)
    # the same numbers from the metaopt path
    loaded = load_loss(f"models:/{name}/production", reduction="none", tracking_uri=mlflow_server)
    np.testing.assert_allclose(loaded(torch.log(torch.tensor([[0.7, 0.3], [0.2, 0.8]])), torch.tensor([0, 0])).detach(), expected[:2], rtol=1e-6)

    with pytest.raises(Exception, match="sum to 1"):
        model.predict(pd.DataFrame({"probabilities": [[0.7, 0.7]], "label": [0]}))


# ---------------------------------------------------------------------------------------- champion / challenger


def gated_version(server: str, name: str, champion: str | None, gain: float) -> str:
    """A version whose recorded meta-test (gate.json, 12 units) beat CE and ``champion`` by about
    ``gain``, held back by the pipeline's margin (1.0): `promote` at margin 0 then decides."""
    from metaopt_core.gate import decide_gate

    version = register(server, name, None)
    ce = [0.7 + 0.01 * (i % 3) for i in range(12)]
    paired = {"learned": [v + gain + 0.001 * i for i, v in enumerate(ce)], "ce": ce}
    if champion is not None:
        paired["champion"] = [v + gain / 2 for v in ce]
    held = decide_gate(paired, greater_is_better=True, margin=1.0).to_dict()
    record = {"metric": METRIC, "greater_is_better": True, "champion_version": champion, "paired": paired, "settings": {}}
    assert not registry.apply_gate(name, version, held, record, tracking_uri=server).promoted
    return version


def _race(server: str, name: str, round_: int) -> list[str]:
    """Two threads promote, at once, two challengers whose meta-tests both beat the current
    champion; what went wrong (empty: nothing). One of them may win; the other compared with a
    champion that is no longer production, so it must be rejected ("production moved")."""
    champion = registry.production_version(name, tracking_uri=server)
    first, second = gated_version(server, name, champion, 0.05), gated_version(server, name, champion, 0.10)
    barrier = threading.Barrier(2)
    decisions, errors = {}, []

    def run(version: str) -> None:
        try:
            barrier.wait()
            decisions[version] = promote(name, version, margin=0.0, tracking_uri=server)
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(v,), name=f"promote-{v}") for v in ((first, second) if round_ % 2 else (second, first))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    if errors:
        return [f"errors: {errors}"]
    winners = [v for v, d in decisions.items() if d.promoted]
    if len(winners) != 1:
        return [f"round {round_}: {len(winners)} versions promoted from one champion ({winners})"]
    [loser] = [v for v in decisions if v != winners[0]]
    problems = []
    if "production moved" not in decisions[loser].reason:
        problems.append(f"round {round_}: version {loser} was not rejected for comparing with a replaced champion: {decisions[loser].reason}")
    if production_state(server, name) != (winners[0], [winners[0]]):
        problems.append(f"round {round_}: production is {production_state(server, name)}, not the winner {winners[0]}")
    return problems


def test_racing_promotions_end_with_stage_and_alias_on_the_same_winner(mlflow_server):
    """Two threads promote different challengers at once, on the PostgreSQL backend infra/ deploys.
    Serialised, one wins and the other is rejected (its meta-test compared with the old champion);
    without the lock both would read the old champion and both be promoted, the last writer
    ending in production (the negative control below shows this check catching that)."""
    requires_postgres(mlflow_server)
    name = unique("race")
    promote(name, register(mlflow_server, name, 0.70), override_reason=SETUP, tracking_uri=mlflow_server)
    for round_ in range(2):
        assert _race(mlflow_server, name, round_) == []
    # no lock left behind
    assert all(not m.name.endswith(".promotion-lock") for m in MlflowClient(mlflow_server).search_registered_models())


def test_racing_promotions_fail_the_check_without_the_lock(mlflow_server, monkeypatch):
    """Negative control: the lock replaced by a no-op, and both promotions made to read the
    champion before either writes. The race check must fail (two promotions from one champion)."""
    from metaopt_core.mlops.registry import gate

    requires_postgres(mlflow_server)
    name = unique("race-nolock")
    promote(name, register(mlflow_server, name, 0.70), override_reason=SETUP, tracking_uri=mlflow_server)
    read_champion = gate.current_production
    both_read = threading.Barrier(2, timeout=30)
    first_read = threading.local()

    def interleaved(client, model):
        champion = read_champion(client, model)
        if model == name and threading.current_thread().name.startswith("promote-") and not getattr(first_read, "done", False):
            first_read.done = True
            both_read.wait()  # both have read the old champion
        return champion

    class NoLock:
        def __init__(self, *args, **kwargs):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc_info):
            return None

    monkeypatch.setattr(gate, "PromotionLock", NoLock)
    monkeypatch.setattr(gate, "current_production", interleaved)
    problems = _race(mlflow_server, name, 0)
    assert problems and "2 versions promoted from one champion" in problems[0]


def test_reconcile_makes_the_stage_follow_the_alias(mlflow_server):
    name = unique("recon")
    v1, v2 = register(mlflow_server, name, 0.7), register(mlflow_server, name, 0.8)
    client = MlflowClient(mlflow_server)
    # a promotion interrupted between its two writes: alias on v2, stage on v1
    client.set_registered_model_alias(name, "production", v2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        client.transition_model_version_stage(name, v1, "Production")
    assert registry.reconcile(client, name) == v2
    assert production_state(mlflow_server, name) == (v2, [v2])


def test_promotion_lock_expires_and_times_out(mlflow_server):
    name = unique("lock")
    v1 = register(mlflow_server, name, 0.7)
    client = MlflowClient(mlflow_server)
    lock = name + registry.LOCK_SUFFIX
    # a live lock held by someone else: we wait, then give up with a clear error
    client.create_registered_model(lock, tags={registry.LOCK_OWNER: "other", registry.LOCK_EXPIRES: str(time.time() + 600)})
    started = time.monotonic()
    with pytest.raises(PromotionLockTimeout, match="still held"):
        promote(name, v1, override_reason=SETUP, tracking_uri=mlflow_server, lock_timeout_s=0.5)
    assert time.monotonic() - started < 10
    assert production_state(mlflow_server, name) == (None, [])
    # the holder crashed: its lock expired and is broken
    client.set_registered_model_tag(lock, registry.LOCK_EXPIRES, str(time.time() - 1))
    assert promote(name, v1, override_reason=SETUP, tracking_uri=mlflow_server, lock_timeout_s=5).promoted
    with pytest.raises(mlflow.exceptions.MlflowException):
        client.get_registered_model(lock)


# ---------------------------------------------------------------------------------------- errors


def test_missing_model_and_missing_production_version(mlflow_server):
    with pytest.raises(ModelNotFoundError, match="no registered model named 'no-such-model'"):
        load_loss("models:/no-such-model/production", tracking_uri=mlflow_server)
    name = unique("unpromoted")
    register(mlflow_server, name, 0.5)
    for uri in (f"models:/{name}/production", f"models:/{name}@production"):
        with pytest.raises(NoProductionVersionError, match=f"metaopt models promote {name} VERSION"):
            load_loss(uri, tracking_uri=mlflow_server)
    with pytest.raises(ModelNotFoundError, match="has no version 7; versions: \\['1'\\]"):
        load_loss(f"models:/{name}/7", tracking_uri=mlflow_server)
    with pytest.raises(ValueError, match="allowed: models:/NAME/VERSION"):
        load_loss("models:/a/b/c", tracking_uri=mlflow_server)


def test_embedded_sqlite_store_register_promote_load(tmp_path, monkeypatch):
    """The embedded setup: no server, no MLFLOW_TRACKING_URI, ./mlflow.db in the working directory."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelNotFoundError, match="no MLflow store at sqlite:///.*MLFLOW_TRACKING_URI is not set"):
        load_loss("models:/itl/production")
    assert not (tmp_path / "mlflow.db").exists()  # looking did not create an empty store
    registered = register_loss(hand_loss_doc(), "itl", scores={METRIC: 0.5})
    assert (tmp_path / "mlflow.db").is_file()
    assert promote("itl", registered.version, override_reason=SETUP).promoted
    for uri in ("models:/itl/production", "models:/itl@production"):
        assert load_loss(uri).params.tolist() == hand_loss_doc()["params"]


def test_tampered_artifact_is_refused(mlflow_server):
    name = unique("tamper")
    registered = register_loss(hand_loss_doc(), name, scores={METRIC: 0.5}, tracking_uri=mlflow_server)
    promote(name, registered.version, override_reason=SETUP, tracking_uri=mlflow_server)
    [stored] = Path(mlflow_server.artifacts_destination).rglob(f"{registered.model_id}/artifacts/artifacts/loss.json")
    doc = json.loads(stored.read_text())
    doc["params"][2] = 100.0  # still schema-valid: only the hash can tell
    stored.write_text(json.dumps(doc))
    with pytest.raises(ArtifactValidationError, match="modified after registration"):
        load_loss(f"models:/{name}/production", tracking_uri=mlflow_server)
    stored.write_text("{not json")
    with pytest.raises(ArtifactValidationError, match="sha256"):
        load_loss(f"models:/{name}@production", tracking_uri=mlflow_server)


@pytest.mark.parametrize(
    "change, field",
    [
        ({"family": "polynomial"}, "family"),
        ({"order": 6}, "order"),
        ({"form": "chebyshev"}, "form"),
        ({"params": [0.0] * 4}, "params"),
        ({"params": [0.0, 0.0, float("nan"), 0.0, 1.0]}, "params[2]"),
        ({"params": [0.0, 0.0, True, 0.0, 1.0]}, "params[2]"),
        ({"sign": "positive"}, "sign"),
        ({"normalisation": {"enabled": True, "eta": -1}}, "normalisation.eta"),
    ],
)
def test_malformed_loss_documents_name_the_field(tmp_path, change, field):
    doc = {**hand_loss_doc(), **change}
    with pytest.raises(ArtifactValidationError, match=re.escape(f"field '{field}'")):
        validate_loss_doc(doc)
    path = tmp_path / "loss.json"
    path.write_text(json.dumps(doc, allow_nan=True))
    with pytest.raises(ArtifactValidationError, match=re.escape(f"{path}: loss.json: field '{field}'")):
        load_loss(str(path))


def test_local_and_baseline_loss_documents_load(tmp_path):
    path = tmp_path / "loss.json"
    path.write_text(json.dumps(hand_loss_doc()))
    assert load_loss(str(path)).order == 2
    gce = registry.loss_from_doc({"family": "gce", "params": {"q": 0.7}})
    p = torch.tensor([[0.6, 0.4]])
    # GCE: (1 - p_y^q) / q
    assert torch.allclose(gce(torch.log(p), torch.tensor([0])), torch.tensor((1 - 0.6**0.7) / 0.7), atol=1e-6)
    with pytest.raises(ArtifactValidationError, match="field 'params'"):
        registry.loss_from_doc({"family": "gce", "params": {"qq": 0.7}})


def test_unreachable_tracking_server_fails_fast_naming_the_uri(monkeypatch):
    uri = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    with pytest.raises(TrackingServerUnreachable, match=uri.replace(".", "\\.")):
        load_loss("models:/itl/production", tracking_uri=uri)
    assert time.monotonic() - started < 15
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    with pytest.raises(TrackingServerUnreachable, match="unreachable"):
        register_loss(hand_loss_doc(), "itl")


# ---------------------------------------------------------------------------------------- optimiser


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))


def learned_divergence(model: nn.Module) -> KroneckerBregman:
    div = KroneckerBregman.for_model(model)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for factor in div.parameters():
            factor.copy_(0.5 * torch.randn(factor.shape, generator=generator))
    return div


def test_register_promote_and_load_an_optimizer(mlflow_server, tmp_path):
    name = unique("metamd")
    reference_model = mlp()
    div = learned_divergence(reference_model)
    save_divergence(div, tmp_path / "div", lr=0.1)
    registered = register_optimizer(tmp_path / "div", name, scores={METRIC: 0.9}, tracking_uri=mlflow_server)
    assert registered.tags["metaopt.family"] == "kronecker"
    promote(name, registered.version, override_reason=SETUP, tracking_uri=mlflow_server)

    x, y = torch.randn(8, 4, generator=torch.Generator().manual_seed(5)), torch.tensor([0, 1] * 4)
    for uri in (f"models:/{name}/production", f"models:/{name}@production"):
        model, twin = mlp(), mlp()
        optimizer = load_optimizer(uri, model, tracking_uri=mlflow_server)
        assert isinstance(optimizer, MirrorDescent) and optimizer.param_groups[0]["lr"] == 0.1
        reference = MirrorDescent(twin.parameters(), div, lr=0.1)
        for m, opt in ((model, optimizer), (twin, reference)):
            opt.zero_grad()
            nn.functional.cross_entropy(m(x), y).backward()
            opt.step()
        for p, q in zip(model.parameters(), twin.parameters()):
            assert torch.allclose(p, q, atol=1e-6)
    assert load_optimizer(f"models:/{name}/production", mlp(), lr=0.5, tracking_uri=mlflow_server).param_groups[0]["lr"] == 0.5

    with pytest.raises(ShapeMismatchError, match="expects shape"):
        load_optimizer(f"models:/{name}/production", nn.Sequential(nn.Linear(5, 3), nn.ReLU(), nn.Linear(3, 2)), tracking_uri=mlflow_server)
    with pytest.raises(WrongModelKindError, match="use load_optimizer"):
        load_loss(f"models:/{name}/production", tracking_uri=mlflow_server)
    with pytest.raises(WrongModelKindError, match="holds optimizer models"):
        register_loss(hand_loss_doc(), name, tracking_uri=mlflow_server)
    # a local save_divergence directory loads too
    assert isinstance(load_optimizer(str(tmp_path / "div"), mlp()), MirrorDescent)

    # pyfunc: the step direction M^{-1} g, checked against a dense solve
    model = mlflow.pyfunc.load_model(f"models:/{name}@production")
    names = [n for n, _ in reference_model.named_parameters()]
    grads = [torch.randn(p.shape, generator=torch.Generator().manual_seed(i), dtype=torch.float64) for i, p in enumerate(reference_model.parameters())]
    frame = pd.DataFrame({"parameter": names, "gradient": [g.flatten().tolist() for g in grads]})
    directions = model.predict(frame)["direction"]
    dense = div.to_dense().double()
    expected = torch.linalg.solve(dense, torch.cat([g.flatten() for g in grads]))
    got = torch.cat([torch.tensor(list(d), dtype=torch.float64) for d in directions])
    assert torch.allclose(got, expected, atol=1e-5)


def test_tampered_divergence_is_refused(mlflow_server, tmp_path):
    name = unique("metamd-tamper")
    div = learned_divergence(mlp())
    save_divergence(div, tmp_path / "div", lr=0.1)
    registered = register_optimizer(tmp_path / "div", name, tracking_uri=mlflow_server)
    [manifest] = Path(mlflow_server.artifacts_destination).rglob(f"{registered.model_id}/artifacts/artifacts/divergence/manifest.json")
    doc = json.loads(manifest.read_text())
    doc["lr"] = 10.0
    manifest.write_text(json.dumps(doc))
    with pytest.raises(ArtifactValidationError, match="modified after registration"):
        load_optimizer(registered.model_uri, mlp(), tracking_uri=mlflow_server)


# ---------------------------------------------------------------------------------------- S3 artifact store


def test_artifact_store_on_s3_round_trip(mlflow_server_s3, moto_server_url):  # noqa: F811
    import boto3

    from tests.fixtures_s3 import FAKE_ACCESS_KEY_ID, FAKE_SECRET_ACCESS_KEY

    name = unique("itl-s3")
    original = itl_loss()
    registered = register_loss(original, name, scores={METRIC: 0.8}, tracking_uri=mlflow_server_s3)
    promote(name, registered.version, override_reason=SETUP, tracking_uri=mlflow_server_s3)
    loaded = load_loss(f"models:/{name}@production", tracking_uri=mlflow_server_s3)
    assert torch.equal(loaded.params.detach(), original.params.detach())

    # the bytes really live in the bucket (the client never talked to S3: the server proxies)
    bucket = mlflow_server_s3.artifacts_destination.removeprefix("s3://").split("/")[0]
    s3 = boto3.session.Session().client(
        "s3",
        endpoint_url=moto_server_url,
        region_name="us-east-1",
        aws_access_key_id=FAKE_ACCESS_KEY_ID,
        aws_secret_access_key=FAKE_SECRET_ACCESS_KEY,
    )
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket).get("Contents", [])]
    [key] = [k for k in keys if k.endswith(f"{registered.model_id}/artifacts/artifacts/loss.json")]
    stored = json.loads(s3.get_object(Bucket=bucket, Key=key)["Body"].read())
    assert stored["params"] == original.to_dict()["params"]


# ---------------------------------------------------------------------------------------- CLI


def test_cli_models_list_show_promote_and_loss_plot(mlflow_server, tmp_path, capsys):
    name = unique("cli")
    v1, v2 = register(mlflow_server, name, 0.70), register(mlflow_server, name, 0.71)
    uri = ["--tracking-uri", mlflow_server]

    assert cli_main(["models", "promote", name, v1, "--override", "--reason", SETUP, *uri]) == 0
    assert f"{name} version 1: overridden" in capsys.readouterr().out
    assert cli_main(["models", "promote", name, v2, "--fail-if-rejected", *uri]) == 3  # no recorded meta-test
    out = capsys.readouterr().out
    assert "rejected" in out and f"production version of {name}: 1" in out

    assert cli_main(["--tracking-uri", mlflow_server, "models", "list"]) == 0
    [row] = [line for line in capsys.readouterr().out.splitlines() if f"| {name} |" in line]
    assert [c.strip() for c in row.strip("|").split("|")][:5] == [name, "loss", "2", "2", "1"]

    assert cli_main(["models", "show", name, *uri]) == 0
    out = capsys.readouterr().out
    assert f"{name} (loss): production version 1" in out and "| 2 | None |" in out

    assert cli_main(["models", "show", f"{name}/1", *uri]) == 0
    out = capsys.readouterr().out
    assert "stage Production, aliases ['production']" in out and "metaopt.score.meta_test_accuracy = 0.7" in out
    assert 'form: "monomial"' in out

    assert cli_main(["models", "promote", name, v2, "--override", "--reason", SETUP, *uri]) == 0
    assert "overridden" in capsys.readouterr().out

    png = tmp_path / "plots" / "loss.png"
    assert cli_main(["loss", "plot", f"models:/{name}/production", "-o", str(png), *uri]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000

    assert cli_main(["models", "show", "no-such-model", *uri]) == 2
    assert "no registered model named 'no-such-model'" in capsys.readouterr().err
    dead = f"http://127.0.0.1:{free_port()}"
    assert cli_main(["models", "list", "--tracking-uri", dead]) == 2
    assert dead in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli_main(["models", "promote", name])  # VERSION missing: argparse usage error
