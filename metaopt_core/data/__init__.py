"""Datasets: sources by name, label noise, domain builders, splits and fingerprints."""

from metaopt_core.data.domains import colored_domains, rotate, rotated_domains
from metaopt_core.data.noise import NoisyLabels, add_label_noise, pair_flip_map
from metaopt_core.data.prepare import PreparedData, prepare, split_indices
from metaopt_core.data.sources import (
    SOURCE_NAMES,
    DatasetNotFoundError,
    ImageData,
    load_image_folder,
    load_source,
)

__all__ = [
    "SOURCE_NAMES",
    "DatasetNotFoundError",
    "ImageData",
    "NoisyLabels",
    "PreparedData",
    "add_label_noise",
    "colored_domains",
    "load_image_folder",
    "load_source",
    "pair_flip_map",
    "prepare",
    "rotate",
    "rotated_domains",
    "split_indices",
]
