"""``cifd embed`` (stage one): the frozen teacher over every view of every image → Zarr."""

from __future__ import annotations

from pathlib import Path

from tqdm import tqdm

from pipeline.cache.embed import run_embed
from pipeline.cache.inspect import cache_info
from pipeline.cache.reader import open_cache
from pipeline.data.shards import load_manifest
from schemas import layout as L
from schemas import metrics as M
from schemas.config import EmbedConfig, load_stage, trusted_teacher_entrypoint
from stages._io import write_json


def run(params: Path) -> None:
    paths, cfg = load_stage(params, "embed", EmbedConfig)
    manifest = load_manifest(paths.shards)
    bars: list[tqdm] = []  # made on the first report, so a refused run prints only its error

    def progress(count: int, description: str) -> None:
        if description:
            bars.append(tqdm(total=count, desc=description, unit="img", dynamic_ncols=True))
        else:
            bars[-1].update(count)

    try:
        report = run_embed(settings=cfg, manifest=manifest, teacher_path=Path(paths.teacher),
                           store_path=Path(paths.cache), progress=progress,
                           allow_entrypoint=trusted_teacher_entrypoint(params))
    finally:
        for bar in bars:
            bar.close()
    if report.rebuilt_because:
        print(f"embed: rebuilt {paths.cache} because its recorded inputs differ: {'; '.join(report.rebuilt_because)}")
    cache = open_cache(paths.cache)
    info = cache_info(paths.cache)
    view0 = {}
    for split in cache.splits:  # block by block: a whole split's (N, V, C) logits would grow with N
        part = cache.split(split)
        hits = sum(int((block[L.LOGITS][:, 0].argmax(-1) == block[L.LABELS]).sum())
                   for _, _, block in part.blocks((L.LOGITS, L.LABELS)))
        view0[split] = round(hits / max(part.num_rows, 1), 5)
    train_info = info["splits"]["train"]
    write_json(Path(paths.metrics) / M.EMBED, {
        M.VIEWS: cfg.views,
        M.TEACHER_FORWARDS: int(sum(manifest.split(s)["num_samples"] for s in cache.splits) * cfg.views),
        M.VIEW0_TOP1: view0,
        M.BYTES_PER_SAMPLE_VIEW: {"raw": train_info["bytes_per_sample_view_raw"],
                                  "stored": train_info["bytes_per_sample_view_stored"]},
        M.COMPRESSION_RATIO: info["compression_ratio"],
        M.CLASSIFIER_REPRODUCES_LOGITS: bool(report.classifier_reproduces_logits),
    })
    rate = report.written_rows * cfg.views / max(report.seconds, 1e-9)
    print(f"embed: wrote {report.written_shards} shards ({report.written_rows} images × {cfg.views} views, "
          f"{rate:.0f} views/s), resumed {report.resumed_shards} finished shards; view-0 top-1 {view0}")
