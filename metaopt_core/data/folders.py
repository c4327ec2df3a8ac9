"""Image-folder sources read by content.

A folder source holds images in one of two layouts: ``<class>/<image>`` (one dataset) or
``<domain>/<class>/<image>`` (one dataset per domain, for domain shift). Its **content manifest**
lists every image file (relative key, size, sha256, and the ETag where the bytes came from object
storage); the manifest's digest is the source's fingerprint, so the same images under another path
or bucket keep it, one added image changes it, and files that are not images (README, .DS_Store)
change nothing. Each example's id is derived from its key, so existing images keep their ids when
images are added.

Where the files come from is a *scheme*: ``folder:<path>`` (or a mounted volume path) is read here;
other schemes (``s3://``) are staged to local files by a fetcher registered with
:func:`register_fetcher` (``metaopt_core.mlops.datasets`` registers ``s3``; this package never
imports boto3).
"""

from __future__ import annotations

import hashlib
import os
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from metaopt_core.data.sources import IMAGE_SUFFIXES, DatasetNotFoundError, ImageData


class DatasetError(ValueError):
    """A dataset's content is unusable (an image that does not decode, too few classes or examples);
    the message names the image or split and what to do."""


CONTENT_FORMAT = "metaopt.content-manifest/1"
FOLDER_PREFIX = "folder:"
# Schemes a folder source may name; a fetcher must be registered before one is read.
REMOTE_SCHEMES = ("s3",)


@dataclass(frozen=True)
class ContentEntry:
    """One image of a folder source: its key relative to the source root ('/'-separated)."""

    key: str
    size: int
    sha256: str
    etag: str = ""

    def to_dict(self) -> dict:
        return {"key": self.key, "size": self.size, "sha256": self.sha256, **({"etag": self.etag} if self.etag else {})}


@dataclass
class FolderContent:
    """What a folder source holds (entries sorted by key) and where each file is on this machine."""

    source: str
    entries: list[ContentEntry]
    paths: dict[str, Path] = field(default_factory=dict)  # key -> local file (empty: manifest only)
    # Domain or class folders that hold no image (reported, not an error: the class is simply absent)
    empty_folders: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.entries = sorted(self.entries, key=lambda entry: entry.key)
        depths = {entry.key.count("/") for entry in self.entries}
        if len(depths) > 1:
            raise DatasetNotFoundError(f"image folder {self.source} mixes layouts: images at <class>/<image> and at <domain>/<class>/<image>; use one of them")

    @property
    def layout(self) -> str:
        """``domains`` (``<domain>/<class>/<image>``) or ``classes`` (``<class>/<image>``)."""
        return "domains" if self.entries and self.entries[0].key.count("/") == 2 else "classes"

    @property
    def fingerprint(self) -> str:
        return content_fingerprint(self.entries)

    def classes(self) -> list[str]:
        return sorted({entry.key.split("/")[-2] for entry in self.entries})

    def domains(self) -> list[str]:
        return sorted({entry.key.split("/")[0] for entry in self.entries}) if self.layout == "domains" else []

    def class_counts(self) -> dict[str, dict[str, int]]:
        """``{domain: {class: images}}`` (domain ``""`` in the classes layout)."""
        counts: dict[str, Counter] = {}
        for entry in self.entries:
            parts = entry.key.split("/")
            domain = parts[0] if len(parts) == 3 else ""
            counts.setdefault(domain, Counter())[parts[-2]] += 1
        return {domain: dict(sorted(counter.items())) for domain, counter in sorted(counts.items())}

    def manifest(self) -> dict:
        """The content manifest (JSON-able): what a run records as an artifact."""
        return {"format": CONTENT_FORMAT, "source": self.source, "layout": self.layout, "fingerprint": self.fingerprint,
                "images": len(self.entries), "bytes": sum(e.size for e in self.entries), "classes": self.classes(),
                "domains": self.domains(), "empty_folders": list(self.empty_folders),
                "entries": [entry.to_dict() for entry in self.entries]}  # fmt: skip


def empty_folders(keys: list[str], depth: int) -> list[str]:
    """The folders among ``keys`` (files and folders, '/'-separated, a folder may end in '/') down
    to ``depth`` levels (1: classes; 2: domains and their classes) that hold no image below them."""
    folders, full = set(), set()
    for key in keys:
        parts = [part for part in key.split("/") if part]
        if any(part.startswith(".") for part in parts):
            continue
        folder_parts = parts if key.endswith("/") else parts[:-1]
        for level in range(1, min(depth, len(folder_parts)) + 1):
            folders.add("/".join(folder_parts[:level]))
        if is_image_key("/".join(parts)):
            for level in range(1, len(parts)):
                full.add("/".join(parts[:level]))
    return sorted(folders - full)


def unreadable_images(content: FolderContent) -> list[tuple[str, str]]:
    """``(key, reason)`` of every image of ``content`` (with local ``paths``) that does not decode:
    what ``data push`` refuses, ``data show`` lists and the pipeline's data step names by key."""
    from PIL import Image

    bad = []
    for entry in content.entries:
        try:
            with Image.open(content.paths[entry.key]) as image:
                image.load()
        except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError ...
            bad.append((entry.key, " ".join(str(exc).split()) or type(exc).__name__))
    return bad


def content_fingerprint(entries: list[ContentEntry]) -> str:
    """sha256 over the sorted (key, size, sha256) of the images: what is there, not where."""
    digest = hashlib.sha256(f"{CONTENT_FORMAT}\n".encode())
    for entry in sorted(entries, key=lambda e: e.key):
        digest.update(f"{entry.key}\t{entry.size}\t{entry.sha256}\n".encode())
    return digest.hexdigest()


def is_image_key(key: str) -> bool:
    """An image at ``<class>/<image>`` or ``<domain>/<class>/<image>``; hidden files and others are skipped."""
    parts = key.split("/")
    return 2 <= len(parts) <= 3 and all(parts) and not any(part.startswith(".") for part in parts) and Path(key).suffix.lower() in IMAGE_SUFFIXES


def stable_id(key: str) -> int:
    """A non-negative int64 id of an image key: it does not move when other images are added."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") >> 1


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ----------------------------------------------------------------------------- where folders come from

Fetcher = Callable[[str], FolderContent]
FETCHERS: dict[str, Fetcher] = {}


def register_fetcher(scheme: str, fetcher: Fetcher) -> None:
    """Let folder sources named ``<scheme>://...`` be read: ``fetcher(uri)`` stages the images
    locally and returns their :class:`FolderContent` (with ``paths``)."""
    FETCHERS[scheme.lower()] = fetcher


def scheme_of(source: str) -> str:
    head, sep, _ = source.partition("://")
    return head.lower() if sep and head.isalnum() else ""


def is_folder_source(source: str) -> bool:
    """``folder:<path>`` or a URI of a folder scheme (``s3://bucket/prefix/``)."""
    return source.startswith(FOLDER_PREFIX) or scheme_of(source) in (*REMOTE_SCHEMES, *FETCHERS)


def local_folder_content(root: str | Path, source: str | None = None) -> FolderContent:
    """The content of a local (or mounted-volume) folder: every image file hashed."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetNotFoundError(
            f"image folder {root} does not exist. Stage it as {root}/<domain>/<class>/<image files> "
            f"(the PACS / OfficeHome / VLCS / TerraIncognita layout) or {root}/<class>/<image files>, "
            f"e.g. by unpacking DomainBed's download there."
        )
    entries, paths, seen = [], {}, []
    for directory, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        relative = Path(directory).relative_to(root).as_posix()
        if relative != ".":
            seen.append(relative + "/")
        for name in sorted(filenames):
            path = Path(directory) / name
            key = path.relative_to(root).as_posix()
            if is_image_key(key):
                entries.append(ContentEntry(key, path.stat().st_size, file_sha256(path)))
                paths[key] = path
    if not entries:
        raise DatasetNotFoundError(f"image folder {root} holds no <class>/<image> or <domain>/<class>/<image> files")
    content = FolderContent(source or f"{FOLDER_PREFIX}{root}", entries, paths)
    content.empty_folders = empty_folders(seen + list(paths), 2 if content.layout == "domains" else 1)
    return content


def folder_content(source: str) -> FolderContent:
    """The content of a folder source, staged locally: ``folder:<path>`` here, other schemes by
    their registered fetcher (an error says how to register one)."""
    if source.startswith(FOLDER_PREFIX):
        return local_folder_content(source.removeprefix(FOLDER_PREFIX), source)
    scheme = scheme_of(source)
    if scheme not in FETCHERS:
        hint = "import metaopt_core.mlops.datasets (the pipeline's data step and `metaopt data` do)" if scheme == "s3" else "register_fetcher"
        raise DatasetNotFoundError(f"source {source!r}: no fetcher for {scheme or 'this'}:// sources is registered; {hint}")
    return FETCHERS[scheme](source)


# ----------------------------------------------------------------------------- images


def _read_images(content: FolderContent, entries: list[ContentEntry], classes: list[str], image_size: int, name: str) -> ImageData:
    from PIL import Image

    images, labels, ids = [], [], []
    for entry in entries:
        try:
            with Image.open(content.paths[entry.key]) as image:
                image = image.convert("RGB").resize((image_size, image_size))
                images.append(np.asarray(image, dtype=np.float32).transpose(2, 0, 1) / 255.0)
        except Exception as exc:  # named by its key in the source, not by the cache file it was staged to
            raise DatasetError(f"{content.source}: image {entry.key} cannot be read ({' '.join(str(exc).split()) or type(exc).__name__}); "
                               f"fix or remove it (`metaopt data show {content.source.removeprefix(FOLDER_PREFIX)}` lists every unreadable image)") from None  # fmt: skip
        labels.append(classes.index(entry.key.split("/")[-2]))
        ids.append(stable_id(entry.key))
    return ImageData(torch.from_numpy(np.stack(images)), torch.tensor(labels), len(classes), name, ids=torch.tensor(ids, dtype=torch.int64))


def read_domains(content: FolderContent, image_size: int = 64) -> dict[str, ImageData]:
    """One ImageData per domain of a ``<domain>/<class>/<image>`` folder. Class indices come from
    the sorted union of class names, so every domain agrees."""
    if content.layout != "domains":
        raise ValueError(f"image folder {content.source}: expected <domain>/<class>/<image>, found <class>/<image>")
    classes = content.classes()
    return {domain: _read_images(content, [e for e in content.entries if e.key.split("/")[0] == domain], classes, image_size, domain)
            for domain in content.domains()}  # fmt: skip


def read_classes(content: FolderContent, image_size: int = 64, name: str = "folder") -> ImageData:
    """The images of a ``<class>/<image>`` folder as one ImageData."""
    if content.layout != "classes":
        raise ValueError(f"image folder {content.source}: expected <class>/<image>, found <domain>/<class>/<image>")
    return _read_images(content, content.entries, content.classes(), image_size, name)


__all__ = [
    "CONTENT_FORMAT",
    "FETCHERS",
    "FOLDER_PREFIX",
    "REMOTE_SCHEMES",
    "ContentEntry",
    "DatasetError",
    "FolderContent",
    "content_fingerprint",
    "empty_folders",
    "file_sha256",
    "folder_content",
    "is_folder_source",
    "is_image_key",
    "local_folder_content",
    "read_classes",
    "read_domains",
    "register_fetcher",
    "scheme_of",
    "stable_id",
    "unreadable_images",
]
