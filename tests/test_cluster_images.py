"""Which images and how many GPUs a cluster compile asks for: ``--image`` alone gives GPU steps its
CUDA variant (never the default registry's), and the compile message counts the GPUs the pods
request."""

from __future__ import annotations

import json

import pytest
import yaml

DIGEST = "registry.example.com/ml/metaopt@sha256:" + "a" * 64


@pytest.fixture(autouse=True)
def no_image_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from components import images

    monkeypatch.delenv(images.IMAGE_ENV, raising=False)
    monkeypatch.delenv(images.IMAGE_CUDA_ENV, raising=False)


def test_image_alone_gives_the_gpu_steps_its_cuda_variant(monkeypatch: pytest.MonkeyPatch) -> None:
    from components import images
    from pipelines.builder import PipelineOptions

    options = PipelineOptions(gpu=True, image="registry.example.com/ml/metaopt:1.2.3")
    assert (options.image, options.image_cuda) == ("registry.example.com/ml/metaopt:1.2.3", "registry.example.com/ml/metaopt:1.2.3-cuda")
    assert PipelineOptions(gpu=True, image="r.example.com/m:1", image_cuda=DIGEST).image_cuda == DIGEST  # named: used as is
    # the environment's pair, the CUDA one derived when only the CPU one is set
    monkeypatch.setenv(images.IMAGE_ENV, "registry.example.com/ml/metaopt:2.0")
    assert PipelineOptions(gpu=True).image_cuda == "registry.example.com/ml/metaopt:2.0-cuda"
    monkeypatch.setenv(images.IMAGE_CUDA_ENV, "registry.example.com/ml/metaopt-gpu:2.0")
    assert PipelineOptions(gpu=True).image_cuda == "registry.example.com/ml/metaopt-gpu:2.0"
    # --image on the command line beats an environment's CUDA image of another build
    assert PipelineOptions(gpu=True, image="registry.example.com/ml/metaopt:3.0").image_cuda == "registry.example.com/ml/metaopt:3.0-cuda"


def test_a_numeric_tag_is_a_tag_and_a_port_belongs_to_the_registry() -> None:
    from components.images import cuda_variant, validate_image

    assert validate_image("registry.example.com/ml/metaopt:1") and cuda_variant("metaopt:1") == "metaopt:1-cuda"  # was read as a port
    assert cuda_variant("localhost:5000/ml/metaopt:2.0") == "localhost:5000/ml/metaopt:2.0-cuda"
    with pytest.raises(ValueError, match="REPOSITORY:TAG"):
        validate_image("localhost:5000/ml/metaopt")  # a port, no tag


def test_a_digest_has_no_derivable_cuda_image() -> None:
    from pipelines.builder import PipelineOptions

    with pytest.raises(ValueError, match=r"image_cuda: .*pinned by digest.*--image-cuda"):
        PipelineOptions(gpu=True, image=DIGEST)
    assert PipelineOptions(gpu=False, image=DIGEST).image == DIGEST  # no GPU step: nothing to derive
    assert PipelineOptions(gpu=True, image=DIGEST, image_cuda=DIGEST.replace("metaopt@", "metaopt-cuda@")).image_cuda.startswith(
        "registry.example.com/ml/metaopt-cuda@"
    )


def test_the_compile_message_counts_the_gpus_the_pods_request(tmp_path, capsys: pytest.CaptureFixture) -> None:
    from pipelines.builder import PipelineOptions
    from pipelines.cli import main

    assert PipelineOptions(gpu=True).gpu_summary() == "GPU (CUDA image): 1 GPU per meta-training block, 1 for the meta-test"
    assert PipelineOptions(gpu=True, shards=4).gpu_summary() == "GPU (CUDA image): 4 GPUs at once for meta-training (1 per shard task), 1 for the meta-test"
    assert PipelineOptions(gpu=False, workers=4).gpu_summary() == "CPU"
    out = tmp_path / "itl.yaml"
    assert main(["compile", "itl", "-o", str(out), "--gpu", "--workers", "6", "--nodes", "2", "--image", "registry.example.com/ml/metaopt:1.2.3"]) == 0
    message = capsys.readouterr().out
    assert "6 GPUs at once for meta-training (2 node(s) x 3, one per worker), 1 for the meta-test" in message
    spec = next(yaml.safe_load_all(out.read_text()))
    # what the TrainJob gets (the step's `image` input) and what the pods ask for (components/trainjob_client.py)
    [task] = [t for c in spec["components"].values() for key, t in c.get("dag", {}).get("tasks", {}).items() if key == "meta-train"]
    assert task["inputs"]["parameters"]["image"]["runtimeValue"]["constant"] == "registry.example.com/ml/metaopt:1.2.3-cuda"
    assert task["inputs"]["parameters"]["nodes"]["runtimeValue"]["constant"] == 2
    from components.trainjob_client import resources_per_node, split_workers

    assert int(resources_per_node(split_workers(6, 2), gpu=True)["gpu"]) * 2 == 6
    meta_test = spec["deploymentSpec"]["executors"]["exec-meta-test"]["container"]
    assert meta_test["image"] == "registry.example.com/ml/metaopt:1.2.3-cuda" and meta_test["resources"]["accelerator"]["resourceCount"] == "1"
    assert json.dumps(spec).count("ghcr.io/metaopt") == 0, "no step pulls the default registry's image"
