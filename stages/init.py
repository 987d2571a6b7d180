"""``cifd init --from REPO [--rev REV] [DIR]``: a consumer project on another team's cache.

Reads the producer's ``params.yaml`` at REV (``dvc.api.read``), writes the consumer's
``params.yaml`` and ``dvc.yaml`` (``pipeline.project``), makes DIR a git + DVC repository if it
is not one, and runs ``dvc import REPO <path> -o <path>`` for the teacher cache, the teacher
and the image shards. Then ``dvc repro`` trains the consumer's RDMs and students.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import yaml

from pipeline.project import ProjectError, consumer_project, installed_version
from stages._io import write_json


def _repo_url(repo: str) -> str:
    """A local producer path made absolute (DVC resolves a relative one from where it runs);
    a URL as given."""
    if "://" in repo or re.match(r"^[\w.-]+@[\w.-]+:", repo):  # https://..., ssh://..., git@host:org/repo
        return repo
    local = Path(repo).expanduser()
    if not local.is_dir():
        raise ProjectError(f"--from {repo!r} is neither a git URL nor a directory; give the producer's repository "
                           "(https://host/org/repo.git, git@host:org/repo.git or a local clone)")
    return str(local.resolve())


def _call(args: list[str], cwd: Path, what: str, fix: str = "") -> None:
    result = subprocess.run(args, cwd=cwd, capture_output=True, text=True)
    if result.returncode != 0:
        tail = (result.stderr or result.stdout).strip().splitlines()
        command = " ".join(["dvc", *args[3:]] if args[1:3] == ["-m", "dvc"] else args)
        raise ProjectError(f"{what} failed ({command}): {tail[-1] if tail else 'no output'}"
                           + (f"; {fix}" if fix else ""))


def _dvc(*args: str) -> list[str]:
    return [sys.executable, "-m", "dvc", *args]


def _producer_params(repo: str, rev: str | None) -> object:
    import dvc.api

    try:
        text = dvc.api.read("params.yaml", repo=repo, rev=rev)
    except Exception as exc:  # dvc raises many types (SCM, path, network): one line for the user
        raise ProjectError(f"cannot read params.yaml of {repo}{f' at {rev}' if rev else ''} "
                           f"({type(exc).__name__}: {str(exc).strip() or 'no detail'}); check the repository "
                           "address and revision (it must be a git repository with params.yaml at its root)") from exc
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ProjectError(f"the producer's params.yaml ({repo}) is not valid YAML: {exc}") from exc


def _repository(directory: Path) -> None:
    """Make ``directory`` a DVC project: ``git init`` unless it is inside a git work tree,
    then ``dvc init`` (``--subdir`` below the git top level)."""
    if (directory / ".dvc").is_dir():
        return
    inside = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=directory, capture_output=True, text=True)
    if inside.returncode != 0:
        _call(["git", "init", "-q"], directory, "git init")
        top = directory
    else:
        top = Path(inside.stdout.strip())
    subdir = ["--subdir"] if top.resolve() != directory.resolve() else []
    _call(_dvc("init", "-q", *subdir), directory, "dvc init")


def run(repo: str, rev: str | None, directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    taken = [name for name in ("params.yaml", "dvc.yaml") if (directory / name).exists()]
    if taken:
        raise ProjectError(f"{directory} already has {' and '.join(taken)}; `cifd init` writes a new project: "
                           "give an empty directory (cifd init --from REPO DIR)")
    url = _repo_url(repo)
    project = consumer_project(_producer_params(url, rev), repo=repo, rev=rev)
    _repository(directory)
    (directory / "params.yaml").write_text(project.params_header + yaml.safe_dump(project.params, sort_keys=False))
    (directory / "dvc.yaml").write_text(yaml.safe_dump(project.dvc_yaml, sort_keys=False))
    ignore = directory / ".gitignore"
    lines = ignore.read_text().splitlines() if ignore.exists() else []
    wanted = f"/{project.params['paths']['checkpoints']}/"
    if wanted not in lines:  # per-epoch training checkpoints are not DVC outputs
        ignore.write_text("\n".join([*lines, wanted]) + "\n")
    write_json(directory / "cifd-version.json", installed_version())
    for item in project.imports:
        (directory / item.target).parent.mkdir(parents=True, exist_ok=True)
        args = ["import", url, item.source, "-o", item.target, *(["--rev", rev] if rev else [])]
        _call(_dvc(*args), directory, f"importing the {item.what}",
              f"params.yaml and dvc.yaml are written: once the cause is fixed, run that command in {directory}")
        print(f"init: imported the {item.what} {item.source} -> {item.target}")
    print(f"init: {directory} is ready. Next:\n"
          f"  cd {directory}\n"
          "  dvc repro                 # RDMs, students and the method table on the imported cache\n"
          "  cifd report               # the method table again\n"
          "  git add -A && git commit -m 'cifd init'\n"
          "  dvc update -R . && dvc repro   # later: the producer's newest cache")
