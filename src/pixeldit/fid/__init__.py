"""FID evaluation: the FID Inception-v3, Frechet distance, cached statistics, ADM-evaluator batches."""

from pixeldit.fid.adm import completed_batches, merge_batches, to_uint8, write_batch
from pixeldit.fid.inception import FIDInceptionV3, load_fid_inception
from pixeldit.fid.stats import (
    cached_statistics,
    extract_features,
    feature_statistics,
    fid_of_features,
    frechet_distance,
    load_statistics,
    save_statistics,
)

__all__ = [
    "FIDInceptionV3",
    "cached_statistics",
    "completed_batches",
    "extract_features",
    "feature_statistics",
    "fid_of_features",
    "frechet_distance",
    "load_fid_inception",
    "load_statistics",
    "merge_batches",
    "save_statistics",
    "to_uint8",
    "write_batch",
]
