"""A consumer project made from another team's cache (``cifd init --from REPO``), and what
identifies the installed ``cifd`` (``cifd version``).

Pure generation: from the producer's ``params.yaml`` (a mapping) this module decides the
consumer's ``params.yaml``, its ``dvc.yaml`` and the three ``dvc import`` calls (teacher cache,
teacher file, image shards, each to the path the consumer's params name). Running git and
DVC is the stage's job (``stages/init.py``).

The consumer's stages (``rdm``, ``distill@<method>``, ``evaluate``) depend on the imported
data and on ``cifd-version.json``, which the always-run ``cifd-version`` stage rewrites with
the installed package's version and the sha256 of its code: a new ``cifd`` reruns them, the
same one does not (the file's content, not its time, is what DVC compares). They do not
depend on source files, which a consumer project does not have.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import posixpath
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from schemas.config import STAGES, Paths

__all__ = ["ConsumerProject", "Import", "ProjectError", "VERSION_FILE", "consumer_project", "installed_version"]

VERSION_FILE = "cifd-version.json"
VERSION_STAGE = "cifd-version"
# The packages the ``cifd`` distribution installs (pyproject: [tool.hatch.build.targets.wheel]).
PACKAGES = ("pipeline", "stages", "schemas", "report")
# Libraries whose versions decide what the stages compute.
LIBRARIES = ("torch", "torchvision", "timm", "numpy", "zarr")
# Sections a consumer runs with the producer's values (same params, same students).
DOWNSTREAM = ("rdm", "distill", "evaluate")
# Paths the consumer imports from the producer: (paths field, what it is).
IMPORTED = (("cache", "teacher cache"), ("teacher", "teacher model"), ("shards", "image shards"))


class ProjectError(ValueError):
    """A consumer project cannot be made (producer params, target directory): what, and the fix."""


@dataclass(frozen=True)
class Import:
    """One ``dvc import REPO source -o target`` of the consumer project."""

    what: str
    source: str  # path in the producer repository
    target: str  # path in the consumer project (its params' paths.<field>)


@dataclass(frozen=True)
class ConsumerProject:
    params: dict[str, Any]  # the consumer's params.yaml
    params_header: str  # comment lines written above it
    dvc_yaml: dict[str, Any]
    imports: tuple[Import, ...]


def _project_path(value: Any, field: str) -> str:
    """A producer path as a clean relative POSIX path inside the project, or a ProjectError."""
    if not isinstance(value, str) or not value or "${" in value:
        raise ProjectError(f"the producer's params 'paths.{field}' = {value!r} is not a plain relative path; "
                           "`cifd init` can import only paths inside the producer repository")
    clean = posixpath.normpath(value.replace("\\", "/"))
    if posixpath.isabs(clean) or clean == ".." or clean.startswith("../") or clean == ".":
        raise ProjectError(f"the producer's params 'paths.{field}' = {value!r} is outside its repository; "
                           "`dvc import` can only take a path inside it (ask the producer to keep artifacts in "
                           "the repository)")
    return clean


def _paths(producer: Mapping[str, Any]) -> dict[str, str]:
    """The producer's paths, checked (defaults for the fields it does not set)."""
    section = producer.get("paths")
    if section is not None and not isinstance(section, Mapping):
        raise ProjectError(f"the producer's params 'paths' = {section!r} is not a mapping")
    Paths.from_mapping(section, section="paths")  # unknown keys fail with the field and the rule
    merged = Paths().to_dict() | dict(section or {})
    return {field: _project_path(value, field) for field, value in merged.items()}


def consumer_params(producer: Mapping[str, Any]) -> dict[str, Any]:
    """The consumer's params: the producer's paths, the teacher entrypoint its teacher file
    names, and the producer's ``rdm`` / ``distill`` / ``evaluate`` sections (each checked by its
    stage's schema, so a bad section fails here rather than in ``dvc repro``)."""
    teacher = producer.get("teacher") or {}
    if not isinstance(teacher, Mapping):
        raise ProjectError(f"the producer's params 'teacher' = {teacher!r} is not a mapping")
    model = STAGES["teacher"].from_mapping(teacher, section="teacher").model  # type: ignore[attr-defined]
    params: dict[str, Any] = {"paths": _paths(producer), "teacher": {"model": model}}
    for stage in DOWNSTREAM:
        section = producer.get(stage)
        STAGES[stage].from_mapping(section, section=stage)
        params[stage] = dict(section or {})
    return params


def _deps(*paths: str) -> list[str]:
    return [*paths, VERSION_FILE]


def consumer_dvc_yaml() -> dict[str, Any]:
    """The consumer's stages, templated on its params (``${paths.*}``, ``${distill.methods}``)."""
    return {"stages": {
        VERSION_STAGE: {
            "cmd": f"cifd version --out {VERSION_FILE}",
            "always_changed": True,  # rewritten every run; only a new cifd changes its content
            "outs": [{VERSION_FILE: {"cache": False}}],
        },
        "rdm": {
            "cmd": "cifd rdm",
            "deps": _deps("${paths.cache}"),
            "params": ["rdm", "teacher.model"],
            "outs": ["${paths.rdm_models}", "${paths.rdm_cache}"],
            "metrics": [{"${paths.metrics}/rdm.json": {"cache": False}}],
            "plots": [{"${paths.plots}/rdm_curve.csv": {"cache": False, "x": "rate_bits", "y": "val_top1"}},
                      {"${paths.plots}/rdm_rate_accuracy.png": {"cache": False}}],
        },
        "distill": {
            "foreach": "${distill.methods}",
            "do": {
                "cmd": "cifd distill --method ${item}",
                "deps": _deps("${paths.shards}", "${paths.teacher}", "${paths.cache}",
                              "${paths.rdm_cache}/uses/distill-${item}.json"),
                "params": ["distill", "teacher.model"],
                "outs": ["${paths.students}/${item}.safetensors"],
                "metrics": [{"${paths.metrics}/distill/${item}.json": {"cache": False}}],
                "plots": [{"${paths.plots}/distill/${item}.csv": {"cache": False, "x": "epoch", "y": "val_top1"}}],
            },
        },
        "evaluate": {
            "cmd": "cifd evaluate",
            "deps": _deps("${paths.students}", "${paths.metrics}/distill", "${paths.plots}/distill",
                          "${paths.teacher}", "${paths.shards}", "${paths.cache}"),
            "params": ["evaluate", "teacher.model", "distill.student"],
            "metrics": [{"${paths.metrics}/evaluate.json": {"cache": False}}],
            "plots": [{"${paths.plots}/distill_accuracy.png": {"cache": False}}],
        },
    }}


def consumer_project(producer: Mapping[str, Any], *, repo: str, rev: str | None) -> ConsumerProject:
    """Everything ``cifd init --from repo --rev rev`` writes, from the producer's params."""
    if not isinstance(producer, Mapping):
        raise ProjectError(f"the producer's params.yaml holds {type(producer).__name__}, not a mapping of sections")
    params = consumer_params(producer)
    paths = params["paths"]
    imports = tuple(Import(what=what, source=paths[field], target=paths[field]) for field, what in IMPORTED)
    header = (f"# Made by `cifd init --from {repo}{f' --rev {rev}' if rev else ''}`: the producer's paths, its\n"
              "# teacher entrypoint (teacher.model, the one a teacher file may name) and its rdm, distill and\n"
              "# evaluate sections. The teacher cache, teacher and shards are DVC imports (the .dvc files\n"
              "# beside them); `dvc update -R .` brings the producer's newest revision, `dvc repro` reruns.\n")
    return ConsumerProject(params=params, params_header=header, dvc_yaml=consumer_dvc_yaml(), imports=imports)


def _code_sha256() -> str:
    """sha256 over the installed cifd packages' Python files (relative path and bytes)."""
    digest = hashlib.sha256()
    for package in PACKAGES:
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            continue
        root = Path(next(iter(spec.submodule_search_locations)))
        for path in sorted(root.rglob("*.py")):
            digest.update(f"{package}/{path.relative_to(root).as_posix()}\0".encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def installed_version() -> dict[str, Any]:
    """What identifies the installed ``cifd``: its version, the sha256 of its code, the Python
    version and the versions of the libraries that decide what it computes."""
    return {
        "cifd": _version("cifd"),
        "code_sha256": _code_sha256(),
        "python": ".".join(map(str, sys.version_info[:2])),
        "libraries": {name: _version(name) for name in LIBRARIES},
    }
