"""Latent datasets: image sources, preprocessing policies, the Zarr latent store, the encoding job, readers.

Format of the store: ``datasets_tools/FORMAT.md``.
"""

from .dataset import BucketBatchSampler, LatentDataset, ShardBatchSampler
from .encode import Summary, encode_dataset
from .preprocess import POLICIES, bucket_sizes, preprocess
from .sources import Sample, SourceError, list_source
from .store import LatentStore, StoreError, store_info

__all__ = ["BucketBatchSampler", "LatentDataset", "ShardBatchSampler", "Summary", "encode_dataset", "POLICIES", "bucket_sizes",
           "preprocess", "Sample", "SourceError", "list_source", "LatentStore", "StoreError", "store_info"]
