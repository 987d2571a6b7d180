"""Stages two and three and ``evaluate`` on compact teacher caches (issue 12, item 3): a
top-2 bfloat16 cache (C = 3) and a from_head cache, end to end through the stages' own
``run``: RDMs trained on the cache's logits, CIFD and KD students (memory and stream mode),
and the evaluation against the cache's teacher logits."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from pipeline.cache.embed import run_embed

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore:Consolidated metadata is currently not part")]


@pytest.mark.parametrize("change", [{"logits_topk": 2, "logits_dtype": "bfloat16"}, {"logits": "from_head"}],
                         ids=["top2_bf16", "from_head"])
def test_stages_run_on_a_compact_cache(project, tmp_path: Path, embed_settings, manifest, teacher_file,
                                       change) -> None:
    from stages import distill as distill_stage
    from stages import evaluate as evaluate_stage
    from stages import rdm as rdm_stage

    cache = tmp_path / "teacher.zarr"
    before = torch.get_num_threads()
    try:
        run_embed(settings=dataclasses.replace(embed_settings, **change), manifest=manifest,
                  teacher_path=teacher_file, store_path=cache)
    finally:
        torch.set_num_threads(before)
    paths = {"cache": str(cache), "rdm_models": str(tmp_path / "rdm.safetensors"),
             "rdm_cache": str(tmp_path / "rdm.zarr")}
    rdm_stage.run(project.params(tmp_path / "rdm", paths=paths))
    params = project.params(tmp_path / "run", paths=paths,
                            distill={"methods": ["kd", "cifd"], "kd_dropout": 0.0},
                            evaluate={"methods": ["kd", "cifd"], "batch_size": 64, "device": "cpu"})
    for method in ("kd", "cifd"):
        history = distill_stage.run(params, method).history
        assert all(torch.isfinite(torch.tensor(h.train_loss)) for h in history)
    stream = project.params(tmp_path / "stream", paths=paths, distill={"data": "stream", "methods": ["kd"]})
    assert torch.isfinite(torch.tensor(distill_stage.run(stream, "kd").history[-1].train_loss))
    evaluate_stage.run(params)
    scores = json.loads(next((tmp_path / "run" / "metrics").rglob("evaluate*.json")).read_text())
    assert scores, scores
