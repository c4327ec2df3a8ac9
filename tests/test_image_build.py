"""`make image`: finding a container engine that runs (docker, then podman), the build commands,
and a clear failure where none runs. No image is built here."""

from __future__ import annotations

import subprocess

import pytest

from pipelines import image_build
from pipelines.constraints import constraint_lines

COMMIT = "89abcdef" * 5


def _run_returning(codes: dict[str, int]):
    def run(command, **kwargs):
        engine = command[0].rsplit("/", 1)[-1]
        return subprocess.CompletedProcess(command, codes[engine], stdout="", stderr="Cannot connect to the Docker daemon at unix:///var/run/docker.sock")

    return run


def test_first_engine_that_answers_is_used():
    which = {"docker": "/usr/bin/docker", "podman": "/usr/bin/podman"}.get
    assert image_build.find_engine(which=which, run=_run_returning({"docker": 0, "podman": 0})) == "/usr/bin/docker"
    # docker installed but its daemon down: podman
    assert image_build.find_engine(which=which, run=_run_returning({"docker": 1, "podman": 0})) == "/usr/bin/podman"


def test_no_engine_fails_saying_what_was_found():
    with pytest.raises(image_build.NoContainerEngine, match=r"docker: not installed; podman: not installed"):
        image_build.find_engine(which=lambda name: None)
    which = {"docker": "/usr/local/bin/docker"}.get
    with pytest.raises(image_build.NoContainerEngine, match=r"docker at /usr/local/bin/docker: its engine does not answer \(Cannot connect"):
        image_build.find_engine(which=which, run=_run_returning({"docker": 1}))


def test_make_image_exits_non_zero_with_a_message_where_no_engine_runs(monkeypatch, capsys):
    monkeypatch.setattr(image_build, "find_engine", lambda preferred=None: (_ for _ in ()).throw(image_build.NoContainerEngine("no engine here")))
    monkeypatch.setattr(image_build, "source_commit", lambda: COMMIT)
    assert image_build.main(["--variant", "cpu"]) == image_build.EXIT_NO_ENGINE
    assert "no engine here" in capsys.readouterr().err


def test_build_commands_tag_version_and_commit_and_bake_the_commit_in(monkeypatch, capsys):
    cpu = image_build.build_command("docker", "cpu", commit=COMMIT, version="0.1.0")
    assert cpu[cpu.index("--tag") + 1] == "ghcr.io/metaopt/metaopt:0.1.0-89abcdef89ab"
    assert f"GIT_COMMIT={COMMIT}" in cpu and "TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in cpu
    cuda = image_build.build_command("podman", "cuda", commit=COMMIT, version="0.1.0")
    assert cuda[0] == "podman" and cuda[cuda.index("--tag") + 1].endswith("-89abcdef89ab-cuda") and any("cu130" in a for a in cuda)
    monkeypatch.setattr(image_build, "source_commit", lambda: COMMIT)
    assert image_build.main(["--dry-run", "--push"]) == 0
    out = capsys.readouterr().out
    assert out.count("+ docker build") == 2 and out.count("+ docker push") == 2


def test_constraints_are_exact_public_pins_without_this_project():
    freeze = "torch==2.14.1+cpu\nMetaopt-Core==0.1.0\n-e git+https://x#egg=y\npsycopg2-binary @ file:///tmp/p.whl\nKFP==2.17.3\n"
    assert constraint_lines(freeze) == ["kfp==2.17.3", "torch==2.14.1"]
