"""torchvision's ``RandomResizedCrop.get_params``, written out in plain Python with its random
draws replaced by given uniforms: the reference the view sampler is tested against."""

from __future__ import annotations

import math
from collections.abc import Sequence


def torchvision_get_params(u: Sequence[Sequence[float]], height: int, width: int, scale: tuple[float, float],
                           ratio: tuple[float, float]) -> tuple[int, int, int, int]:
    """(top, left, h, w) from ``u``: up to 10 tries × 4 uniforms (area, log-ratio, top, left);
    an empty ``u`` gives the fallback box."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for a, r, t, l in u:
        target_area = area * (scale[0] + (scale[1] - scale[0]) * a)
        aspect_ratio = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * r)
        w = int(round(math.sqrt(target_area * aspect_ratio)))
        h = int(round(math.sqrt(target_area / aspect_ratio)))
        if 0 < w <= width and 0 < h <= height:
            return int(t * (height - h + 1)), int(l * (width - w + 1)), h, w
    in_ratio = float(width) / float(height)
    if in_ratio < min(ratio):
        w = width
        h = int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        h = height
        w = int(round(h * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w
