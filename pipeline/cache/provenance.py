"""What a teacher cache records about how it was made (its ``provenance`` attribute): the
teacher, its preprocessing and where each value came from, the views, the dataset, the
stored dtypes and the compute device type. Its fingerprint identifies the cache's content.

``origin`` describes where the cache was made, for the team that imports it: the producing
git repository (its ``origin`` remote as a URL, never a local path; credentials dropped) and
revision, whether tracked files had uncommitted changes, the dataset source and prepare
params (file names only, never a machine path), and the cifd, zarr and Python versions. It is
a description, not an input: like the classifier check it is not hashed into the
fingerprint, so equal inputs still give an equal fingerprint at any commit, and a resumed
store keeps the origin of the run that created it.
"""

from __future__ import annotations

import importlib.metadata
import posixpath
import re
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pipeline.data.shards import Manifest
from pipeline.models import ImageClassifier, library_versions
from schemas import layout as L
from schemas.config import EmbedConfig

__all__ = ["build_provenance", "dataset_origin", "git_origin", "public_url"]


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
            # Only a cache with mixed views records them: an unmixed cache's inputs stay as they were.
            **({"mixup": {"views": settings.mixup.views, "alpha": settings.mixup.alpha,
                          "partner": "another row of the same shard, uniform", "draw": "numpy default_rng(seed)",
                          "render": "lambda * pixels(view) + (1 - lambda) * pixels(partner view), then normalised",
                          # Only a cache with CutMix views records them (a mixup cache's record stays as it was).
                          **({"cutmix": settings.mixup.cutmix,
                              "cutmix_render": "the last cutmix mixed views: pixels(view) with the box (fields cut_*, "
                                               "fractions of the side) copied from pixels(partner view); lambda = the "
                                               "own pixels' fraction (timm rand_bbox + correct_lam)"}
                             if settings.mixup.cutmix else {})}}
               if settings.mixup.views else {}),
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
        "origin": {
            **git_origin(Path.cwd()),  # stages run at the project root (dvc repro does)
            "dataset": dataset_origin(manifest.data),
            "versions": {"cifd": _version("cifd"), "zarr": _version("zarr"), "numcodecs": _version("numcodecs"),
                         "python": ".".join(map(str, sys.version_info[:3]))},
        },
    }


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


_USERINFO = re.compile(r"^(?P<scheme>[a-z][a-z0-9+.-]*://)[^/@]*@", re.IGNORECASE)


def public_url(url: str | None) -> str | None:
    """A remote URL fit to publish: ``https://host/org/repo`` or ``git@host:org/repo`` with any
    user:token part dropped; None for a local path (``/srv/repo``, ``../repo``, ``file://``),
    which means nothing on another machine."""
    if not url:
        return None
    url = url.strip()
    if url.lower().startswith("file://") or "://" not in url and not re.match(r"^[\w.-]+@[\w.-]+:", url):
        return None
    return _USERINFO.sub(lambda m: m["scheme"], url)


def _git(root: Path, *args: str) -> str | None:
    try:
        result = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):  # no git on this machine: the origin is unknown
        return None
    return result.stdout.strip() if result.returncode == 0 else None


def git_origin(root: Path) -> dict[str, Any]:
    """``{"repository", "revision", "dirty"}`` of the git work tree at ``root``; None where
    unknown (no git, no commit, no public remote)."""
    revision = _git(root, "rev-parse", "--verify", "-q", "HEAD")
    status = _git(root, "status", "--porcelain", "--untracked-files=no") if revision else None
    return {"repository": public_url(_git(root, "remote", "get-url", "origin")), "revision": revision,
            "dirty": None if status is None else bool(status)}


def dataset_origin(manifest: Mapping[str, Any]) -> dict[str, Any]:
    """The dataset source and prepare params from the shard manifest, each path reduced to
    its file name (a machine path would mean nothing to the importing team)."""
    source = dict(manifest.get("source") or {})
    for key in ("train", "val"):
        if isinstance(source.get(key), str):
            source[key] = posixpath.basename(source[key].replace("\\", "/").rstrip("/")) or None
    return {"source": source.pop("source", None), "prepare": source, "row_order": manifest.get("row_order")}
