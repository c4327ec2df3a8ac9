"""Image-folder datasets in object storage (a moto S3 server) and on volumes: the content manifest
and fingerprint (content, not location; one added image changes it, nothing else does), stable ids,
the ETag-keyed cache, ``metaopt data push/show``, and ``prepare`` reading ``s3://`` sources."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from metaopt_core.config import DataSpec
from metaopt_core.data import prepare
from metaopt_core.data.folders import FETCHERS, folder_content, local_folder_content
from metaopt_core.mlops import datasets
from pipelines.cli import main
from tests.fixtures_s3 import moto_server_url, s3_endpoint  # noqa: F401  (fixtures)


def image_folder(root, domains=("env0", "env1", "env2"), classes=("cat", "dog"), per_class=3, seed=0):
    """``root/<domain>/<class>/<i>.png`` (``domains=()``: ``root/<class>/<i>.png``), 8x8 RGB."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for d, domain in enumerate(domains or ("",)):
        for c, name in enumerate(classes):
            folder = root / domain / name if domain else root / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                pixels = np.clip(rng.normal(0.3 + 0.4 * c, 0.1, (8, 8, 3)) + [0.1 * d, 0, 0], 0, 1)
                Image.fromarray((pixels * 255).astype(np.uint8)).save(folder / f"{i:03d}.png")
    return root


def add_image(root, key, seed=7):
    from PIL import Image

    path = root / key
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(path)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("METAOPT_DATA_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_fingerprint_is_content_not_location(tmp_path, s3_endpoint, cache):
    local = image_folder(tmp_path / "a")
    moved = shutil.copytree(local, tmp_path / "elsewhere")
    (moved / "README.md").write_text("not an image")
    (moved / "env0" / "cat" / ".DS_Store").write_bytes(b"\x00")
    report = datasets.push(local, s3_endpoint.uri("datasets/pets/"), progress=False)
    assert len(report.uploaded) == 18 and report.unchanged == 0
    fingerprints = {
        folder_content(f"folder:{local}").fingerprint,
        folder_content(f"folder:{moved}").fingerprint,  # another path, plus files that are not images
        folder_content(s3_endpoint.uri("datasets/pets/")).fingerprint,  # object storage
    }
    assert len(fingerprints) == 1
    manifest = folder_content(s3_endpoint.uri("datasets/pets/")).manifest()
    assert manifest["layout"] == "domains" and manifest["domains"] == ["env0", "env1", "env2"] and manifest["images"] == 18
    assert all(entry["etag"] and len(entry["sha256"]) == 64 for entry in manifest["entries"])

    add_image(local, "env1/dog/new.png")
    assert folder_content(f"folder:{local}").fingerprint not in fingerprints


def test_stage_downloads_only_new_objects_and_push_only_changes(tmp_path, s3_endpoint, cache):
    local = image_folder(tmp_path / "pets", domains=(), per_class=4)
    uri = s3_endpoint.uri("pets")
    assert datasets.push(local, uri, progress=False).uploaded
    first = datasets.stage(uri)
    assert (first.downloaded, first.cached, first.content.layout) == (8, 0, "classes")
    again = datasets.stage(uri)
    assert (again.downloaded, again.cached) == (0, 8)  # the ETag cache: nothing downloaded twice
    assert again.content.fingerprint == first.content.fingerprint

    add_image(local, "dog/new.png")
    pushed = datasets.push(local, uri, progress=False)
    assert pushed.uploaded == ["dog/new.png"] and pushed.unchanged == 8
    third = datasets.stage(uri)
    assert (third.downloaded, third.cached) == (1, 8) and third.content.fingerprint != first.content.fingerprint


def test_prepare_reads_s3_with_stable_ids_and_content_fingerprint(tmp_path, s3_endpoint, cache):
    local = image_folder(tmp_path / "pets", per_class=4)
    datasets.push(local, s3_endpoint.uri("v1/"), progress=False)
    spec = {"source": s3_endpoint.uri("v1/"), "val_fraction": 0.25}
    from_s3 = prepare(DataSpec(**spec))
    from_folder = prepare(DataSpec(**{**spec, "source": f"folder:{local}"}))
    assert from_s3.domains == ["env0", "env1", "env2"] and from_s3.num_classes == 2
    assert from_s3.fingerprint == from_folder.fingerprint and from_s3.source_fingerprint == from_folder.source_fingerprint
    assert from_s3.content["fingerprint"] == from_s3.source_fingerprint

    saved = from_s3.save(tmp_path / "prepared")
    assert (saved / "content_manifest.json").exists()
    assert type(from_s3).load(saved).fingerprint == from_s3.fingerprint

    ids_before = {int(i) for split in from_s3.splits.values() for i in split.ids}
    add_image(local, "env2/cat/zzz.png")
    datasets.push(local, s3_endpoint.uri("v1/"), progress=False)
    grown = prepare(DataSpec(**spec))
    ids_after = {int(i) for split in grown.splits.values() for i in split.ids}
    assert grown.fingerprint != from_s3.fingerprint
    assert ids_before < ids_after and len(ids_after - ids_before) == 1  # existing images keep their ids


def test_s3_source_without_the_fetcher_says_how(monkeypatch):
    monkeypatch.delitem(FETCHERS, "s3")
    with pytest.raises(FileNotFoundError, match="metaopt_core.mlops.datasets"):
        folder_content("s3://bucket/prefix/")
    assert DataSpec(source="s3://bucket/prefix/").source == "s3://bucket/prefix/"


def test_data_push_and_show_commands(tmp_path, s3_endpoint, cache, capsys):
    local = image_folder(tmp_path / "pets", domains=("a", "b"), per_class=2)
    uri = s3_endpoint.uri("cli/")
    assert main(["data", "push", str(local), uri, "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "pushed 8 image(s)" in out and local_folder_content(local).fingerprint in out
    assert main(["data", "push", str(local), uri, "--quiet"]) == 0
    again = capsys.readouterr().out
    assert "pushed 0 image(s)" in again and "8 unchanged" in again
    assert main(["data", "show", uri]) == 0
    shown = capsys.readouterr().out
    assert "domains      a, b" in shown and "cat: 2, dog: 2" in shown
    assert main(["data", "show", str(local), "--json"]) == 0
    import json

    doc = json.loads(capsys.readouterr().out)
    assert doc["class_counts"] == {"a": {"cat": 2, "dog": 2}, "b": {"cat": 2, "dog": 2}}
