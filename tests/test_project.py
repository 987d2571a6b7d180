"""``cifd init --from``'s consumer project (``pipeline.project``) and ``cifd version``."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from dvc_project import dvc, run

from pipeline.project import VERSION_FILE, ProjectError, consumer_project, installed_version
from schemas.base import ConfigError
from stages.cli import main

ROOT = Path(__file__).resolve().parents[1]
PRODUCER = yaml.safe_load((ROOT / "params.yaml").read_text())
SOURCES = ("pipeline", "stages", "schemas", "report")


def test_consumer_params_are_the_producers_downstream_sections() -> None:
    project = consumer_project(PRODUCER, repo="https://example.com/team/cifd.git", rev="v1")
    params = project.params
    assert set(params) == {"paths", "teacher", "rdm", "distill", "evaluate"}
    assert params["paths"] == PRODUCER["paths"]
    assert params["teacher"] == {"model": PRODUCER["teacher"]["model"]}
    for section in ("rdm", "distill", "evaluate"):
        assert params[section] == PRODUCER[section]
    assert [(i.source, i.target) for i in project.imports] == [
        (PRODUCER["paths"][k], PRODUCER["paths"][k]) for k in ("cache", "teacher", "shards")]
    assert "--from https://example.com/team/cifd.git --rev v1" in project.params_header


def test_consumer_stages_match_the_producers_without_source_dependencies() -> None:
    producer = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    written = consumer_project(PRODUCER, repo="r", rev=None).dvc_yaml
    assert "&id" not in yaml.safe_dump(written, sort_keys=False)  # plain YAML a person edits, no anchors
    consumer = written["stages"]
    assert set(consumer) == {"cifd-version", "rdm", "distill", "evaluate"}
    for name in ("rdm", "distill", "evaluate"):
        mine = consumer[name].get("do", consumer[name])
        theirs = producer[name].get("do", producer[name])
        assert mine["cmd"] == theirs["cmd"]
        for key in ("outs", "metrics", "plots"):
            assert mine.get(key) == theirs.get(key), (name, key)
        data = [d for d in theirs["deps"] if not str(d).startswith(SOURCES)]
        assert mine["deps"] == [*data, VERSION_FILE], name
        assert set(theirs["params"]) <= set(mine["params"])
    assert consumer["cifd-version"]["always_changed"] is True
    assert consumer["distill"]["foreach"] == "${distill.methods}"


@pytest.mark.parametrize("path", ["/srv/cache/teacher.zarr", "../shared/cache", "..", "${other.path}", 3])
def test_paths_outside_the_producer_repository_are_refused(path: object) -> None:
    producer = {**PRODUCER, "paths": {**PRODUCER["paths"], "cache": path}}
    with pytest.raises((ProjectError, ConfigError), match="paths.cache"):
        consumer_project(producer, repo="r", rev=None)


def test_a_bad_producer_section_fails_with_its_field() -> None:
    with pytest.raises(ConfigError, match="distill.epochs"):
        consumer_project({**PRODUCER, "distill": {**PRODUCER["distill"], "epochs": 0}}, repo="r", rev=None)
    with pytest.raises(ProjectError, match="not a mapping"):
        consumer_project(["not", "params"], repo="r", rev=None)  # type: ignore[arg-type]


def test_installed_version_hashes_the_package_code() -> None:
    digest = hashlib.sha256()
    for package in SOURCES:  # this checkout is the installed (editable) cifd
        for path in sorted((ROOT / package).rglob("*.py")):
            digest.update(f"{package}/{path.relative_to(ROOT / package).as_posix()}\0".encode())
            digest.update(path.read_bytes())
    info = installed_version()
    assert info["code_sha256"] == digest.hexdigest()
    assert info["cifd"] and info["libraries"]["torch"] and info["libraries"]["zarr"]


def test_cifd_version_writes_the_stage_file(tmp_path: Path) -> None:
    out = tmp_path / VERSION_FILE
    result = CliRunner().invoke(main, ["version", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert json.loads(out.read_text()) == json.loads(result.output) == installed_version()


def test_init_refuses_a_project_directory_and_an_unreadable_producer(tmp_path: Path) -> None:
    runner = CliRunner()
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "params.yaml").write_text("paths: {}\n")
    result = runner.invoke(main, ["init", "--from", str(tmp_path), str(tmp_path / "taken")])
    assert result.exit_code == 2 and "already has params.yaml" in result.output
    result = runner.invoke(main, ["init", "--from", str(tmp_path / "nowhere"), str(tmp_path / "new")])
    assert result.exit_code == 2, result.output
    assert result.output.startswith("error: --from") and "neither a git URL nor a directory" in result.output


@pytest.mark.slow
def test_init_refuses_a_producer_without_params(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()  # no params.yaml there
    result = CliRunner().invoke(main, ["init", "--from", str(tmp_path / "empty"), str(tmp_path / "new")])
    assert result.exit_code == 2, result.output
    assert result.output.startswith("error: cannot read params.yaml of") and result.output.count("\n") == 1
    assert not (tmp_path / "new" / "dvc.yaml").exists()


@pytest.mark.slow
def test_init_from_a_producer_that_published_nothing_names_the_import(tmp_path: Path) -> None:
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    producer = tmp_path / "producer"
    producer.mkdir()
    shutil.copy(ROOT / "params.yaml", producer / "params.yaml")
    run(["git", "init", "-q"], producer)
    run(dvc("init", "-q"), producer)
    run(["git", "add", "-A"], producer)
    run(["git", "commit", "-qm", "params only"], producer)
    result = CliRunner().invoke(main, ["init", "--from", str(producer), str(tmp_path / "consumer")])
    assert result.exit_code == 2, result.output
    lines = result.output.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: importing the teacher cache failed (dvc import "), lines
    assert f"-o {PRODUCER['paths']['cache']})" in lines[0] and "run that command in" in lines[0]
    written = yaml.safe_load((tmp_path / "consumer" / "params.yaml").read_text())
    assert written["distill"] == PRODUCER["distill"]
    assert (tmp_path / "consumer" / ".dvc").is_dir() and (tmp_path / "consumer" / ".git").is_dir()
