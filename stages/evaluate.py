"""``cifd evaluate``: the method table. Each student against the teacher on the val split,
read shard by shard once for all students."""

from __future__ import annotations

import csv
import json
from pathlib import Path


from pipeline.cache.join import cached_chunks
from pipeline.cache.reader import CacheExpectation, open_cache
from pipeline.data.preprocess import Preprocess
from pipeline.data.shards import load_manifest
from pipeline.evaluate import score_models
from pipeline.models import load_model, state_dict_sha256
from pipeline.runtime import resolve_device
from report.plots import plot_curves
from schemas import metrics as M
from schemas.base import ConfigError
from schemas.config import DistillConfig, EvaluateConfig, TeacherConfig, load_stage
from stages._io import write_json


def run(params: Path) -> None:
    paths, cfg = load_stage(params, "evaluate", EvaluateConfig)
    # The entrypoints the user's params name: the only ones outside timm and pipeline.models
    # that the teacher and student files may name.
    teacher_model = load_stage(params, "teacher", TeacherConfig)[1].model
    student_model = load_stage(params, "distill", DistillConfig)[1].student
    device = resolve_device(cfg.device)
    teacher, spec = load_model(paths.teacher, allow_entrypoint=teacher_model)
    manifest = load_manifest(paths.shards)
    cache = open_cache(paths.cache, CacheExpectation(teacher_sha256=state_dict_sha256(teacher),
                                                     manifest_sha256=manifest.sha256))
    students = {}
    for method in cfg.methods:
        path = Path(paths.students) / f"{method}.safetensors"
        if not path.is_file():
            raise ConfigError(f"no student for method '{method}' at {path}; run `cifd distill --method {method}`")
        student, student_spec = load_model(path, allow_entrypoint=student_model)
        if student_spec.get("teacher_cache_fingerprint") != cache.fingerprint:
            raise ConfigError(f"student {path} was distilled from another teacher cache; rerun `dvc repro`")
        # The student's own input size and normalisation, on the box the teacher saw.
        students[method] = (student.to(device), Preprocess.from_spec(student_spec, source=str(path)))
    # One pass over the val shards for every student: memory holds a shard, not the split.
    results, teacher_scores = score_models(students, cached_chunks(manifest, cache, "val", device),
                                           batch_size=cfg.batch_size)
    table: dict[str, dict[str, float]] = {}
    teacher_top1 = teacher_scores.top1
    table["teacher"] = {M.EVAL_TOP1: round(teacher_top1, 5), M.EVAL_AGREEMENT: 1.0, M.EVAL_KL: 0.0}
    curves = {}
    for method in cfg.methods:
        result = results[method]
        table[method] = {M.EVAL_TOP1: round(result.top1, 5), M.EVAL_AGREEMENT: round(result.agreement, 5),
                         M.EVAL_KL: round(result.kl, 5)}
        timing = Path(paths.metrics) / M.DISTILL_DIR / f"{method}.json"
        if timing.is_file():
            record = json.loads(timing.read_text())
            table[method][M.EVAL_SECONDS] = record[M.SECONDS]
            if M.TEACHER_FORWARDS in record:
                table[method][M.EVAL_TEACHER_FORWARDS] = record[M.TEACHER_FORWARDS]
        curve = Path(paths.plots) / "distill" / f"{method}.csv"
        if curve.is_file():
            with open(curve) as handle:
                curves[method] = [{k: float(v) for k, v in row.items()} for row in csv.DictReader(handle)]
    write_json(Path(paths.metrics) / M.EVALUATE, table)
    plot_curves(curves, teacher_top1=teacher_top1, path=Path(paths.plots) / M.EVAL_PLOT)
    print(f"{'method':<10}{'top-1':>10}{'agreement':>12}{'KL(T‖S)':>10}")
    for name, row in table.items():
        print(f"{name:<10}{row[M.EVAL_TOP1]:>10.4f}{row[M.EVAL_AGREEMENT]:>12.4f}{row[M.EVAL_KL]:>10.4f}")
