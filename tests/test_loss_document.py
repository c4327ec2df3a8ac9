"""metaopt_core.losses.document: the white-box loss document (schema, build, round trip)."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest
import torch

from metaopt_core.losses import (
    LossDocumentError,
    ScaledLoss,
    SymmetricCrossEntropy,
    TaylorLoss,
    document_of_loss,
    families,
    get_loss,
    loss_from_document,
    validate_loss_document,
)
from metaopt_core.losses.document import FORMAT, FORMAT_VERSION
from metaopt_core.losses.families import family_from_dict
from metaopt_core.losses.parametric import ISCEFamily, TaylorFamily


def hand_doc() -> dict:
    return {
        "family": "taylor",
        "order": 2,
        "form": "monomial",
        "sign": "negative-sum-over-classes",
        "class_reduction": "sum",
        "params": [0.0, 0.0, 1.0, 0.0, 2.0],
        "normalisation": {"enabled": False, "eta": 1.0},
    }


def through_json(doc: dict) -> dict:
    return json.loads(json.dumps(doc))


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return torch.randn(6, 4, generator=generator), torch.randint(0, 4, (6,), generator=generator)


@pytest.mark.parametrize("normalise", [False, True])
@pytest.mark.parametrize("class_reduction", ["sum", "mean"])
def test_taylor_round_trip_is_exact(normalise, class_reduction):
    loss = TaylorLoss.from_preset("arl-ar-s80", normalise=normalise, eta=2.0, class_reduction=class_reduction)
    doc = through_json(document_of_loss(loss))
    assert doc["format"] == FORMAT and doc["format_version"] == FORMAT_VERSION
    assert {k: v for k, v in doc.items() if not k.startswith("format")} == loss.to_dict()
    rebuilt = loss_from_document(doc)
    assert isinstance(rebuilt, TaylorLoss)
    assert torch.equal(rebuilt.params, loss.params)
    assert (rebuilt.normalise, rebuilt.eta, rebuilt.class_reduction) == (normalise, 2.0, class_reduction)
    logits, target = batch()
    assert torch.equal(rebuilt(logits, target), loss(logits, target))
    assert document_of_loss(rebuilt) == document_of_loss(loss)


def test_documents_without_format_header_and_with_meta_are_accepted():
    doc = {**hand_doc(), "meta": {"algorithm": "itl"}}
    assert validate_loss_document(doc) == doc
    assert loss_from_document(doc, reduction="none")(*batch()).shape == (6,)


@pytest.mark.parametrize(
    "name, kwargs",
    [("gce", {"q": 0.5}), ("sce", {"alpha": 0.3, "beta": 2.0, "log_zero": -6.0}), ("ce", {}),
     ("focal", {"gamma": 1.0, "alpha": [0.5, 1.0, 1.0, 2.0]}), ("forward", {"transition_matrix": torch.eye(4) * 0.7 + 0.075})],
)  # fmt: skip
def test_named_losses_round_trip(name, kwargs):
    loss = get_loss(name, **kwargs)
    doc = through_json(document_of_loss(loss))
    assert doc["family"] == name and "reduction" not in doc["params"]
    rebuilt = loss_from_document(doc)
    assert type(rebuilt) is type(loss)
    logits, target = batch()
    assert torch.allclose(rebuilt(logits, target), loss(logits, target))


def test_reduction_is_chosen_at_load_time():
    logits, target = batch()
    per_example = loss_from_document({"family": "gce", "params": {"q": 0.7}}, reduction="none")
    assert per_example(logits, target).shape == (6,)
    assert loss_from_document(hand_doc(), reduction="sum").reduction == "sum"
    with pytest.raises(ValueError, match="reduction"):
        loss_from_document(hand_doc(), reduction="max")


@pytest.mark.parametrize(
    "change, field, allowed",
    [
        ({"family": "polynomial"}, "family", "one of"),
        ({"family": 3}, "family", "'taylor'"),
        ({"order": 6}, "order", "[2, 3, 4, 5]"),
        ({"order": True}, "order", "[2, 3, 4, 5]"),
        ({"form": "chebyshev"}, "form", "'taylor' or 'monomial'"),
        ({"params": [0.0] * 4}, "params", "a list of 5 numbers"),
        ({"params": [0.0, 0.0, float("nan"), 0.0, 1.0]}, "params[2]", "a finite number"),
        ({"params": [0.0, 0.0, True, 0.0, 1.0]}, "params[2]", "a finite number"),
        ({"sign": "positive"}, "sign", "negative-sum-over-classes"),
        ({"class_reduction": "max"}, "class_reduction", "'sum' or 'mean'"),
        ({"normalisation": "yes"}, "normalisation", "an object"),
        ({"normalisation": {"enabled": 1}}, "normalisation.enabled", "true or false"),
        ({"normalisation": {"enabled": True, "eta": -1}}, "normalisation.eta", "> 0"),
        ({"format": "other"}, "format", "'metaopt.loss'"),
        ({"format_version": 2}, "format_version", "[1]"),
        ({"meta": [1]}, "meta", "an object"),
    ],
)
def test_bad_fields_are_named_with_the_allowed_values(change, field, allowed):
    doc = {**hand_doc(), **change}
    with pytest.raises(LossDocumentError, match=re.escape(f"field '{field}'")) as info:
        validate_loss_document(doc, source="x.json")
    assert str(info.value).startswith("x.json: ") and allowed in str(info.value)
    with pytest.raises(ValueError):  # LossDocumentError is a ValueError
        loss_from_document(doc)


def test_not_an_object_and_bad_named_params():
    with pytest.raises(LossDocumentError, match="allowed: an object"):
        validate_loss_document([1, 2])
    with pytest.raises(LossDocumentError, match="field 'params'"):
        validate_loss_document({"family": "gce", "params": [0.7]})
    with pytest.raises(LossDocumentError, match="field 'params'.*qq"):
        loss_from_document({"family": "gce", "params": {"qq": 0.7}})


def test_document_of_an_unknown_module_is_a_type_error():
    with pytest.raises(TypeError, match=r"got CrossEntropyLoss; allowed: a learned family.s module \(with to_dict\(\)\)"):
        document_of_loss(torch.nn.CrossEntropyLoss())


def test_family_from_dict_keeps_normalisation_and_class_reduction():
    loss = TaylorLoss.from_preset("itl", normalise=True, eta=0.5, class_reduction="mean")
    family, params = family_from_dict(through_json(loss.to_dict()))
    assert isinstance(family, TaylorFamily)
    assert (family.normalise, family.eta, family.class_reduction) == (True, 0.5, "mean")
    logits, target = batch()
    assert torch.allclose(family.to_module(params)(logits, target), loss(logits, target))
    assert torch.allclose(family.functional(params, logits, target), loss(logits, target))
    with pytest.raises(LossDocumentError, match="field 'order'"):
        family_from_dict({**loss.to_dict(), "order": 9})


def test_family_from_dict_reads_isce_documents():
    family = ISCEFamily(log_zero=-6.0)
    params = family.init([0.3, 2.0])
    rebuilt, raw = family_from_dict(through_json(family.to_dict(params)))
    assert isinstance(rebuilt, ISCEFamily) and torch.equal(raw, params)
    assert isinstance(loss_from_document(family.to_dict(params)), SymmetricCrossEntropy)


def test_an_lr_scale_multiplies_the_loss_and_survives_a_round_trip():
    """A stored lr_scale is the loss's multiplier (what makes a learned loss a drop-in at CE's lr)."""
    import torch

    from metaopt_core.losses import ScaledLoss, document_of_loss, loss_from_document

    logits, labels = torch.randn(6, 10, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 1, 2, 3, 4, 5])
    plain = loss_from_document({"family": "ce", "params": {}})
    scaled = loss_from_document({"family": "ce", "params": {}, "lr_scale": 0.25})
    assert isinstance(scaled, ScaledLoss) and not isinstance(plain, ScaledLoss)
    assert float(scaled(logits, labels)) == pytest.approx(0.25 * float(plain(logits, labels)))
    assert document_of_loss(scaled)["lr_scale"] == 0.25
    assert not isinstance(loss_from_document(document_of_loss(scaled), apply_lr_scale=False), ScaledLoss)
    for bad in (0, -1.0, float("inf"), "0.1", True):
        with pytest.raises(LossDocumentError, match="lr_scale"):
            validate_loss_document({"family": "ce", "params": {}, "lr_scale": bad})


# ----------------------------------------------------------------------------- the representation table


@pytest.mark.parametrize("name", families.names())
def test_every_family_round_trips_through_its_document_and_takes_an_lr_scale(name):
    """Every family of the table: to_dict -> JSON -> the loader (which looks the family up) builds
    the same loss, family_from_dict gives back the same ω, and an lr_scale multiplies it."""
    family = families.build_family(name)
    params = family.init(families.CE_LIKE)
    doc = through_json(family.to_dict(params))
    logits, target = torch.randn(6, 4, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 1, 2, 3, 0, 1])
    module = loss_from_document(doc)
    assert torch.allclose(module(logits, target), family.functional(params, logits, target), rtol=1e-5, atol=1e-6)
    rebuilt, rebuilt_params = family_from_dict(doc)
    assert rebuilt == family and torch.equal(rebuilt_params, params)
    scaled = loss_from_document({**doc, "lr_scale": 0.25})
    assert torch.allclose(scaled(logits, target), 0.25 * module(logits, target))
    assert document_of_loss(module)["family"] == doc["family"]


def test_a_family_added_to_the_table_is_what_the_loader_builds(monkeypatch):
    """The loader has no list of families: one entry in the table makes a new document family load."""

    @dataclasses.dataclass(frozen=True)
    class DoubledTaylor(TaylorFamily):
        kind: str = "doubled"

        @classmethod
        def module_from_document(cls, doc, reduction, source):
            return ScaledLoss(TaylorLoss.from_dict({**doc, "family": "taylor"}, reduction=reduction), 2.0)

    monkeypatch.setitem(families.FAMILIES, "doubled", f"{__name__}:DOUBLED")
    monkeypatch.setitem(globals(), "DOUBLED", DoubledTaylor)
    monkeypatch.setattr(families._TABLE, "_loaded", {})
    doc = {**hand_doc(), "family": "doubled"}
    logits, target = torch.randn(3, 4), torch.tensor([0, 1, 2])
    assert torch.allclose(loss_from_document(doc)(logits, target), 2 * loss_from_document(hand_doc())(logits, target))
    with pytest.raises(LossDocumentError, match=r"field 'order': got 9"):
        validate_loss_document({**doc, "order": 9})
    with pytest.raises(LossDocumentError, match=r"field 'family': got 'tripled'; allowed: a loss family \[.*'doubled'.*\] or one of"):
        validate_loss_document({**doc, "family": "tripled"})
