"""Data discipline: a source is cut into meta-train and meta-test parts before domains, noise and
splits are built; every run's split manifest says which examples and domains each phase reads; an
overlap between meta-training and the meta-test is refused before any training."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from metaopt_core.config import ConfigError, DataSpec
from metaopt_core.data.manifest import SplitManifest, SplitOverlapError
from metaopt_core.data.prepare import prepare
from metaopt_core.meta import PreparedInputs, registry

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _ids(data) -> set[int]:
    return {int(i) for split in data.splits.values() for i in split.ids}


def test_the_parts_of_a_source_are_disjoint_and_cover_it():
    spec = {"source": "digits", "noise": {"kind": "symmetric", "rate": 0.4}}
    train, test, whole = (prepare({**spec, "part": part}) for part in ("meta-train", "meta-test", "all"))
    assert _ids(train).isdisjoint(_ids(test))
    assert _ids(train) | _ids(test) == _ids(whole) == set(range(1797))
    assert abs(len(_ids(test)) / 1797 - 0.3) < 0.03  # each example's side is a hash of its id
    # the cut is the source's, not the spec's: another seed or limit draws from the same part
    other = prepare({**spec, "part": "meta-test", "seed": 5, "max_examples": 100})
    assert _ids(other) <= _ids(test) and len(_ids(other)) == 100
    assert train.source_fingerprint == test.source_fingerprint == whole.source_fingerprint


def test_domains_are_built_on_a_part_and_can_be_left_out():
    spec = {"source": "digits", "domains": "rotated", "angles": [0, 45, 90], "max_examples": 300}
    train = prepare({**spec, "part": "meta-train", "exclude_domains": ["rot90"]})
    test = prepare({**spec, "part": "meta-test"})
    assert train.domains == ["digits-rot0", "digits-rot45"] and test.domains == ["digits-rot0", "digits-rot45", "digits-rot90"]
    assert _ids(train).isdisjoint(_ids(test))
    with pytest.raises(ValueError, match=r"exclude_domains: got \['rot60'\]; allowed: domains of the source"):
        prepare({**spec, "exclude_domains": ["rot60"]})


def test_overlapping_phases_are_refused_naming_both_and_the_count():
    spec = DataSpec(source="digits", max_examples=200)
    seen = prepare(spec)
    again = prepare(spec.model_copy(update={"seed": 1}))  # another split of the same 200 images
    manifest = SplitManifest().add("inner_training", seen, ["train"]).add("meta_test", again, ["val"])
    shared = len({int(i) for i in seen.splits["train"].ids} & {int(i) for i in again.splits["val"].ids})
    assert shared > 0
    with pytest.raises(SplitOverlapError, match=f"phases 'inner_training' and 'meta_test' share {shared} example"):
        manifest.check()
    # the same check on the parts passes, and the manifest round-trips with its ids
    train, test = prepare(spec.model_copy(update={"part": "meta-train"})), prepare(spec.model_copy(update={"part": "meta-test"}))
    ok = SplitManifest().add("inner_training", train).add("meta_test", test).check()
    assert SplitManifest.from_dict(ok.to_dict()).to_dict() == ok.to_dict()
    assert ok.to_dict()["summary"]["meta_test"]["examples"] == len(_ids(test))


def test_a_held_out_domain_that_meta_training_saw_is_refused():
    spec = {"source": "digits", "domains": "rotated", "angles": [0, 45, 90], "max_examples": 300}
    train = prepare({**spec, "part": "meta-train"})  # rot90 not excluded
    test = prepare({**spec, "part": "meta-test"})
    manifest = SplitManifest().add("inner_training", train, ["digits-rot90/train"]).add("meta_test", test, ["digits-rot90/train"])
    with pytest.raises(SplitOverlapError, match=r"share 1 domain\(s\) \['rot90'\]"):
        manifest.check()


def test_learners_prepare_disjoint_meta_training_and_meta_test(tmp_path):
    itl = registry.get("itl")
    config = itl.resolve_config(yaml.safe_load((CONFIGS / "itl-tiny.yaml").read_text()))
    inputs = itl.prepare(config, {"held_out": ["rot90"]})
    assert [d.removeprefix("digits-") for d in inputs.datasets[0].domains] == ["rot0", "rot45"]  # meta-training never sees rot90
    assert _ids(inputs.datasets[0]).isdisjoint(_ids(inputs.meta_test[0]))
    summary = inputs.manifest["summary"]
    assert summary["meta_test"]["domains"] == ["digits-rot90"] and "digits-rot90" not in summary["inner_training"]["domains"]
    # the manifest travels with the prepared inputs
    reloaded = PreparedInputs.load(inputs.save(tmp_path / "inputs"))
    assert reloaded.manifest == inputs.manifest and reloaded.meta_test_settings["held_out"] == ["rot90"]
    with pytest.raises(ConfigError, match="field 'held_out': got \\[\\]"):
        itl.prepare(config, {"held_out": []})

    arl = registry.get("arl")  # a meta-test on the pool's own source gets the other part of it
    config = arl.resolve_config(yaml.safe_load((CONFIGS / "arl-tiny.yaml").read_text()))
    inputs = arl.prepare(config, {"tasks": [{"source": config.dataset_specs()[0].source, "max_examples": 200}], "seeds": 2})
    assert inputs.datasets[0].spec["part"] == "meta-train" and {d.spec["part"] for d in inputs.meta_test} == {"meta-test"}
    assert all(_ids(inputs.datasets[0]).isdisjoint(_ids(unit)) for unit in inputs.meta_test)
    # every unit its own split of the meta-test part: one unit's test examples may train another, never itself
    first, second = inputs.meta_test
    assert set(first.splits["val"].ids.tolist()) != set(second.splits["val"].ids.tolist())


def test_every_example_is_identified_by_its_row_in_the_source():
    data = prepare({"source": "digits", "max_examples": 50})
    ids = torch.cat([split.ids for split in data.splits.values()])
    assert len(ids) == 50 and len(set(ids.tolist())) == 50  # every example once, by its row in the source
