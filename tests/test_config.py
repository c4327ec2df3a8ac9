"""Configuration: one entry point (path, URI or mapping, with dot-path overrides); errors name the field, the value and what is allowed."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

import pytest
import yaml
from pydantic import Field

from metaopt_core.config import ConfigError, DataSpec, ModelName, NoiseSpec, StrictModel, apply_overrides, read_config, validate
from metaopt_core.data.sources import SOURCE_NAMES
from metaopt_core.meta import registry
from metaopt_core.meta.run_config import load_config
from metaopt_core.models import MODEL_NAMES
from tests.fixtures_s3 import moto_server_url, s3_endpoint  # noqa: F401  (fixtures)

ROOT = Path(__file__).resolve().parents[1]


class TrainSpec(StrictModel):
    """A configuration part built from the shared validators (the learners' are like it)."""

    model: ModelName = "mlp2"
    optimizer: Literal["sgd", "adam", "adamw", "rmsprop"] = "sgd"
    lr: float = Field(0.01, gt=0.0)
    epochs: int = Field(10, ge=1)


def _message(model_cls, data) -> str:
    with pytest.raises(ConfigError) as error:
        validate(model_cls, data)
    return str(error.value)


def test_defaults_are_valid():
    assert DataSpec().source == "mnist5k" and DataSpec().noise == NoiseSpec(kind="none", rate=0.0)
    assert TrainSpec().model == "mlp2" and TrainSpec().lr == 0.01
    spec = validate(DataSpec, {"source": "folder:/data/pacs", "noise": {"kind": "asymmetric", "rate": 0.4}})
    assert spec.source == "folder:/data/pacs" and spec.noise.kind == "asymmetric"


def test_bad_noise_kind_names_field_value_and_allowed_values():
    message = _message(DataSpec, {"noise": {"kind": "gaussian", "rate": 0.2}})
    assert "field 'noise.kind'" in message and "got 'gaussian'" in message
    for allowed in ("'none'", "'symmetric'", "'asymmetric'"):
        assert allowed in message


def test_out_of_range_numbers():
    message = _message(DataSpec, {"noise": {"kind": "symmetric", "rate": 1.5}})
    assert "field 'noise.rate'" in message and "got 1.5" in message and "less than or equal to 1" in message
    message = _message(TrainSpec, {"lr": -0.1})
    assert "field 'lr'" in message and "got -0.1" in message and "greater than 0" in message
    assert "field 'val_fraction'" in _message(DataSpec, {"val_fraction": 1.0})


def test_unknown_model_lists_the_known_ones():
    message = _message(TrainSpec, {"model": "resnet9"})
    assert "field 'model'" in message and "'resnet9'" in message
    for name in MODEL_NAMES:
        assert f"'{name}'" in message


def test_unknown_source_lists_the_known_ones():
    message = _message(DataSpec, {"source": "imagenet"})
    assert "field 'source'" in message and "'imagenet'" in message and "folder:<path>" in message
    for name in SOURCE_NAMES:
        assert f"'{name}'" in message


def test_extra_keys_are_errors_not_silently_ignored():
    message = _message(TrainSpec, {"model": "mlp2", "learning_rate": 0.1})
    assert "field 'learning_rate'" in message and "got 0.1" in message and "unknown field" in message
    message = _message(DataSpec, {"noise": {"kind": "symmetric", "rate": 0.2, "sigma": 1}})
    assert "field 'noise.sigma'" in message and "unknown field" in message


def test_every_error_is_reported_at_once():
    message = _message(TrainSpec, {"model": "resnet9", "optimizer": "lion", "epochs": 0})
    assert len(message.splitlines()) == 3
    assert "'lion'" in message and "'sgd', 'adam', 'adamw' or 'rmsprop'" in message
    assert "field 'epochs'" in message


def test_assignment_is_validated_too():
    spec = TrainSpec()
    with pytest.raises(ValueError, match="unknown model 'resnet9'"):
        spec.model = "resnet9"


def test_load_config_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    listing = tmp_path / "list.yaml"
    listing.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="expected a mapping at the top level, got list"):
        load_config(listing)
    known = re.escape(str(sorted([*registry.names(), "evaluate"])))  # every learner, and the evaluator's runs
    assert {"arl", "itl", "metamd"} <= set(registry.names())
    no_algorithm = tmp_path / "none.yaml"
    no_algorithm.write_text("name: x\n")
    with pytest.raises(ConfigError, match=rf"field 'algorithm' is missing; allowed: {known}"):
        load_config(no_algorithm)
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("algorithm: sgd\n")
    with pytest.raises(ConfigError, match=rf"field 'algorithm': got 'sgd'; allowed: {known}"):
        load_config(wrong)


def test_load_config_reports_a_nested_field_with_the_file(tmp_path):
    path = tmp_path / "arl.yaml"
    path.write_text("algorithm: arl\nnoise:\n  kind: gaussian\n  rate: 0.8\n")
    with pytest.raises(ConfigError) as error:
        load_config(path)
    line = next(line for line in str(error.value).splitlines() if "noise.kind" in line)
    assert line.startswith(str(path)) and "got 'gaussian'" in line and "'symmetric'" in line


# ----------------------------------------------------------------------------- the one entry point


def test_overrides_set_dot_paths_and_name_bad_ones():
    doc = {"train": {"epochs": 25, "lr": 0.1}, "generations": 8}
    out = apply_overrides(doc, {"train.epochs": 4, "generations": 3, "outer.steps": 2})
    assert out == {"train": {"epochs": 4, "lr": 0.1}, "generations": 3, "outer": {"steps": 2}}
    assert doc["train"]["epochs"] == 25  # the input is not modified
    with pytest.raises(ConfigError, match="generations is 8, not a mapping"):
        apply_overrides(doc, {"generations.x": 1})


def test_one_entry_point_reads_a_path_a_file_uri_an_s3_uri_and_a_mapping(tmp_path, s3_endpoint):
    """The CLI, the pipeline steps, the torchrun workers and the scripts all read configurations
    through read_config / load_config: the same document from wherever it comes, overrides on top."""
    from metaopt_core.mlops import storage

    text = (ROOT / "configs" / "itl-tiny.yaml").read_text()
    path = tmp_path / "itl.yaml"
    path.write_text(text)
    storage.write_text(s3_endpoint.uri("configs/itl.yaml"), text)
    overrides = {"outer.steps": 5, "inner.lr": 0.02}
    sources = [path, str(path), f"file://{path}", s3_endpoint.uri("configs/itl.yaml"), yaml.safe_load(text)]
    docs = [read_config(source, overrides, algorithm="itl") for source in sources]
    assert all(doc == docs[0] for doc in docs) and docs[0]["outer"]["steps"] == 5 and docs[0]["inner"]["lr"] == 0.02
    configs = [load_config(source, overrides) for source in sources]
    assert all(config == configs[0] for config in configs) and configs[0].outer.steps == 5
    assert load_config(configs[0]) == configs[0]  # a validated config goes through unchanged
    # the algorithm is implied when missing, and must match when present
    assert read_config({"name": "x"}, algorithm="itl")["algorithm"] == "itl"
    with pytest.raises(ConfigError, match=rf"{path}: field 'algorithm': got 'itl'; this is a run of 'arl'"):
        read_config(path, algorithm="arl")
    with pytest.raises(ConfigError, match="config file not found"):
        read_config(f"file://{tmp_path}/missing.yaml")
    with pytest.raises(ConfigError, match=r"field 'outer.steps': got 0"):
        load_config(path, {"outer.steps": 0})
