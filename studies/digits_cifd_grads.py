"""Where the CIFD student's gradient comes from on the digits default: after every epoch of a
run on the carved split (train minus 20 %, seed 0), the norm of each loss term's gradient
on the backbone's parameters, on one fixed batch (128 training rows, clean view, KD dropout
off), plus the student embedding's RMS against the IBM noise's (1/sqrt(12) = 0.289).

    uv run python studies/digits_cifd_grads.py OUT.json [key=value ...]

About a minute on one core. Needs the digits pipeline run once (``uv run dvc repro``).
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import torch
import yaml

from pipeline.losses import cifd_loss
from pipeline.train.distill import train_student
from pipeline.train.targets import gather_targets
from pipeline.tune.holdout import carve_holdout
from schemas.config import DistillConfig, load_stage
from stages.distill import build_inputs
from stages.tune import with_overrides


def main(out: str, *pairs: str) -> None:
    torch.set_num_threads(1)
    paths, base = load_stage(Path("params.yaml"), "distill", DistillConfig)
    overrides = {k: yaml.safe_load(v) for k, v in (p.split("=", 1) for p in pairs)}
    cfg = with_overrides(base, {**overrides, "threads": 1})
    inputs = build_inputs(paths, cfg, "cifd", device=torch.device("cpu"))
    hold = carve_holdout(inputs.batches, fraction=0.2, seed=0, batch_size=cfg.batch_size)
    student, w = inputs.student, inputs.run.weights
    rows = torch.arange(128)
    views = torch.zeros(128, dtype=torch.long)
    batch = gather_targets(hold.batches.targets, rows, views)
    from pipeline.data.preprocess import render_inputs

    x = render_inputs(hold.batches.images[rows], hold.batches.targets.views[rows, views].cpu(),
                      preprocess=inputs.run.preprocess)
    scale = hold.info.emb_scale
    params = [p for p in student.backbone.parameters() if p.requires_grad]
    records = []

    def probe(epoch: int) -> None:
        student.train()
        out = student(x, generator=torch.Generator().manual_seed(0))
        emb_rms = float(student.backbone.embed(x).detach().pow(2).mean().sqrt())
        m = batch.rdm_logits.shape[0]
        parts = cifd_loss(student_logits=out.logits.float(), labels=batch.labels, teacher_logits=batch.teacher_logits,
                          rdm_logits=batch.rdm_logits, student_embedding_proj=out.projected.float(),
                          teacher_embedding=batch.teacher_emb.float() / scale,
                          rdm_embeddings=batch.rdm_emb.float() / scale, student_bits=out.bits,
                          rdm_weights=torch.ones(m), ce_weight=w.ce_weight, kl_weight=w.kl_weight,
                          temperature=w.temperature, feature_weight=w.feature_weight, rate_weight=w.rate_weight,
                          distortion=w.distortion, keep=None)
        terms = {"ce": w.ce_weight * parts.ce, "kl": w.kl_weight * (parts.kl_teacher + parts.kl_rdm.sum()),
                 "feature": w.feature_weight * (parts.feat_teacher + parts.feat_rdm.sum()),
                 "rate": w.rate_weight * parts.rate}
        rec = {"epoch": epoch, "embedding_rms": round(emb_rms, 4)}
        for name, term in terms.items():
            grads = torch.autograd.grad(term, params, retain_graph=True, allow_unused=True)
            norm = torch.sqrt(sum((g.pow(2).sum() for g in grads if g is not None), torch.zeros(())))
            rec[f"{name}_value"] = round(float(term), 4)
            rec[f"{name}_grad_norm"] = round(float(norm), 4)
        student.zero_grad(set_to_none=True)
        records.append(rec)
        print(json.dumps(rec), flush=True)

    probe(0)
    run = dataclasses.replace(inputs.run, checkpoint=None)
    history = train_student(student, run=run, info=hold.info, batches=hold.batches, val=hold.val,
                            on_epoch=lambda h: probe(h.epoch))
    result = {"overrides": overrides, "probes": records, "val_top1": [round(h.val_top1, 5) for h in history],
              "command": "uv run python studies/digits_cifd_grads.py " + " ".join([out, *pairs])}
    Path(out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main(*sys.argv[1:])
