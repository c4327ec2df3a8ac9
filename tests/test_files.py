"""metaopt_core.files: atomic local writes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from metaopt_core.files import (
    TEMP_SUFFIX,
    atomic_file,
    atomic_write_bytes,
    atomic_write_text,
    current_umask,
    is_temp_name,
)


def test_write_bytes_creates_parents_and_returns_the_path(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b" / "blob.bin"
    assert atomic_write_bytes(target, b"\x00\x01payload") == target
    assert target.read_bytes() == b"\x00\x01payload"
    assert os.listdir(target.parent) == ["blob.bin"]


def test_write_text_replaces_old_content(tmp_path: Path) -> None:
    target = tmp_path / "state.json"
    atomic_write_text(target, "old")
    atomic_write_text(str(target), "nouveau \u00e9")
    assert target.read_text(encoding="utf-8") == "nouveau \u00e9"
    assert os.listdir(tmp_path) == ["state.json"]


def test_atomic_file_writes_in_chunks(tmp_path: Path) -> None:
    target = tmp_path / "chunks.bin"
    with atomic_file(target) as handle:
        handle.write(b"abc")
        handle.write(b"def")
        assert not target.exists(), "the destination appears only when the block ends"
    assert target.read_bytes() == b"abcdef"


def test_failed_write_keeps_old_content_and_leaves_no_temp_file(tmp_path: Path) -> None:
    target = tmp_path / "model.bin"
    atomic_write_bytes(target, b"version 1")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_file(target) as handle:
            handle.write(b"half of version 2")
            raise RuntimeError("boom")
    assert target.read_bytes() == b"version 1"
    assert os.listdir(tmp_path) == ["model.bin"]


def test_failed_first_write_leaves_nothing(tmp_path: Path) -> None:
    with pytest.raises(KeyboardInterrupt):
        with atomic_file(tmp_path / "never.bin") as handle:
            handle.write(b"x")
            raise KeyboardInterrupt
    assert os.listdir(tmp_path) == []


def test_wrong_types_are_rejected_before_anything_is_written(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="atomic_write_text"):
        atomic_write_bytes(tmp_path / "x", "text")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="allowed: str"):
        atomic_write_text(tmp_path / "x", b"bytes")  # type: ignore[arg-type]
    assert os.listdir(tmp_path) == []


def test_written_files_get_the_permissions_of_a_plain_open(tmp_path: Path) -> None:
    target = atomic_write_bytes(tmp_path / "perm.bin", b"x")
    assert target.stat().st_mode & 0o777 == 0o666 & ~current_umask()


def test_temp_names_are_recognised(tmp_path: Path) -> None:
    seen: list[str] = []
    with atomic_file(tmp_path / "f.bin") as handle:
        handle.write(b"x")
        seen = [name for name in os.listdir(tmp_path)]
    assert len(seen) == 1 and is_temp_name(seen[0]) and seen[0].endswith(TEMP_SUFFIX)
    assert not is_temp_name("f.bin")
    assert not is_temp_name("visible" + TEMP_SUFFIX)
