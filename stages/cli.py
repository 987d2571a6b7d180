"""The ``cifd`` command line: one subcommand per ``dvc.yaml`` stage, plus ``cache`` tools.

Hyperparameters live in ``params.yaml`` (one section per stage), not in flags: every stage
takes only ``--params``. Run stages through DVC (``dvc repro``) to get caching and
provenance; run them directly to debug.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path

import click

from stages._io import setup_logging

PARAMS = click.option("--params", "params", type=click.Path(path_type=Path), default=Path("params.yaml"),
                      show_default=True, help="Params file with a 'paths' section and one section per stage.")


def _user_errors() -> tuple[type[BaseException], ...]:
    from pipeline.cache.store import CacheError
    from pipeline.data.shards import CorruptSampleError, ManifestError
    from pipeline.data.sources import SourceError
    from pipeline.models import ModelError
    from pipeline.project import ProjectError
    from pipeline.train.distill import TrainingDiverged
    from report.study import StudyError
    from schemas.base import ConfigError

    return (ConfigError, CacheError, CorruptSampleError, ManifestError, SourceError, ModelError, StudyError,
            TrainingDiverged, ProjectError)


def _stop_with_parent() -> None:
    """A writer stage stops when the process that started it is gone: a ``kill -9`` of
    ``uv run`` or ``dvc repro`` must not leave an orphan writing to a store. Called first
    thing, before the stage's heavy imports."""
    from pipeline.cache.lock import stop_with_parent

    stop_with_parent()


def _run(fn: Callable[[], None]) -> None:
    """Run a stage; a user-caused error prints one clear line and exits 2, not a traceback."""
    setup_logging()
    try:
        fn()
    except _user_errors() as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """cifd: CIFD knowledge distillation on a sharded Zarr cache of teacher outputs.

    Pipeline: prepare → teacher → embed → rdm → distill → evaluate. `uv run dvc repro`
    runs it end to end; each subcommand runs one stage with the params in params.yaml.
    """


@main.command()
@PARAMS
def prepare(params: Path) -> None:
    """Source (digits, ImageFolder dir/tar, or WebDataset) → byte-stable WebDataset shards.

    Images of any size and mode: bytes pass through as they are (prepare.max_side shrinks
    only larger images), decoded to prepare.mode (RGB or L). Writes
    paths.shards/{train,val}-NNNNNN.tar and manifest.json (row ranges, classes, colour mode,
    each image's size and content hash). Corrupt images fail, or are skipped and counted
    when prepare.on_corrupt is 'skip'.
    """
    from stages import prepare as stage

    _run(lambda: stage.run(params))


@main.command()
@PARAMS
def teacher(params: Path) -> None:
    """Build the teacher (timm name or module:function + weights), optionally fine-tune
    it on the train shards (teacher.epochs > 0), report val top-1, and freeze it to
    paths.teacher."""
    from stages import teacher as stage

    _run(lambda: stage.run(params))


@main.command()
@PARAMS
def embed(params: Path) -> None:
    """Stage one: run the frozen teacher once over V views of every image and write
    embeddings, logits and the exact view parameters to the sharded Zarr store at
    paths.cache. Parallel over tar shards with dask; resumable: a killed run redoes only
    the shards it had not finished."""
    _stop_with_parent()
    from stages import embed as stage

    _run(lambda: stage.run(params))


@main.command()
@PARAMS
def rdm(params: Path) -> None:
    """Stage two: train the Rate-Distortion Modules (one per rdm.rate_weights entry) on
    the cached teacher embeddings alone (no images, no teacher backbone), and cache each
    RDM's reconstructed embedding and logits for every (row, view) in paths.rdm_cache."""
    _stop_with_parent()
    from stages import rdm as stage

    _run(lambda: stage.run(params))


@main.command()
@PARAMS
@click.option("--method", required=True, type=click.Choice(["ce", "kd", "dgkd", "cifd"]),
              help="Distillation method (dvc.yaml runs every entry of distill.methods).")
def distill(params: Path, method: str) -> None:
    """Stage three: train a student on the cached views (exact crops replayed on the
    device) with the cached teacher and RDM outputs as targets. Checkpoints every epoch and
    resumes a killed run; runs under `torchrun` for multi-GPU (DDP)."""
    from stages import distill as stage

    _run(lambda: stage.run(params, method))


@main.command()
@PARAMS
@click.option("--method", required=True, type=click.Choice(["ce", "kd", "dgkd", "cifd"]),
              help="The method whose distill settings to search (its space: params tune.space).")
def tune(params: Path, method: str) -> None:
    """Optuna study (TPE, pruned on per-epoch validation top-1) of one method's distill
    settings; trials are students on the cached targets, scored on a split carved from
    train. Resumes from paths.tune/METHOD.db; writes METHOD.json, METHOD.png and
    METHOD.best.yaml (the best settings, ready for `dvc exp run --set-param ...`)."""
    from stages import tune as stage

    _run(lambda: stage.run(params, method))


@main.command()
@PARAMS
def evaluate(params: Path) -> None:
    """Every distilled student against the teacher on the val split: top-1, teacher
    top-1, top-1 agreement and KL; writes the method table as DVC metrics and plots."""
    from stages import evaluate as stage

    _run(lambda: stage.run(params))


@main.command()
@click.argument("listings", nargs=-1, type=click.Path(exists=True, dir_okay=False, allow_dash=True, path_type=Path))
@PARAMS
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("docs/study"),
              show_default=True, help="With LISTINGS: directory for study.json, study.md and study_top1.png.")
@click.option("--against-variant", metavar="VARIANT", default=None,
              help="With LISTINGS: also the paired top-1 differences of every row against the same method "
                   "in VARIANT, seed by seed (mean ± std and a 95 % t-interval), e.g. the naive cache v1clean.")
@click.option("--against-method", metavar="METHOD", default=None,
              help="With LISTINGS: also the paired top-1 differences of every row against METHOD in the "
                   "same variant, seed by seed (e.g. kd).")
@click.option("--variants", metavar="V1,V2,...", default="",
              help="With LISTINGS: only these variants, in this order (tables and plots).")
def report(listings: tuple[Path, ...], params: Path, out: Path, against_variant: str | None,
           against_method: str | None, variants: str) -> None:
    """The method table: top-1, agreement with the teacher, KL(teacher ‖ student), distill
    wall time and its ratio to KD, within 120 columns; a diverged run is marked, not averaged.

    Without LISTINGS: this workspace's last run (paths.metrics/evaluate.json of --params).
    LISTINGS: files written by `dvc exp show --json` (`-` reads one from stdin), one row per
    (variant, method) with mean ± std over seeds. Experiments must be named
    `<variant>-s<seed>` (`dvc exp run -n main-s1 -S distill.seed=1`); others are ignored.
    """
    from stages import report as stage

    def go() -> None:
        from report.study import StudyError

        if not listings and (against_variant or against_method or variants):
            raise StudyError("--against-variant, --against-method and --variants read experiments: pass `dvc exp "
                             "show --json` listings (`dvc exp show --json > exps.json && cifd report exps.json "
                             "--against-method kd`)")
        if listings:
            stage.run(listings, out, against_variant=against_variant, against_method=against_method,
                      variants=[v.strip() for v in variants.split(",") if v.strip()])
        else:
            stage.workspace(params)

    _run(go)


@main.command("init")
@click.option("--from", "repo", required=True, metavar="REPO",
              help="The producer: a git URL or path of a cifd project whose cache was `dvc push`ed.")
@click.option("--rev", default=None, help="Producer branch, tag or commit (default: its default branch).")
@click.argument("directory", required=False, default=".", type=click.Path(file_okay=False, path_type=Path))
def init_cmd(repo: str, rev: str | None, directory: Path) -> None:
    """A project of your own on another team's teacher cache.

    Writes DIR/params.yaml (the producer's paths, teacher entrypoint and rdm/distill/evaluate
    sections) and DIR/dvc.yaml (cifd-version, rdm, distill@<method>, evaluate), makes DIR a
    git + DVC repository if needed, and `dvc import`s the teacher cache, the teacher and the
    image shards to the paths its params name. Then: `dvc repro`; later `dvc update -R .`
    and `dvc repro` for the producer's newest revision.
    """
    from stages import init as stage

    _run(lambda: stage.run(repo, rev, directory))


@main.command("version")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the JSON to this file (the cifd-version stage of a consumer project).")
def version_cmd(out: Path | None) -> None:
    """The installed cifd: version, sha256 of its code, Python and library versions (JSON)."""
    from pipeline.project import installed_version
    from stages._io import write_json

    def show() -> None:
        info = installed_version()
        if out is not None:
            write_json(out, info)
        click.echo(json.dumps(info, indent=2, sort_keys=True))

    _run(show)


@main.group()
def cache() -> None:
    """Inspect and verify a teacher cache."""


@cache.command("info")
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a summary.")
@click.option("--topk", type=click.IntRange(min=1), default=None,
              help="k of the top-k line of the bytes per choice (default: the cache's k, else 5).")
def cache_info_cmd(path: Path, as_json: bool, topk: int | None) -> None:
    """Print teacher, where the cache was made (repository, revision, dataset source and prepare
    params, versions), N, V, D, C, dtypes, the logits choice, bytes per sample per view (for
    each logits choice: stored float32 / float16 / bfloat16, top-k, from_head; and on disk for
    this cache), compression ratio; --json: all of it, the whole provenance included."""
    from pipeline.cache.inspect import cache_info

    def show() -> None:
        info = cache_info(path, topk=topk)
        if as_json:
            click.echo(json.dumps(info, indent=2))
            return
        click.echo(f"cache      {info['path']}")
        click.echo(f"teacher    {info['teacher']}  (weights sha256 {info['teacher_state_dict_sha256'][:16]}…)")
        origin = info["origin"] or {}
        if not origin:
            click.echo("made by    not recorded (a cache from before cifd recorded its origin)")
        else:
            revision = origin.get("revision")
            click.echo(f"made by    {origin.get('repository') or 'a repository with no public remote'} at "
                       f"{revision[:12] if revision else 'no commit'}"
                       f"{' (with uncommitted changes)' if origin.get('dirty') else ''}")
            data = origin.get("dataset") or {}
            prepare = ", ".join(f"{k}={v}" for k, v in (data.get("prepare") or {}).items() if v is not None)
            click.echo(f"source     {data.get('source')}: {prepare}")
        versions = {**info["library_versions"], **(origin.get("versions") or {})}
        click.echo("versions   " + ", ".join(f"{k} {v}" for k, v in versions.items()))
        click.echo(f"dataset    manifest sha256 {info['dataset_manifest_sha256'][:16]}…, {len(info['classes'])} classes")
        click.echo(f"images     {info['images']['mode']}, "
                   f"{'one size ' + str(info['images']['shape']) if info['images']['shape'] else 'many sizes'}")
        pre, origin = info["preprocess"], info["preprocess_origin"]
        click.echo("preprocess " + ", ".join(f"{k}={pre[k]}" + (f" ({origin[k]})" if k in origin else "") for k in pre))
        click.echo(f"views      {info['views']['num_views']} per image, policy {info['views']['policy']}")
        if "mixup" in info["views"]:
            mix = info["views"]["mixup"]
            click.echo(f"mixup      the last {mix['views']} views of every train image mixed, lambda ~ Beta({mix['alpha']}, "
                       f"{mix['alpha']}), partner in the same shard")
            if mix.get("cutmix"):
                click.echo(f"cutmix     the last {mix['cutmix']} of those paste a box of the partner (CutMix) instead of "
                           "blending")
        click.echo(f"dtypes     {info['dtypes']}")
        lg = info["logits"]
        click.echo(f"logits     {lg['kind']}" + (f", top-{lg['topk']}" if lg["topk"] else "")
                   + (f", dtype {lg['dtype']}" if lg["kind"] == "stored" else f", head {lg['head_bytes']} bytes"))
        click.echo(f"classifier(embedding) reproduces logits: {info['classifier_check']}")
        for name, s in info["splits"].items():
            click.echo(f"{name:<10} N={s['N']} V={s['V']} D={s['D']} C={s['C']} shards={s['shards']} "
                       f"bytes/sample/view raw={s['bytes_per_sample_view_raw']} "
                       f"stored={s['bytes_per_sample_view_stored']}")
            choices = ", ".join(f"{k} {v}" for k, v in s["bytes_per_sample_view_by_choice"].items())
            click.echo(f"{'':<10} bytes/sample/view by logits choice (uncompressed): {choices}")
            arrays = ", ".join(f"{k} {v}" for k, v in s["stored_bytes_per_sample_view_by_array"].items())
            click.echo(f"{'':<10} on disk per array: {arrays}")
        click.echo(f"compression ratio {info['compression_ratio']}")

    _run(show)


@cache.command("verify")
@click.argument("path", type=click.Path(path_type=Path), required=False)
@PARAMS
@click.option("--teacher", type=click.Path(path_type=Path), default=None,
              help="Frozen teacher file to re-run (default: paths.teacher of --params; never the cache's word).")
@click.option("--shards", type=click.Path(path_type=Path), default=None,
              help="Shard directory (default: paths.shards of --params).")
@click.option("--samples", default=256, show_default=True, help="Random (row, view) pairs to re-run per split.")
@click.option("--tolerance", default=1e-2, show_default=True,
              help="Max error relative to the largest cached magnitude.")
@click.option("--seed", type=int, default=None,
              help="Seed of the random draw (default: a fresh one, printed; pass it to repeat a run).")
@click.option("--full", is_flag=True,
              help="Also read every shard of every split: checksums, content sha256, finiteness.")
def cache_verify_cmd(path: Path | None, params: Path, teacher: Path | None, shards: Path | None, samples: int,
                     tolerance: float, seed: int | None, full: bool) -> None:
    """Re-run the live teacher on a fresh random sample of (row, view) pairs of both splits
    and compare with the cache (max abs error, cosine, top-1 agreement); with --full, check
    every stored value too. PATH defaults to paths.cache. Exits 1 when a check fails."""
    import secrets

    from pipeline.cache.inspect import verify_cache

    def check() -> None:
        from schemas.config import trusted_teacher_entrypoint

        cache_path, teacher_path, shards_path = path, teacher, shards
        allow = trusted_teacher_entrypoint(params) if params.is_file() else None
        if cache_path is None or teacher_path is None or shards_path is None:
            from schemas.config import Paths, read_params

            paths = Paths.from_mapping(read_params(params).get("paths"), section="paths")
            cache_path = cache_path or Path(paths.cache)
            teacher_path = teacher_path or Path(paths.teacher)
            shards_path = shards_path or Path(paths.shards)
        draw = seed if seed is not None else secrets.randbelow(2**31)
        report = verify_cache(cache_path, teacher=teacher_path, shards=shards_path, samples=samples, seed=draw,
                              tolerance=tolerance, full=full, allow_entrypoint=allow)
        # The seed is printed once the cache opened: a refusal stays one line.
        click.echo(f"verify: seed {draw} (repeat this draw with --seed {draw})", err=True)
        click.echo(json.dumps(report.to_dict(), indent=2))
        if not report.ok:
            reasons = report.problems or ["cache and live teacher disagree beyond tolerance"]
            click.echo(f"verify: FAILED ({len(reasons)} problem{'s' if len(reasons) != 1 else ''}): "
                       + " | ".join(reasons[:5]), err=True)
            sys.exit(1)
        click.echo("verify: ok")

    _run(check)


if __name__ == "__main__":
    main()
