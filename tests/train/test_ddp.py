"""DDP on CPU: two gloo processes run ``stages.distill.run`` (as under torchrun) for one
epoch of CIFD, from device memory and streamed from the shards; both ranks must end with
identical student weights and buffers, and a finite loss."""

from __future__ import annotations

import math
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

MODES = ("memory", "stream")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, params: dict[str, str], out: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world))
    from stages import distill as stage

    for mode in MODES:
        result = stage.run(Path(params[mode]), "cifd")
        torch.save({"state": result.student.state_dict(), "losses": [h.train_loss for h in result.history]},
                   Path(out) / f"{mode}-rank{rank}.pt")


@pytest.mark.timeout(180)
def test_two_gloo_ranks_end_identical(project, tmp_path: Path) -> None:
    params = {mode: str(project.params(tmp_path / mode, distill={"data": mode, "batch_size": 4}))
              for mode in MODES}
    # fork, not spawn: the children inherit the imported modules (a fresh import of torch +
    # timm takes ~10 s per process on a busy CI box); nothing here has touched CUDA.
    mp.start_processes(_rank_main, args=(2, _free_port(), params, str(tmp_path)), nprocs=2, join=True,
                       start_method="fork")
    for mode in MODES:
        ranks = [torch.load(tmp_path / f"{mode}-rank{r}.pt", weights_only=True) for r in (0, 1)]
        assert ranks[0]["losses"] == ranks[1]["losses"]  # reduced over ranks: the same log everywhere
        assert len(ranks[0]["losses"]) == 1 and math.isfinite(ranks[0]["losses"][0])
        assert ranks[0]["state"].keys() == ranks[1]["state"].keys()
        for key, value in ranks[0]["state"].items():
            assert torch.equal(value, ranks[1]["state"][key]), f"{mode}: ranks differ in {key}"
        assert any("running_mean" in key for key in ranks[0]["state"])  # BatchNorm buffers were compared too
        # Rank 0 wrote the outputs.
        assert (tmp_path / mode / "students" / "cifd.safetensors").is_file()
        assert (tmp_path / mode / "plots" / "distill" / "cifd.csv").is_file()
