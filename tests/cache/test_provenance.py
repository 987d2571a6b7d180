"""Where a cache was made, without machine paths (issue 13, item 3): the producing repository
and revision from git, the dataset source and prepare params, versions; never hashed."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from pipeline.cache.inspect import cache_info
from pipeline.cache.provenance import dataset_origin, git_origin, public_url
from pipeline.cache.store import fingerprint, input_changes
from stages.cli import main

pytestmark = pytest.mark.filterwarnings("ignore:Consolidated metadata is currently not part")


@pytest.mark.parametrize(("url", "expected"), [
    ("https://github.com/org/repo.git", "https://github.com/org/repo.git"),
    ("https://user:s3cret@gitlab.example.com/org/repo", "https://gitlab.example.com/org/repo"),
    ("ssh://git@host.example:2222/org/repo", "ssh://host.example:2222/org/repo"),
    ("git@github.com:org/repo.git", "git@github.com:org/repo.git"),
    ("/srv/git/repo", None),
    ("../repo", None),
    ("file:///srv/git/repo", None),
    ("C:\\work\\repo", None),
    ("", None),
    (None, None),
])
def test_public_url_drops_credentials_and_local_paths(url: str | None, expected: str | None) -> None:
    assert public_url(url) == expected


def _git(path: Path, *args: str) -> str:
    env = dict(os.environ, GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t.invalid", GIT_COMMITTER_NAME="t",
               GIT_COMMITTER_EMAIL="t@t.invalid")
    return subprocess.run(["git", *args], cwd=path, env=env, check=True, capture_output=True, text=True).stdout.strip()


def test_git_origin_names_remote_revision_and_changes(tmp_path: Path) -> None:
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    assert git_origin(tmp_path) == {"repository": None, "revision": None, "dirty": None}  # not a repository
    _git(tmp_path, "init", "-q")
    assert git_origin(tmp_path) == {"repository": None, "revision": None, "dirty": None}  # no commit yet
    (tmp_path / "params.yaml").write_text("a: 1\n")
    _git(tmp_path, "add", "params.yaml")
    _git(tmp_path, "commit", "-qm", "one")
    head = _git(tmp_path, "rev-parse", "HEAD")
    _git(tmp_path, "remote", "add", "origin", "https://bot:token@example.com/team/cifd-cache.git")
    assert git_origin(tmp_path) == {"repository": "https://example.com/team/cifd-cache.git", "revision": head,
                                    "dirty": False}
    (tmp_path / "params.yaml").write_text("a: 2\n")
    (tmp_path / "untracked.txt").write_text("not a change of the recorded revision\n")
    assert git_origin(tmp_path)["dirty"] is True
    _git(tmp_path, "remote", "set-url", "origin", str(tmp_path))
    assert git_origin(tmp_path)["repository"] is None  # a local path means nothing elsewhere


def test_dataset_origin_keeps_file_names_only() -> None:
    manifest = {"source": {"source": "imagefolder", "train": "/home/alice/data/train.tar", "val": "../imgs/val/",
                           "val_fraction": 0.2, "seed": 3},
                "row_order": {"shuffled": True, "seed": 3}}
    assert dataset_origin(manifest) == {
        "source": "imagefolder", "prepare": {"train": "train.tar", "val": "val", "val_fraction": 0.2, "seed": 3},
        "row_order": {"shuffled": True, "seed": 3}}


def _strings(value: Any) -> list[str]:
    if isinstance(value, dict):
        return [s for k, v in value.items() for s in (k, *_strings(v))]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return [value] if isinstance(value, str) else []


def test_cache_describes_itself_without_machine_paths(embedded_cache, prepare_config) -> None:
    store, _ = embedded_cache
    info = cache_info(store)
    prov = info["provenance"]
    # The producer's paths (its images tar, its cache directory) appear nowhere in what it says.
    for text in _strings(prov):
        assert not text.startswith(("/", "\\")) and str(Path(prepare_config.train).parent) not in text, text
    origin = info["origin"]
    assert origin["dataset"]["source"] == "imagefolder"
    assert origin["dataset"]["prepare"]["train"] == Path(prepare_config.train).name
    assert origin["dataset"]["prepare"]["seed"] == prepare_config.seed
    assert set(origin) == {"repository", "revision", "dirty", "dataset", "versions"}
    assert origin["versions"]["zarr"] and origin["versions"]["cifd"] and origin["versions"]["python"]
    assert set(info["library_versions"]) >= {"torch", "timm", "numpy"}
    # The origin is described, not hashed: another commit or machine gives the same fingerprint.
    moved = {**prov, "origin": {**origin, "revision": "0" * 40, "repository": "https://elsewhere/x"}}
    assert fingerprint(moved) == info["fingerprint"] and input_changes(prov, moved) == []


def test_cache_info_prints_origin_and_json_holds_everything(embedded_cache) -> None:
    store, _ = embedded_cache
    runner = CliRunner()
    text = runner.invoke(main, ["cache", "info", str(store)])
    assert text.exit_code == 0, text.output
    lines = {line.split()[0]: line for line in text.output.splitlines() if line.strip()}
    assert lines["source"].startswith("source     imagefolder: ") and "train=" in lines["source"]
    assert "zarr" in lines["versions"] and "torch" in lines["versions"]
    assert lines["made"].startswith("made by")
    listing = runner.invoke(main, ["cache", "info", str(store), "--json"])
    assert listing.exit_code == 0, listing.output
    data = json.loads(listing.output)
    assert data["provenance"] == cache_info(store)["provenance"] and data["origin"] == data["provenance"]["origin"]
