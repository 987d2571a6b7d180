"""What ``embed`` checks of the teacher's outputs before a shard is written: finite values
that fit the stored dtypes (a NaN, inf or overflow stops the run, naming shard, row and view)."""

from __future__ import annotations

import numpy as np
import torch

from pipeline.cache.logits import LogitsFormat
from pipeline.cache.reader import format_rows
from pipeline.cache.store import CacheError
from schemas import layout as L

__all__ = ["TeacherOutputError", "checked_rows"]


class TeacherOutputError(CacheError):
    """The teacher produced values the cache cannot hold (NaN / inf, or beyond the dtype)."""



def _stored(values: np.ndarray, dtype: str) -> tuple[np.ndarray, float]:
    """``values`` cast to ``dtype`` as float (bfloat16 through torch) and that dtype's largest value."""
    if dtype == "bfloat16":
        return torch.from_numpy(values).to(torch.bfloat16).float().numpy(), float(torch.finfo(torch.bfloat16).max)
    with np.errstate(over="ignore"):
        return values.astype(dtype), float(np.finfo(dtype).max)


def checked_rows(emb: np.ndarray, logits: np.ndarray, *, fmt: LogitsFormat, where: str,
                 start: int) -> dict[str, np.ndarray]:
    """The stored embeddings (float16) and logits arrays of one shard (``fmt.encode``:
    none for from_head), from the teacher's float32 (n, V, ·) outputs; a NaN / inf output or
    a value beyond the stored dtype's range is a :class:`TeacherOutputError` naming
    ``where``, the row and the view."""
    logits_dtype = fmt.dtype if fmt.kind == "stored" else "float32"
    out = {}
    for name, values, dtype in ((L.EMBEDDINGS, emb, "float16"), (L.LOGITS, logits, logits_dtype)):
        bad = ~np.isfinite(values)
        if bad.any():
            r, v = (int(i) for i in np.argwhere(bad)[0][:2])
            raise TeacherOutputError(
                f"{where}: the teacher's {name} are NaN or inf at row {start + r} view {v} (rows "
                f"{format_rows(np.flatnonzero(bad.reshape(len(bad), -1).any(axis=1)) + start)}); nothing of this "
                "shard is written. Check the teacher's weights (`cifd teacher`) and this shard's images")
        stored, largest = _stored(values, dtype)
        over = ~np.isfinite(stored)
        if over.any():
            r, v, k = (int(i) for i in np.argwhere(over)[0])
            fix = ("the cache keeps embeddings in float16: normalise the teacher's embeddings (e.g. a norm layer "
                   "before the head)" if name == L.EMBEDDINGS else "set embed.logits_dtype: float32")
            raise TeacherOutputError(
                f"{where}: the teacher's {name} value {float(values[r, v, k]):.4g} at row {start + r} view {v} "
                f"overflows {dtype} (largest {largest:g}); nothing of this shard is written: {fix}")
        if name == L.EMBEDDINGS:
            out[name] = stored
    return {**out, **fmt.encode(logits)}
