"""On-disk contracts: WebDataset sample keys, the shard manifest, the teacher-cache Zarr layout.

Bump a ``*_SCHEMA_VERSION`` whenever the layout changes; readers refuse other versions.
"""

from __future__ import annotations

SPLITS = ("train", "val")

# WebDataset shards ---------------------------------------------------------------------
KEY_DIGITS = 9  # sample key = zero-padded global row index within its split, no dots
SHARD_PATTERN = "{split}-{index:06d}.tar"
MANIFEST_NAME = "manifest.json"
MANIFEST_SCHEMA_VERSION = 1
LABEL_EXT = "cls"
IMAGE_EXTS = ("png", "jpg", "jpeg", "webp", "bmp")


def sample_key(index: int) -> str:
    """The WebDataset ``__key__`` of the sample at global row ``index`` of its split."""
    return f"{index:0{KEY_DIGITS}d}"


# Teacher cache (Zarr v3, one group per split) ------------------------------------------
CACHE_SCHEMA_VERSION = 1
CACHE_KIND = "cifd-teacher-cache"
VIEW_FIELDS = ("top", "left", "height", "width", "flip")  # source-pixel box + horizontal flip
EMBEDDINGS = "embeddings"  # (N, V, D) float16
LOGITS = "logits"  # (N, V, C) float16 | float32
VIEWS = "views"  # (N, V, len(VIEW_FIELDS)) float32
LABELS = "labels"  # (N,) int64
INDEX = "index"  # (N,) int64, the global row index (the WebDataset key as an integer)
DONE = "done"  # (num_shards,) uint8, 1 once a shard's rows are fully written
ROW_ARRAYS = (EMBEDDINGS, LOGITS, VIEWS, LABELS, INDEX)
# Chunk compression of every cache array (Blosc): zstd level 3 with byte shuffle.
COMPRESSOR = {"cname": "zstd", "clevel": 3, "shuffle": "shuffle"}

# Root attributes of the teacher cache.
ATTR_SCHEMA = "schema_version"
ATTR_KIND = "kind"
ATTR_PROVENANCE = "provenance"
ATTR_FINGERPRINT = "fingerprint"
ATTR_COMPLETE = "complete"
ATTR_SOURCES = "sources"

# RDM cache (Zarr v3, one group per split, row-aligned with the teacher cache) ----------
RDM_SCHEMA_VERSION = 1
RDM_KIND = "cifd-rdm-cache"
RDM_X_HAT = "x_hat"  # (N, V, M, D) float16: each RDM's reconstructed embedding
RDM_LOGITS = "logits"  # (N, V, M, C) float32: each RDM's logits
ATTR_TEACHER_CACHE = "teacher_cache_fingerprint"
ATTR_RDM = "rdm"  # config, rate weights, embedding scale, checkpoint sha256
