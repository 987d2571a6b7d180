"""What a teacher cache records about how it was made (its ``provenance`` attribute): the
teacher, its preprocessing and where each value came from, the views, the dataset, the
stored dtypes and the compute device type. Its fingerprint identifies the cache's content."""

from __future__ import annotations

from typing import Any

from pipeline.data.shards import Manifest
from pipeline.models import ImageClassifier, library_versions
from schemas import layout as L
from schemas.config import EmbedConfig

__all__ = ["build_provenance"]


def build_provenance(
    *, model: ImageClassifier, spec: dict[str, Any], sha256: str, manifest: Manifest,
    settings: EmbedConfig, check: tuple[bool, float], device_type: str, head_sha256: str | None = None,
) -> dict[str, Any]:
    return {
        "teacher": {
            "model": spec["name"],
            "model_kwargs": spec.get("model_kwargs", {}),
            "state_dict_sha256": sha256,
            "source_weights_sha256": spec.get("source_weights_sha256"),
            "num_classes": model.num_classes,
            "embed_dim": model.embed_dim,
            "in_chans": spec.get("in_chans"),
            "library_versions": library_versions(),
        },
        "preprocess": spec["preprocess"],
        "preprocess_origin": spec.get("preprocess_origin", {}),
        "views": {
            "num_views": settings.views,
            "fields": list(L.VIEW_FIELDS),
            "policy": {"kind": settings.policy.kind, "scale": list(settings.policy.scale),
                       "ratio": list(settings.policy.ratio), "pad": settings.policy.pad,
                       "flip": settings.policy.flip},
            "seed": settings.seed,
            "view0": "clean: shorter side to floor(image_size / crop_pct), centre crop image_size, no flip",
            "sampler": "torchvision RandomResizedCrop.get_params (10 tries, centre fallback), per image size",
            "replay": "pipeline.data.resample: box resized as torch interpolate(antialias=True) computes weights",
        },
        "dataset": {
            "manifest_sha256": manifest.sha256,
            "classes": manifest.classes,
            "mode": manifest.mode,
            "image_shape": list(manifest.image_shape) if manifest.image_shape is not None else None,
            "num_samples": {s: manifest.split(s)["num_samples"] for s in L.SPLITS},
        },
        # from_head stores no logits: their dtype is not an input (changing it rebuilds nothing)
        "dtypes": {L.EMBEDDINGS: "float16", L.VIEWS: "float32",
                   L.LOGITS: settings.logits_dtype if settings.logits == "stored" else "none"},
        # stored | from_head (the head's arrays in the cache, their sha256 here), top-k or all classes
        "logits": {"kind": settings.logits, "topk": settings.logits_topk, "head_sha256": head_sha256},
        # CPU and GPU kernels differ in the last bits: a resume never mixes the two.
        "compute": {"device_type": device_type},
        "classifier_check": {"reproduces_logits": check[0], "max_abs_err": round(check[1], 6)},
    }
