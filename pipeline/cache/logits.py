"""How a teacher cache keeps its logits, and how a reader gets them back (``embed.logits``,
``embed.logits_dtype``, ``embed.logits_topk``).

``stored``  the (N, V, C) logits in float32, float16 or bfloat16. Zarr and numpy have no
            bfloat16, so bfloat16 values are kept as their 16 bits in an int16 array: the
            fill value -1 is 0xFFFF, a bfloat16 NaN, so a missing chunk still reads as NaN.
top-k       (``logits_topk: k``) the k largest logits of each view (descending), their
            class ids and the tail mass ``1 - Σ_kept softmax(z)`` (τ = 1). The dense logits
            a reader gets back are TinyViT's: kept classes exact, every other class the
            same share of the tail mass (so softmax at τ = 1 gives the kept probabilities
            exactly); the student's KD term uses :func:`pipeline.losses.kd_kl` over the kept
            classes (``kept``), which needs only the kept logits.
from_head   no logits: the teacher's linear head (weight (C, D), bias (C,), float32) is in
            the cache (root arrays, crc32c-checked, hashed into the provenance) and the
            logits are ``embedding @ weight.T + bias`` on the reader's device, from the
            cached float16 embedding.

:class:`LogitsFormat` does both directions: :meth:`encode` (embed's float32 outputs → the
arrays to write) and :meth:`dense` / :meth:`kept` (read arrays, as torch tensors on any
device → float32 logits / kept class ids).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from schemas import layout as L

__all__ = ["LogitsFormat", "bf16_bits", "bytes_per_view", "from_bf16_bits", "index_dtype"]


def bf16_bits(values: np.ndarray) -> np.ndarray:
    """float values → the int16 bits of their bfloat16 (round to nearest even, as torch)."""
    return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).to(torch.bfloat16).view(
        torch.int16).numpy()


def from_bf16_bits(bits: np.ndarray) -> np.ndarray:
    """The int16 bits of bfloat16 values → float32 (exact)."""
    return torch.from_numpy(np.ascontiguousarray(bits, dtype=np.int16)).view(torch.bfloat16).float().numpy()


def index_dtype(num_classes: int) -> str:
    """int16 class ids while they fit, else int32."""
    return "int16" if num_classes <= np.iinfo(np.int16).max else "int32"


def storage_dtype(dtype: str) -> str:
    """The Zarr dtype of logits kept as ``dtype`` (bfloat16 → its bits)."""
    return L.BF16_STORAGE if dtype == "bfloat16" else dtype


def bytes_per_view(*, embed_dim: int, num_classes: int, num_views: int, topk: int) -> dict[str, float]:
    """Uncompressed bytes per (sample, view) of each logits choice: the float16 embedding,
    the view box (20 bytes), the sample's label and index (16 bytes over its V views) and the
    logits as each choice keeps them (top-k: ``topk`` float16 values, their class ids and a
    float32 tail mass; from_head: none, plus the head once per cache, not counted here)."""
    base = 2 * embed_dim + 4 * len(L.VIEW_FIELDS) + 16 / num_views
    k = min(topk, num_classes)
    out = {"stored_float32": base + 4 * num_classes, "stored_float16": base + 2 * num_classes,
           "stored_bfloat16": base + 2 * num_classes,
           f"top{k}_float16": base + k * (2 + np.dtype(index_dtype(num_classes)).itemsize) + 4,
           "from_head": base}
    return {name: round(value, 1) for name, value in out.items()}


@dataclass(frozen=True)
class LogitsFormat:
    """One cache's logits choice (see the module docstring)."""

    kind: str  # "stored" | "from_head"
    dtype: str  # float32 | float16 | bfloat16 (stored values); "none" for from_head
    topk: int | None
    num_classes: int
    head_weight: Tensor | None = None  # (C, D) float32, from_head only
    head_bias: Tensor | None = None  # (C,) float32

    def __post_init__(self) -> None:
        if self.kind not in L.LOGITS_CHOICES:
            raise ValueError(f"logits kind {self.kind!r}; expected one of {L.LOGITS_CHOICES}")
        if self.kind == "from_head" and (self.head_weight is None or self.head_bias is None):
            raise ValueError("a from_head cache needs the head's weight and bias")

    @property
    def fields(self) -> tuple[str, ...]:
        """The row arrays a reader needs for the logits."""
        return (L.EMBEDDINGS,) if self.kind == "from_head" else L.logits_arrays(self.kind, self.topk)

    @property
    def stored_arrays(self) -> tuple[str, ...]:
        """The row arrays holding logits (none for from_head)."""
        return L.logits_arrays(self.kind, self.topk)

    def array_specs(self) -> dict[str, tuple[tuple[int, ...], str]]:
        """name → (per-row tail shape given V, Zarr dtype) of each array, with V as -1."""
        if self.kind == "from_head":
            return {}
        dtype = storage_dtype(self.dtype)
        if self.topk is None:
            return {L.LOGITS: ((self.num_classes,), dtype)}
        k = min(self.topk, self.num_classes)
        return {L.TOPK_VALUES: ((k,), dtype), L.TOPK_INDEX: ((k,), index_dtype(self.num_classes)),
                L.TOPK_TAIL: ((), "float32")}

    def to(self, device: torch.device | str) -> LogitsFormat:
        """The same format with the head on ``device`` (move it once, not per batch)."""
        if self.head_weight is None or self.head_bias is None:
            return self
        return LogitsFormat(self.kind, self.dtype, self.topk, self.num_classes,
                            self.head_weight.to(device), self.head_bias.to(device))

    # ---- writing
    def encode(self, logits: np.ndarray) -> dict[str, np.ndarray]:
        """float32 teacher logits (n, V, C) → the arrays to store (stored values in their
        dtype, bfloat16 as bits); empty for from_head. Values must be finite."""
        if self.kind == "from_head":
            return {}
        if self.topk is None:
            return {L.LOGITS: self._values(logits)}
        k = min(self.topk, self.num_classes)
        z = torch.from_numpy(np.ascontiguousarray(logits, dtype=np.float32))
        top = z.topk(k, dim=-1)  # descending
        probs = torch.softmax(z.double(), dim=-1)
        tail = (1.0 - probs.gather(-1, top.indices).sum(-1)).clamp_min(0.0).float()  # (n, V)
        return {L.TOPK_VALUES: self._values(top.values.numpy()),
                L.TOPK_INDEX: top.indices.numpy().astype(index_dtype(self.num_classes)),
                L.TOPK_TAIL: tail.numpy()}

    def _values(self, values: np.ndarray) -> np.ndarray:
        if self.dtype == "bfloat16":
            return bf16_bits(values)
        return np.asarray(values).astype(self.dtype)

    def decode_values(self, name: str, values: np.ndarray) -> np.ndarray:
        """A read array as a reader uses it: bfloat16 bits → float32; others unchanged."""
        if self.dtype == "bfloat16" and name in (L.LOGITS, L.TOPK_VALUES):
            return from_bf16_bits(values)
        return values

    # ---- reading
    def dense(self, arrays: Mapping[str, Tensor]) -> Tensor:
        """(..., C) float32 logits on the arrays' device from the arrays of :attr:`fields`
        (decoded: bfloat16 already float)."""
        if self.kind == "from_head":
            assert self.head_weight is not None and self.head_bias is not None
            emb = arrays[L.EMBEDDINGS]
            return F.linear(emb.float(), self.head_weight.to(emb.device), self.head_bias.to(emb.device))
        if self.topk is None:
            return arrays[L.LOGITS].float()
        values = arrays[L.TOPK_VALUES].float()  # (..., k)
        index = arrays[L.TOPK_INDEX].long()
        tail = arrays[L.TOPK_TAIL].float().unsqueeze(-1)  # (..., 1)
        k = values.shape[-1]
        rest = self.num_classes - k
        if rest == 0:
            return torch.empty((*values.shape[:-1], self.num_classes), device=values.device).scatter_(-1, index, values)
        # softmax(z)_i = exp(v_i) / Z for kept i with Z = exp(LSE(v)) / (1 - tail); each other
        # class gets tail / rest of the mass: z_other = log(tail / rest) + log Z.
        log_z = torch.logsumexp(values, -1, keepdim=True) - torch.log1p(-tail.clamp(max=1 - 1e-7))
        other = torch.log((tail / rest).clamp_min(torch.finfo(torch.float32).tiny)) + log_z
        out = other.expand(*values.shape[:-1], self.num_classes).clone()
        return out.scatter_(-1, index, values)

    # ---- one array per (row, view), for stage three's targets
    @property
    def packed(self) -> bool:
        """Whether stage three holds this cache's logits packed (:meth:`pack`) rather than dense."""
        return self.kind == "from_head" or self.topk is not None

    def pack(self, arrays: Mapping[str, np.ndarray]) -> np.ndarray:
        """The arrays of :attr:`fields` (decoded, leading dims alike) as one array (..., P):
        the logits (C) when stored dense, the float16 embedding (D) for from_head, and for
        top-k float32 [values (k), class ids (k, exact below 2**24), tail mass (1)]."""
        if self.kind == "from_head":
            return arrays[L.EMBEDDINGS]
        if self.topk is None:
            return arrays[L.LOGITS]
        tail = np.asarray(arrays[L.TOPK_TAIL], dtype=np.float32)[..., None]
        return np.concatenate([np.asarray(arrays[L.TOPK_VALUES], dtype=np.float32),
                               np.asarray(arrays[L.TOPK_INDEX], dtype=np.float32), tail], axis=-1)

    def unpack(self, packed: Tensor) -> tuple[Tensor, Tensor | None]:
        """:meth:`pack`'s array (on any device) → dense float32 logits (..., C) and the kept
        class ids (..., k) int64 (None unless top-k); runs where ``packed`` is."""
        if self.kind == "from_head":
            return self.dense({L.EMBEDDINGS: packed}), None
        if self.topk is None:
            return packed.float(), None
        k = (packed.shape[-1] - 1) // 2
        arrays = {L.TOPK_VALUES: packed[..., :k], L.TOPK_INDEX: packed[..., k:2 * k].long(),
                  L.TOPK_TAIL: packed[..., 2 * k]}
        return self.dense(arrays), arrays[L.TOPK_INDEX]

    def dense_on(self, arrays: Mapping[str, np.ndarray], device: torch.device) -> Tensor:
        """:meth:`dense` of read (host) arrays, computed on ``device``."""
        fmt = self.to(device)
        return fmt.dense({f: torch.from_numpy(np.ascontiguousarray(arrays[f])).to(device) for f in self.fields})

    def kept(self, arrays: Mapping[str, Tensor]) -> Tensor | None:
        """(..., k) int64 class ids the KD term runs over (top-k caches), else None."""
        return arrays[L.TOPK_INDEX].long() if self.topk is not None else None
