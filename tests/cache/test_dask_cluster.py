"""``embed.scheduler: tcp://...``: a dask cluster whose worker runs in another directory
(issue 13, item 4). The stage is given relative paths, as ``params.yaml`` has them; every
path reaches the worker absolute, so the worker's working directory does not matter and
the cache is bit-identical to the synchronous one."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

from pipeline.cache.embed import run_embed
from pipeline.data.shards import load_manifest
from schemas import layout as L

pytestmark = pytest.mark.filterwarnings("ignore:Consolidated metadata is currently not part")


def _start(args: list[str], cwd: Path, log: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as out:
        return subprocess.Popen([sys.executable, "-m", *args], cwd=cwd, stdout=out, stderr=subprocess.STDOUT)


def _scheduler_address(info: Path, scheduler: subprocess.Popen[bytes], log: Path, timeout: float = 60) -> str:
    """The address in the scheduler file, once the scheduler has written it whole: the file
    appears before its JSON is written (seen empty on a loaded machine)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert scheduler.poll() is None, log.read_text()
        try:
            return str(json.loads(info.read_text())["address"])
        except (FileNotFoundError, json.JSONDecodeError, KeyError):
            time.sleep(0.2)
    raise AssertionError(f"no scheduler address in {info} after {timeout:.0f} s: {log.read_text()[-2000:]}")


@pytest.mark.slow
def test_a_worker_started_in_another_directory_fills_the_cache(embedded_cache, shards_dir, teacher_file,
                                                                embed_settings, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    reference, _ = embedded_cache
    project, elsewhere = tmp_path / "project", tmp_path / "elsewhere"
    shutil.copytree(shards_dir, project / "data" / "shards")
    (project / "models").mkdir()
    shutil.copy(teacher_file, project / "models" / "teacher.safetensors")
    elsewhere.mkdir()
    info = tmp_path / "scheduler.json"
    processes = [_start(["distributed.cli.dask_scheduler", "--scheduler-file", str(info), "--host", "127.0.0.1",
                         "--port", "0", "--no-dashboard"], elsewhere, tmp_path / "scheduler.log")]
    try:
        address = _scheduler_address(info, processes[0], tmp_path / "scheduler.log")
        processes.append(_start(["distributed.cli.dask_worker", address, "--nthreads", "1", "--no-nanny",
                                 "--no-dashboard"], elsewhere, tmp_path / "worker.log"))
        monkeypatch.chdir(project)  # the stage's working directory: the project root, as under dvc repro
        settings = dataclasses.replace(embed_settings, scheduler=address)
        report = run_embed(settings=settings, manifest=load_manifest(Path("data/shards")),
                           teacher_path=Path("models/teacher.safetensors"), store_path=Path("cache/teacher.zarr"))
        assert report.written_shards > 0 and report.resumed_shards == 0
        assert not (elsewhere / "cache").exists() and not (elsewhere / "data").exists()
    finally:
        for process in reversed(processes):
            process.terminate()
        for process in processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
    made = zarr.open_group(project / "cache" / "teacher.zarr", mode="r")
    ref = zarr.open_group(reference, mode="r")
    assert made.attrs[L.ATTR_FINGERPRINT] == ref.attrs[L.ATTR_FINGERPRINT]
    for split in L.SPLITS:
        for name in (*L.ROW_ARRAYS, L.DONE, L.SHARD_SHA256):
            np.testing.assert_array_equal(made[split][name][:], ref[split][name][:], err_msg=f"{split}/{name}")
