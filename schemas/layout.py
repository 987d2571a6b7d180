"""On-disk contracts: WebDataset sample keys, the shard manifest, the teacher-cache Zarr layout.

Bump a ``*_SCHEMA_VERSION`` whenever the layout changes; readers refuse other versions.
"""

from __future__ import annotations

SPLITS = ("train", "val")

# WebDataset shards ---------------------------------------------------------------------
KEY_DIGITS = 9  # sample key = zero-padded global row index within its split, no dots
SHARD_PATTERN = "{split}-{index:06d}.tar"
MANIFEST_NAME = "manifest.json"
# 2: images of any size (per-sample sizes), colour mode, re-encoded rows; 3: per-row values
# (sizes, content hashes) in .npy arrays beside the manifest, named with their sha256 in it.
MANIFEST_SCHEMA_VERSION = 3
ROW_ARRAY_PATTERN = "{split}-{name}.npy"
ROW_HASH_BYTES = 16  # per-sample content hash: the first 16 bytes of sha256
LABEL_EXT = "cls"
IMAGE_EXTS = ("png", "jpg", "jpeg", "webp", "bmp")


def sample_key(index: int) -> str:
    """The WebDataset ``__key__`` of the sample at global row ``index`` of its split."""
    return f"{index:0{KEY_DIGITS}d}"


# Teacher cache (Zarr v3, one group per split) ------------------------------------------
# 2: NaN / -1 fill values, a crc32c checksum per chunk, per-shard content sha256, no paths.
# 3: compact logits (embed.logits: from_head stores the classifier head and no logits;
#    embed.logits_topk stores top-k values, indices and the tail mass; bfloat16 logits as bits).
CACHE_SCHEMA_VERSION = 3
CACHE_KIND = "cifd-teacher-cache"
VIEW_FIELDS = ("top", "left", "height", "width", "flip")  # source-pixel box + horizontal flip
EMBEDDINGS = "embeddings"  # (N, V, D) float16
LOGITS = "logits"  # (N, V, C) float16 | float32 | bfloat16 bits (int16), when embed.logits = stored
TOPK_VALUES = "logits_topk_values"  # (N, V, k) the k largest logits, descending (same dtypes as LOGITS)
TOPK_INDEX = "logits_topk_index"  # (N, V, k) int16 (C <= 32767) | int32: their class ids
TOPK_TAIL = "logits_tail_mass"  # (N, V) float32: 1 - sum of softmax(z) (tau = 1) over the kept classes
HEAD_WEIGHT = "head_weight"  # root array (C, D) float32: the teacher's classifier weight (from_head)
HEAD_BIAS = "head_bias"  # root array (C,) float32: its bias (zeros when the head has none)
# bfloat16 has no numpy/zarr dtype: stored as its 16 bits in an int16 array (the fill -1 is
# 0xFFFF, a bfloat16 NaN, so a missing chunk still reads as NaN once decoded).
BF16_STORAGE = "int16"
VIEWS = "views"  # (N, V, len(VIEW_FIELDS)) float32
LABELS = "labels"  # (N,) int64
INDEX = "index"  # (N,) int64, the global row index (the WebDataset key as an integer)
DONE = "done"  # (num_shards,) uint8, 1 once a shard's rows are fully written
SHARD_SHA256 = "shard_sha256"  # (num_shards, 32) uint8, sha256 of a shard's row values (shard_digest)
ROW_ARRAYS = (EMBEDDINGS, LOGITS, VIEWS, LABELS, INDEX)  # embed.logits = stored, no top-k
# Mixed views (embed.mixup; pipeline.data.mixup): a cache with them is schema 4, one without
# stays schema 3 (a reader of schema 3 only refuses a mixed cache instead of replaying it wrong).
MIX_PARTNER = "mix_partner"  # (N, V) int64: the partner row of a mixed view (the row itself where unmixed)
MIX = "mix"  # (N, V, 6) float32: lambda (1 where unmixed), then the partner's view box
MIXUP_CACHE_SCHEMA_VERSION = 4
# With CutMix views (embed.mixup.cutmix), MIX is (N, V, 10): the pasted box follows, and the
# schema is 5 (a schema-4 reader would blend what it must paste, so it refuses the cache).
CUTMIX_CACHE_SCHEMA_VERSION = 5
READABLE_CACHE_SCHEMAS = (CACHE_SCHEMA_VERSION, MIXUP_CACHE_SCHEMA_VERSION, CUTMIX_CACHE_SCHEMA_VERSION)
LOGITS_CHOICES = ("stored", "from_head")


def logits_arrays(logits: str, topk: int | None) -> tuple[str, ...]:
    """The row arrays that hold a cache's logits: the dense array, the top-k triple, or none
    (``from_head``: recomputed from the embeddings through the stored head)."""
    if logits == "from_head":
        return ()
    return (TOPK_VALUES, TOPK_INDEX, TOPK_TAIL) if topk is not None else (LOGITS,)


def teacher_row_arrays(logits: str, topk: int | None, mixed: bool = False) -> tuple[str, ...]:
    """Every row array of a teacher cache written with ``embed.logits`` / ``embed.logits_topk``
    (and mixed views when ``mixed``)."""
    return (EMBEDDINGS, *logits_arrays(logits, topk), VIEWS, LABELS, INDEX) + ((MIX_PARTNER, MIX) if mixed else ())


def cache_schema(mixed: bool, cutmix: bool = False) -> int:
    """The schema version a teacher cache is written with (``cutmix``: it has CutMix views)."""
    return CUTMIX_CACHE_SCHEMA_VERSION if cutmix else MIXUP_CACHE_SCHEMA_VERSION if mixed else CACHE_SCHEMA_VERSION


# Chunk compression of every cache array (Blosc): zstd level 3 with byte shuffle, then a
# crc32c checksum of the compressed chunk, so a flipped byte fails the read.
COMPRESSOR = {"cname": "zstd", "clevel": 3, "shuffle": "shuffle"}
# Fill values: Zarr reads a missing chunk as the fill value without an error, so the fill is
# a value no writer stores (NaN for floats, -1 for integers): readers refuse it per block.
FLOAT_FILL = float("nan")
INT_FILL = -1

# Root attributes of the teacher cache.
ATTR_SCHEMA = "schema_version"
ATTR_KIND = "kind"
ATTR_PROVENANCE = "provenance"
ATTR_FINGERPRINT = "fingerprint"
ATTR_COMPLETE = "complete"
ATTR_WRITER = "writer"  # token of the run writing the store; absent once complete

# RDM cache (Zarr v3, one group per split, row-aligned with the teacher cache) ----------
# 2: as cache schema 2, plus a fingerprint of the RDM attributes; 3: no logits array, the
# RDMs' heads in root arrays (logits = head(x̂ / scale), made by readers on their device).
RDM_SCHEMA_VERSION = 3
RDM_KIND = "cifd-rdm-cache"
RDM_X_HAT = "x_hat"  # (N, V, M, D) float16: each RDM's reconstructed embedding
RDM_HEAD_WEIGHT = "head_weight"  # root array (M, C, D) float32: each RDM's logit head
RDM_HEAD_BIAS = "head_bias"  # root array (M, C) float32
ATTR_TEACHER_CACHE = "teacher_cache_fingerprint"
RDM_USES_DIR = "uses"  # uses/<consumer>.json: what each consumer (distill@<method>) reads of the store
ATTR_RDM = "rdm"  # config, rate weights, embedding scale, checkpoint sha256
RDM_ROW_ARRAYS = (RDM_X_HAT,)

# Writers: one lock file per store, beside it (``<store>.lock``), and the holder's
# pid/host/command in ``<store>.lock.owner``.
LOCK_SUFFIX = ".lock"
OWNER_SUFFIX = ".lock.owner"
