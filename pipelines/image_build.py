"""``make image``: build the CPU and CUDA images of the repository's Dockerfile with docker or
podman, tagged ``<version>-<commit[:12]>`` (what ``components.images`` compiles pipelines with),
the git commit baked in (``METAOPT_GIT_COMMIT``, the ``metaopt.git_commit`` tag of every run),
the dependencies pinned by ``constraints.txt``.

    python -m pipelines.image_build [--variant cpu|cuda|all] [--engine docker|podman] [--push] [--dry-run]

Where neither engine is installed, or the one installed has no running engine (``docker info``
fails), it says which and exits with status 2 instead of building.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable

from components.images import CUDA_SUFFIX, REPOSITORY, default_tag, package_version, source_commit

ENGINES = ("docker", "podman")
TORCH_INDEX = {"cpu": "https://download.pytorch.org/whl/cpu", "cuda": "https://download.pytorch.org/whl/cu130"}
EXIT_NO_ENGINE = 2
REPO_ROOT = Path(__file__).resolve().parents[1]


class NoContainerEngine(RuntimeError):
    """Neither docker nor podman can build here; the message says what was found."""


def find_engine(preferred: str | None = None, *, which: Callable[[str], str | None] = shutil.which, run: Callable = subprocess.run) -> str:
    """The path of the first engine (``preferred``, else docker then podman) that is installed and answers ``info``."""
    found = []
    for name in [preferred] if preferred else ENGINES:
        path = which(name)
        if not path:
            found.append(f"{name}: not installed")
            continue
        try:
            probe = run([path, "info"], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.SubprocessError) as exc:
            found.append(f"{name} at {path}: `{name} info` failed ({exc})")
            continue
        if probe.returncode == 0:
            return path
        detail = (probe.stderr or probe.stdout or "").strip().splitlines()
        found.append(f"{name} at {path}: its engine does not answer ({detail[-1] if detail else f'exit {probe.returncode}'})")
    raise NoContainerEngine(
        "cannot build the images here: " + "; ".join(found) + ". Start the Docker daemon or install Podman, or build where one runs (CI); "
        "`python -m pipelines.image_build --dry-run` prints the commands"
    )


def image_tags(variant: str, tag: str, repository: str = REPOSITORY) -> str:
    return f"{repository}:{tag}{CUDA_SUFFIX if variant == 'cuda' else ''}"


def build_command(engine: str, variant: str, *, commit: str, version: str, repository: str = REPOSITORY, context: Path = REPO_ROOT) -> list[str]:
    """The build command of one variant (cpu or cuda)."""
    if variant not in TORCH_INDEX:
        raise ValueError(f"variant: got {variant!r}; allowed: {sorted(TORCH_INDEX)}")
    return [
        engine, "build", "--file", str(context / "Dockerfile"),
        "--build-arg", f"TORCH_INDEX_URL={TORCH_INDEX[variant]}", "--build-arg", f"GIT_COMMIT={commit}", "--build-arg", f"VERSION={version}",
        "--tag", image_tags(variant, default_tag(version, commit), repository), str(context),
    ]  # fmt: skip


def _dirty() -> bool:
    try:
        out = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return False
    return bool(out.stdout.strip())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.image_build", description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", choices=["cpu", "cuda", "all"], default="all")
    parser.add_argument("--engine", choices=list(ENGINES), default=None, help="default: docker, else podman")
    parser.add_argument("--repository", default=REPOSITORY, help=f"default {REPOSITORY}")
    parser.add_argument("--push", action="store_true", help="push the images after building them")
    parser.add_argument("--dry-run", action="store_true", help="print the commands, build nothing")
    args = parser.parse_args(argv)
    commit = source_commit()
    if not commit:
        print("image_build: no git commit (not a git checkout?); the image's tag and metaopt.git_commit need one", file=sys.stderr)
        return 1
    if _dirty():
        print(f"image_build: warning: uncommitted changes go into the image but not into its tag ({commit[:12]}); commit first", file=sys.stderr)
    variants = ["cpu", "cuda"] if args.variant == "all" else [args.variant]
    try:
        engine = args.engine or "docker" if args.dry_run else find_engine(args.engine)
    except NoContainerEngine as exc:
        print(f"image_build: {exc}", file=sys.stderr)
        return EXIT_NO_ENGINE
    version = package_version()
    for variant in variants:
        command = build_command(engine, variant, commit=commit, version=version, repository=args.repository)
        tag = command[command.index("--tag") + 1]
        steps = [command] + ([[engine, "push", tag]] if args.push else [])
        for step in steps:
            print("+ " + " ".join(step), flush=True)
            if not args.dry_run and subprocess.run(step).returncode != 0:
                return 1
        print(f"{variant}: {tag}")
    return 0


__all__ = ["ENGINES", "EXIT_NO_ENGINE", "NoContainerEngine", "build_command", "find_engine", "image_tags", "main"]

if __name__ == "__main__":
    sys.exit(main())
