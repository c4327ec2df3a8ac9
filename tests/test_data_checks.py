"""Bad data is refused before anything trains, and named by what the user wrote:

- a one-class dataset, or a split a phase trains or scores on that holds one class or one example,
  fails the data preparation naming the split, the phase and the counts;
- an image that does not decode is refused by ``data push`` (nothing uploaded), listed by ``data
  show`` (exit 1), and named by its key in the bucket (not a cache path) when a pipeline reads it;
- an empty class folder is reported by ``data push`` and ``data show``;
- a push publishes its version last (one object), so a reader during a push sees the previous
  version, never half of the new one.
"""

from __future__ import annotations

import pytest
import yaml

from metaopt_core.config import DataSpec
from metaopt_core.data import prepare
from metaopt_core.data.folders import DatasetError, folder_content
from metaopt_core.meta import registry
from metaopt_core.mlops import datasets
from pipelines.cli import main
from tests.fixtures_s3 import moto_server_url, s3_endpoint  # noqa: F401  (fixtures)
from tests.test_datasets import add_image, image_folder


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("METAOPT_DATA_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _itl_on(folder, held_out="env2"):
    learner = registry.get("itl")
    with open("configs/itl-tiny.yaml") as handle:
        doc = yaml.safe_load(handle)
    doc["data"] = {"source": f"folder:{folder}", "val_fraction": 0.25, "seed": 0}
    return learner, learner.resolve_config(doc), {"held_out": [held_out], "epochs": 1}


def test_one_class_and_degenerate_splits_are_refused_before_training(tmp_path):
    learner, config, settings = _itl_on(image_folder(tmp_path / "one", classes=("cat",), per_class=10))
    with pytest.raises(DatasetError, match=r"\(meta-train part\): 1 class; at least 2 are needed"):
        learner.prepare(config, settings)

    # two classes, but so few images that the meta-test scores on one image of the held-out domain
    learner, config, settings = _itl_on(image_folder(tmp_path / "few", per_class=6))
    with pytest.raises(DatasetError) as error:
        learner.prepare(config, settings)
    assert "(meta-test part): splits 'env2/train', 'env2/val' together (meta test) hold 1 example(s); at least 2 are needed" in str(error.value)

    learner, config, settings = _itl_on(image_folder(tmp_path / "enough", per_class=10))
    assert learner.prepare(config, settings).meta_test  # the same data, large enough


def test_unreadable_images_are_named_by_their_key(tmp_path, s3_endpoint, cache, capsys):
    local = image_folder(tmp_path / "pets", domains=(), per_class=3)
    (local / "cat" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    uri = s3_endpoint.uri("pets/")

    assert main(["data", "push", str(local), uri, "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "cat/bad.png" in err and "nothing was uploaded" in err
    assert datasets.list_objects(uri) == []

    assert main(["data", "show", str(local)]) == 1
    captured = capsys.readouterr()
    assert "unreadable   cat/bad.png:" in captured.out and "1 image(s)" in captured.err

    # a bucket filled by another tool: the pipeline's data step names the object, not the cache file
    client = s3_endpoint.client()
    for path in sorted(local.rglob("*.png")):
        client.upload_file(str(path), s3_endpoint.bucket, "pets/" + path.relative_to(local).as_posix())
    with pytest.raises(DatasetError, match=rf"{uri}: image cat/bad.png cannot be read"):
        prepare(DataSpec(source=uri))


def test_empty_class_folders_are_reported(tmp_path, s3_endpoint, cache, capsys):
    local = image_folder(tmp_path / "pets", domains=("a", "b"), per_class=2)
    (local / "b" / "horse").mkdir()
    (local / "b" / "horse" / "notes.txt").write_text("no images yet")
    assert folder_content(f"folder:{local}").empty_folders == ["b/horse"]

    assert main(["data", "push", str(local), s3_endpoint.uri("pets/"), "--quiet"]) == 0
    assert "warning: b/horse/ holds no image" in capsys.readouterr().out
    assert main(["data", "show", str(local)]) == 0
    assert "empty        b/horse/ holds no image" in capsys.readouterr().out


def test_a_reader_during_a_push_sees_the_published_version(tmp_path, s3_endpoint, cache):
    local = image_folder(tmp_path / "pets", per_class=2)
    uri = s3_endpoint.uri("pets/")
    pushed = folder_content(f"folder:{local}").fingerprint
    report = datasets.push(local, uri, progress=False)
    published = folder_content(uri).fingerprint

    # a push in progress: a new image is up, the new list is not written yet
    add_image(local, "env0/cat/new.png")
    s3_endpoint.client().upload_file(str(local / "env0" / "cat" / "new.png"), s3_endpoint.bucket, "pets/env0/cat/new.png")
    assert folder_content(uri).fingerprint == published  # what a scheduled tick reads now
    staged = datasets.stage(uri)
    assert staged.unpublished == 1 and report.fingerprint == published == pushed
    assert "env0/cat/new.png" not in {entry.key for entry in staged.content.entries}

    # ... or an image rewritten in place: the version is not mixed, the read fails and says why
    add_image(local, "env1/dog/000.png", seed=11)
    s3_endpoint.client().upload_file(str(local / "env1" / "dog" / "000.png"), s3_endpoint.bucket, "pets/env1/dog/000.png")
    with pytest.raises(datasets.DatasetChangedError, match="env1/dog/000.png changed since the dataset was published"):
        datasets.stage(uri)

    finished = datasets.push(local, uri, progress=False)  # the push completes: the new version is published
    assert finished.fingerprint == folder_content(uri).fingerprint == folder_content(f"folder:{local}").fingerprint != published
