"""Configuration errors name the field, the value and what is allowed."""

from __future__ import annotations

import pytest

from metaopt_core.config import ConfigError, DataSpec, NoiseSpec, TrainSpec, load_config, validate
from metaopt_core.data.sources import SOURCE_NAMES
from metaopt_core.models import MODEL_NAMES


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
    no_algorithm = tmp_path / "none.yaml"
    no_algorithm.write_text("name: x\n")
    with pytest.raises(ConfigError, match=r"field 'algorithm' is missing; allowed: \['arl', 'evaluate', 'itl', 'metamd'\]"):
        load_config(no_algorithm)
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("algorithm: sgd\n")
    with pytest.raises(ConfigError, match=r"field 'algorithm': got 'sgd'; allowed: \['arl', 'evaluate', 'itl', 'metamd'\]"):
        load_config(wrong)


def test_load_config_reports_a_nested_field_with_the_file(tmp_path):
    path = tmp_path / "arl.yaml"
    path.write_text("algorithm: arl\nnoise:\n  kind: gaussian\n  rate: 0.8\n")
    with pytest.raises(ConfigError) as error:
        load_config(path)
    line = next(line for line in str(error.value).splitlines() if "noise.kind" in line)
    assert line.startswith(str(path)) and "got 'gaussian'" in line and "'symmetric'" in line
