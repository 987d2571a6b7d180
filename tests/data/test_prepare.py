"""``prepare``: source → byte-stable WebDataset shards + manifest, and the strict configs."""

from __future__ import annotations

import dataclasses
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.data.prepare import prepare_dataset
from pipeline.data.shards import (
    VariableSizeError,
    CorruptSampleError,
    ManifestError,
    content_hash,
    decode_image,
    file_sha256,
    load_manifest,
    load_split,
    read_shard,
)
from pipeline.data.sources import SourceError, iter_tar_samples
from schemas.base import ConfigError
from schemas.config import STAGES, EmbedConfig, PrepareConfig, TeacherConfig, load_stage
from schemas.layout import KEY_DIGITS, MANIFEST_NAME, SPLITS, sample_key


def shard_files(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(root.iterdir())}


def source_hash_to_label(tiny) -> dict[str, int]:
    """content hash → class index (sorted folder names) of every source image."""
    return {content_hash(data): tiny.class_names.index(name.split("/")[1])
            for name, data in tiny.members().items()}


def hashes_of(manifest, split: str) -> list[str]:
    """The manifest's per-sample content hashes of ``split`` as hex, in row order."""
    return [row.tobytes().hex() for row in manifest.sample_hashes(split)]


# Manifest and shards ---------------------------------------------------------------------


def test_manifest_row_ranges_are_contiguous_and_cover_every_split(manifest, tiny) -> None:
    total = tiny.num_classes * tiny.per_class
    assert sum(manifest.split(s)["num_samples"] for s in SPLITS) == total
    assert manifest.classes == list(tiny.class_names)
    assert manifest.image_shape == (3, tiny.image_size, tiny.image_size)
    for split in SPLITS:
        entry = manifest.split(split)
        shards = entry["shards"]
        assert len(shards) >= 3, "the fixture should make several shards per split"
        assert shards[0]["start"] == 0
        assert shards[-1]["stop"] == entry["num_samples"]
        for prev, nxt in zip(shards, shards[1:], strict=False):
            assert prev["stop"] == nxt["start"]
        sizes = [s["stop"] - s["start"] for s in shards]
        assert all(size == tiny.samples_per_shard for size in sizes[:-1])
        assert 0 < sizes[-1] <= tiny.samples_per_shard
        assert [s["file"] for s in shards] == [f"{split}-{i:06d}.tar" for i in range(len(shards))]
        assert len(hashes_of(manifest, split)) == entry["num_samples"]
        for shard in shards:
            assert file_sha256(manifest.root / shard["file"]) == shard["sha256"]


def test_shard_keys_hashes_and_labels_match_the_manifest(manifest, tiny) -> None:
    labels_of = source_hash_to_label(tiny)
    seen = []
    for split in SPLITS:
        entry = manifest.split(split)
        labels = []
        for shard in entry["shards"]:
            samples = list(iter_tar_samples(manifest.root / shard["file"]))
            assert len(samples) == shard["stop"] - shard["start"]
            for row, sample in zip(range(shard["start"], shard["stop"]), samples, strict=True):
                assert sample["__key__"] == sample_key(row) == f"{row:0{KEY_DIGITS}d}"
                assert set(sample) == {"__key__", "cls", "jpg"}
                image = sample["jpg"]
                assert content_hash(image) == hashes_of(manifest, split)[row]
                label = int(sample["cls"])
                assert label == labels_of[content_hash(image)], "label is not the image's class folder"
                labels.append(label)
                seen.append(content_hash(image))
        assert np.bincount(labels, minlength=tiny.num_classes).tolist() == entry["class_counts"]
    # image bytes are passed through unchanged, every source image exactly once
    assert sorted(seen) == sorted(labels_of)


def test_read_shard_and_load_split_decode_rows_in_order(manifest, tiny) -> None:
    block = load_split(manifest, "train", verify_hashes=True)
    n = manifest.split("train")["num_samples"]
    stacked = block.stacked()
    assert stacked.shape == (n, 3, tiny.image_size, tiny.image_size) and stacked.dtype == np.uint8
    assert block.sizes.tolist() == manifest.sizes("train").tolist() == [[tiny.image_size] * 2] * n
    assert block.index.tolist() == list(range(n))
    shard = manifest.split("train")["shards"][1]
    with pytest.raises(CorruptSampleError, match="expected key"):  # wrong row range
        read_shard(manifest.root / shard["file"], mode="RGB", start=shard["start"] + 1, stop=shard["stop"] + 1)
    with pytest.raises(CorruptSampleError, match="truncated or altered"):
        read_shard(manifest.root / shard["file"], mode="RGB", start=shard["start"], stop=shard["stop"] + 1)


def test_shards_are_byte_stable_across_runs(tmp_path, prepare_config, shards_dir) -> None:
    first = shard_files(shards_dir)
    out = tmp_path / "again"
    prepare_dataset(prepare_config, out)
    assert shard_files(out) == first  # tars and manifest, byte for byte
    # Rerunning into a directory with stale shards replaces them.
    (out / "train-000099.tar").write_bytes(b"stale")
    (out / "val-000000.tar").write_bytes(b"stale")
    report = prepare_dataset(prepare_config, out)
    assert shard_files(out) == first
    assert report.manifest_sha256 == load_manifest(out).sha256


def test_val_split_is_stratified_and_seeded(manifest, tiny, prepare_config, tmp_path) -> None:
    per_class_val = round(tiny.val_fraction * tiny.per_class)
    assert manifest.split("val")["class_counts"] == [per_class_val] * tiny.num_classes
    assert manifest.split("train")["class_counts"] == [tiny.per_class - per_class_val] * tiny.num_classes
    train, val = (set(hashes_of(manifest, s)) for s in SPLITS)
    assert not train & val
    other = dataclasses.replace(prepare_config, seed=1)
    prepare_dataset(other, tmp_path)
    assert set(hashes_of(load_manifest(tmp_path), "val")) != val


def test_limit_train_takes_a_stratified_subset(prepare_config, manifest, tiny, tmp_path) -> None:
    cfg = dataclasses.replace(prepare_config, limit_train=12, limit_val=3)
    report = prepare_dataset(cfg, tmp_path)
    assert report.num_samples == {"train": 12, "val": 3}
    limited = load_manifest(tmp_path)
    assert limited.split("train")["class_counts"] == [4] * tiny.num_classes
    assert limited.split("val")["class_counts"] == [1] * tiny.num_classes
    assert set(hashes_of(limited, "train")) <= set(hashes_of(manifest, "train"))
    assert set(hashes_of(limited, "val")) <= set(hashes_of(manifest, "val"))
    assert hashes_of(limited, "val") != hashes_of(manifest, "val")[:3]


@pytest.mark.parametrize("limit", [1, 2, 10, 26])
def test_limit_train_gives_exactly_the_limit(prepare_config, tiny, tmp_path, limit) -> None:
    # 27 train rows in 3 classes of 9: per-class rounding alone gives 0, 3, 9 and 27 rows.
    report = prepare_dataset(dataclasses.replace(prepare_config, limit_train=limit), tmp_path)
    assert report.num_samples["train"] == limit
    counts = load_manifest(tmp_path).split("train")["class_counts"]
    counts += [0] * (tiny.num_classes - len(counts))
    assert max(counts) - min(counts) <= 1  # as balanced as the limit allows


def test_webdataset_source_round_trips(shards_dir, manifest, tmp_path) -> None:
    # shuffle off: the shards are already in their (shuffled) row order; a round trip keeps it.
    cfg = PrepareConfig(source="webdataset", train=str(shards_dir / "train-*.tar"),
                        val=str(shards_dir / "val-*.tar"), samples_per_shard=manifest.data["samples_per_shard"],
                        shuffle=False)
    out = tmp_path / "same"
    report = prepare_dataset(cfg, out)
    again = load_manifest(out)
    assert report.num_samples == {s: manifest.split(s)["num_samples"] for s in SPLITS}
    assert again.classes == ["0", "1", "2"]  # class names are not stored in shards
    for split in SPLITS:
        assert hashes_of(again, split) == hashes_of(manifest, split)
        for shard in manifest.split(split)["shards"]:
            assert (out / shard["file"]).read_bytes() == (shards_dir / shard["file"]).read_bytes()
    # Re-sharding keeps every row in place.
    resharded = prepare_dataset(dataclasses.replace(cfg, samples_per_shard=5), tmp_path / "five")
    assert resharded.num_samples == report.num_samples
    five = load_manifest(tmp_path / "five")
    for split in SPLITS:
        assert hashes_of(five, split) == hashes_of(manifest, split)
        assert {s["stop"] - s["start"] for s in five.split(split)["shards"][:-1]} == {5}


def test_webdataset_source_without_shards_fails(tmp_path) -> None:
    with pytest.raises(SourceError, match="matches no .tar files"):
        prepare_dataset(PrepareConfig(source="webdataset", train=str(tmp_path / "*.tar")), tmp_path / "out")


def test_load_manifest_errors(tmp_path, shards_dir) -> None:
    with pytest.raises(ManifestError, match="cifd prepare"):
        load_manifest(tmp_path)
    data = json.loads((shards_dir / MANIFEST_NAME).read_text())
    data["schema_version"] = 99
    (tmp_path / MANIFEST_NAME).write_text(json.dumps(data))
    with pytest.raises(ManifestError, match="schema_version 99"):
        load_manifest(tmp_path)


def test_per_row_arrays_are_plain_checked_and_small_in_the_manifest(shards_dir, tmp_path) -> None:
    import hashlib
    import shutil

    root = tmp_path / "copy"
    shutil.copytree(shards_dir, root)
    manifest = load_manifest(root)
    n = manifest.split("train")["num_samples"]
    # Independent reference: the hashes are sha256 prefixes of the image bytes in each tar.
    images = [next(v for k, v in s.items() if k == "jpg") for sh in manifest.shard_paths("train")
              for s in iter_tar_samples(sh)]
    assert [hashlib.sha256(im).digest()[:16] for im in images] == [r.tobytes() for r in manifest.sample_hashes("train")]
    assert manifest.sizes("train").shape == (n, 2)
    # The JSON holds no per-row lists: its size does not grow with the number of rows.
    text = (root / MANIFEST_NAME).read_text()
    assert "sample_sha256" in text and len(text) < 4000 + 200 * sum(
        len(manifest.split(s)["shards"]) for s in SPLITS)
    record = manifest.split("train")["rows"]["sizes"]
    path = root / record["file"]
    good = path.read_bytes()
    sizes = np.load(path)
    sizes[0] = [1, 1]
    np.save(path, sizes)  # a changed array: its sha256 no longer matches
    with pytest.raises(ManifestError, match="does not match the sha256"):
        manifest.sizes("train")
    path.write_bytes(good)
    path.unlink()
    with pytest.raises(ManifestError, match="is missing"):
        manifest.sizes("train")
    # An object array never unpickles, even with a matching sha256.
    np.save(path, np.array([{"x": 1}] * n, dtype=object), allow_pickle=True)
    data = json.loads((root / MANIFEST_NAME).read_text())
    data["splits"]["train"]["rows"]["sizes"]["sha256"] = file_sha256(path)
    (root / MANIFEST_NAME).write_text(json.dumps(data))
    with pytest.raises(ManifestError, match="not a plain .npy array"):
        load_manifest(root).sizes("train")


def test_directory_source_equals_the_tar_source(tiny, prepare_config, shards_dir, tmp_path) -> None:
    root = tmp_path / "images"
    for name, data in tiny.members().items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    prepare_dataset(dataclasses.replace(prepare_config, train=str(root)), tmp_path / "out")
    from_dir, from_tar = shard_files(tmp_path / "out"), shard_files(shards_dir)
    assert from_dir.keys() == from_tar.keys()
    assert all(from_dir[k] == from_tar[k] for k in from_dir if k.endswith(".tar"))


def test_explicit_class_order_sets_the_labels(tiny, prepare_config, tmp_path) -> None:
    order = ("frog", "cat", "dog")
    prepare_dataset(dataclasses.replace(prepare_config, classes=order), tmp_path / "out")
    manifest = load_manifest(tmp_path / "out")
    assert manifest.classes == list(order)
    by_hash = {content_hash(data): order.index(name.split("/")[1]) for name, data in tiny.members().items()}
    block = load_split(manifest, "train")
    hashes = hashes_of(manifest, "train")
    assert [by_hash[h] for h in hashes] == block.labels.tolist()
    with pytest.raises(SourceError, match=r"class folders \['frog'\] that are not in prepare.classes"):
        prepare_dataset(dataclasses.replace(prepare_config, classes=("cat", "dog")), tmp_path / "bad")


def test_digits_source_is_grayscale(tmp_path) -> None:
    cfg = PrepareConfig(source="digits", limit_train=30, limit_val=10, samples_per_shard=8)
    report = prepare_dataset(cfg, tmp_path)
    assert report.num_samples == {"train": 30, "val": 10} and report.num_classes == 10
    manifest = load_manifest(tmp_path)
    assert manifest.image_shape == (1, 8, 8)
    block = load_split(manifest, "val", verify_hashes=True)
    assert manifest.mode == "L" and block.stacked().shape == (10, 1, 8, 8) and block.stacked().max() > 0


# Corrupt and odd images ------------------------------------------------------------------

BAD = "train/dog/0003.jpg"
BAD2 = "train/frog/0007.jpg"


def corrupt_variants(tiny) -> dict[str, bytes]:
    good = tiny.members()[BAD]
    return {"garbage": b"\xff\xd8\xff\xe0 this is not a jpeg", "truncated": good[: len(good) // 2]}


@pytest.mark.parametrize("variant", ["garbage", "truncated"])
def test_corrupt_image_fails_naming_the_sample(variant, tiny, make_imagefolder_tar, tmp_path) -> None:
    tar = make_imagefolder_tar(tmp_path / "src.tar", overrides={BAD: corrupt_variants(tiny)[variant]})
    cfg = PrepareConfig(source="imagefolder", train=str(tar), samples_per_shard=4)
    with pytest.raises(CorruptSampleError) as info:
        prepare_dataset(cfg, tmp_path / "out")
    message = str(info.value)
    assert f"src.tar:{BAD}" in message and "cannot decode" in message and "on_corrupt" in message


def test_corrupt_image_is_skipped_and_counted(tiny, make_imagefolder_tar, tmp_path) -> None:
    tar = make_imagefolder_tar(tmp_path / "src.tar", overrides={BAD: b"garbage"})
    cfg = PrepareConfig(source="imagefolder", train=str(tar), samples_per_shard=4, on_corrupt="skip",
                        max_corrupt_fraction=0.2)
    report = prepare_dataset(cfg, tmp_path / "out")
    total = tiny.num_classes * tiny.per_class
    assert sum(report.num_skipped.values()) == 1
    assert sum(report.num_samples.values()) == total - 1
    manifest = load_manifest(tmp_path / "out")
    skipped = [s for split in SPLITS for s in manifest.split(split)["skipped"]]
    assert [s["origin"] for s in skipped] == [f"src.tar:{BAD}"]
    assert "cannot decode" in skipped[0]["error"]
    good = load_split(manifest, "train")  # what was written all decodes
    assert len(good.index) == manifest.split("train")["num_samples"]


def test_too_many_corrupt_images_fail_even_when_skipping(tiny, make_imagefolder_tar, tmp_path) -> None:
    tar = make_imagefolder_tar(tmp_path / "src.tar", overrides={BAD: b"garbage", BAD2: b"junk"})
    cfg = PrepareConfig(source="imagefolder", train=str(tar), samples_per_shard=4, on_corrupt="skip",
                        max_corrupt_fraction=0.01)
    with pytest.raises(CorruptSampleError, match="max_corrupt_fraction"):
        prepare_dataset(cfg, tmp_path / "out")


def test_images_of_any_size_and_mode_are_kept_with_their_sizes(tiny, make_imagefolder_tar, tmp_path) -> None:
    rng = np.random.default_rng(0)
    odd = {  # another size; grey; RGBA (alpha dropped); palette
        BAD: tiny.encode_image((rng.random((10, 17, 3)) * 255).astype(np.uint8), "jpg"),
        BAD2: tiny.encode_image((rng.random((23, 9)) * 255).astype(np.uint8), "jpg"),
    }
    rgba = Image.fromarray((rng.random((31, 12, 4)) * 255).astype(np.uint8), "RGBA")
    pal = Image.fromarray((rng.random((7, 40, 3)) * 255).astype(np.uint8)).convert("P")
    for name, img in (("train/cat/0001.jpg", rgba), ("train/cat/0002.jpg", pal)):  # PIL reads by content
        buffer = io.BytesIO()
        img.save(buffer, format="PNG")
        odd[name] = buffer.getvalue()
    tar = make_imagefolder_tar(tmp_path / "src.tar", overrides=odd)
    report = prepare_dataset(PrepareConfig(source="imagefolder", train=str(tar), samples_per_shard=4), tmp_path / "o")
    assert not report.same_size
    manifest = load_manifest(tmp_path / "o")
    assert manifest.image_shape is None and manifest.mode == "RGB" and manifest.channels == 3
    sizes = {tuple(s) for split in SPLITS for s in manifest.sizes(split).tolist()}
    assert {(10, 17), (23, 9), (31, 12), (7, 40), (tiny.image_size, tiny.image_size)} == sizes
    for split in SPLITS:
        block = load_split(manifest, split, verify_hashes=True)
        assert block.sizes.tolist() == manifest.sizes(split).tolist()
        assert all(image.shape[0] == 3 and image.dtype == np.uint8 for image in block.images)
        if len({image.shape for image in block.images}) > 1:
            with pytest.raises(VariableSizeError, match="distill.data: stream"):
                block.stacked()
    # The same source decoded grey: one channel everywhere.
    prepare_dataset(PrepareConfig(source="imagefolder", train=str(tar), samples_per_shard=4, mode="L"),
                    tmp_path / "grey")
    grey = load_manifest(tmp_path / "grey")
    assert grey.mode == "L" and all(image.shape[0] == 1 for image in load_split(grey, "train").images)


def test_max_side_shrinks_and_records_only_the_large_images(tiny, make_imagefolder_tar, tmp_path) -> None:
    big = tiny.encode_image((np.random.default_rng(1).random((60, 90, 3)) * 255).astype(np.uint8), "jpg")
    tar = make_imagefolder_tar(tmp_path / "src.tar", overrides={BAD: big})
    prepare_dataset(PrepareConfig(source="imagefolder", train=str(tar), samples_per_shard=4, max_side=45, shuffle=False),
                    tmp_path / "o")
    manifest = load_manifest(tmp_path / "o")
    redone = [r for split in SPLITS for r in manifest.split(split)["reencoded"]]
    assert [(r["origin"], r["from"], r["to"]) for r in redone] == [(f"src.tar:{BAD}", [60, 90], [30, 45])]
    split = next(s for s in SPLITS if manifest.split(s)["reencoded"])
    row = manifest.split(split)["reencoded"][0]["row"]
    block = load_split(manifest, split, verify_hashes=True)
    assert block.images[row].shape == (3, 30, 45) and manifest.sizes(split).tolist()[row] == [30, 45]
    assert sum(1 for s in manifest.sizes(split).tolist() if s != [tiny.image_size] * 2) == 1  # the rest untouched


def test_png_source_and_image_outside_a_class_folder(tiny, tmp_path) -> None:
    members = tiny.members(fmt="png", per_class=4)
    tar = tiny.write_tar(tmp_path / "png.tar", members)
    report = prepare_dataset(PrepareConfig(source="imagefolder", train=str(tar), val_fraction=0.25,
                                           samples_per_shard=3), tmp_path / "out")
    assert report.num_samples == {"train": 9, "val": 3}
    loose = tiny.write_tar(tmp_path / "loose.tar", {"0001.png": next(iter(members.values()))})
    with pytest.raises(SourceError, match="class folder"):
        prepare_dataset(PrepareConfig(source="imagefolder", train=str(loose)), tmp_path / "out2")


# Configs ---------------------------------------------------------------------------------


def test_prepare_config_rejects_unknown_keys_naming_them() -> None:
    with pytest.raises(ConfigError) as info:
        PrepareConfig.from_mapping({"source": "digits", "samples_per_shrd": 8}, section="prepare")
    message = str(info.value)
    assert "'prepare'" in message and "samples_per_shrd" in message and "did you mean 'samples_per_shard'" in message


@pytest.mark.parametrize(("data", "field", "rule"), [
    ({"val_fraction": 1.5}, "prepare.val_fraction", "0 < val_fraction < 1"),
    ({"source": "folder"}, "prepare.source", "expected one of"),
    ({"on_corrupt": "ignore"}, "prepare.on_corrupt", "expected one of"),
    ({"samples_per_shard": 0}, "prepare.samples_per_shard", "> 0"),
    ({"samples_per_shard": "8"}, "prepare.samples_per_shard", "expected an integer"),
    ({"samples_per_shard": True}, "prepare.samples_per_shard", "expected an integer"),
    ({"limit_train": -1}, "prepare.limit_train", "null or > 0"),
    ({"max_corrupt_fraction": 2}, "prepare.max_corrupt_fraction", "0 <= x <= 1"),
    ({"source": "imagefolder"}, "prepare.train", "needs a path"),
    ({"train": "x.tar"}, "prepare.train", "must be null"),
    ({"classes": "cat"}, "prepare.classes", "expected"),
])
def test_prepare_config_bad_values_name_the_field(data, field, rule) -> None:
    with pytest.raises(ConfigError) as info:
        PrepareConfig.from_mapping(data, section="prepare")
    message = str(info.value)
    assert f"'{field}'" in message and rule in message


def test_configs_are_frozen_and_round_trip() -> None:
    cfg = PrepareConfig.from_mapping({"source": "imagefolder", "train": "a.tar", "classes": ["b", "a"]},
                                     section="prepare")
    assert cfg.classes == ("b", "a")  # YAML lists become tuples
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.seed = 3  # type: ignore[misc]
    assert PrepareConfig.from_mapping(cfg.to_dict(), section="prepare") == cfg
    embed = EmbedConfig.from_mapping({"policy": {"kind": "pad_crop", "pad": 2}}, section="embed")
    assert embed.policy.kind == "pad_crop" and embed.policy.pad == 2
    assert EmbedConfig.from_mapping(embed.to_dict(), section="embed") == embed


def test_load_stage_reads_a_params_file_and_fails_early(tmp_path) -> None:
    params = tmp_path / "params.yaml"
    params.write_text("paths:\n  shards: s\nprepare:\n  source: digits\n  val_fraction: 0.5\n"
                      "embed:\n  policy:\n    scale: [0.9, 0.1]\nteacher:\n  in_chans: 3\n  preprocess:\n"
                      "    mean: [0.5]\n    std: [0.5]\n")
    paths, cfg = load_stage(params, "prepare", PrepareConfig)
    assert paths.shards == "s" and paths.cache == "cache/teacher.zarr" and cfg.val_fraction == 0.5
    with pytest.raises(ConfigError, match=r"'embed\.policy\.scale' = \(0\.9, 0\.1\)"):
        load_stage(params, "embed", EmbedConfig)
    with pytest.raises(ConfigError, match=r"'teacher\.preprocess\.mean'.*3 values"):
        load_stage(params, "teacher", TeacherConfig)
    params.write_text("paths:\n  shard: s\n")
    with pytest.raises(ConfigError, match="did you mean 'shards'"):
        load_stage(params, "prepare", PrepareConfig)
    params.write_text("- a list\n")
    with pytest.raises(ConfigError, match="mapping of sections"):
        load_stage(params, "prepare", PrepareConfig)
    with pytest.raises(ConfigError, match="not found"):
        load_stage(tmp_path / "missing.yaml", "prepare", PrepareConfig)


def test_project_params_file_loads() -> None:
    root = Path(__file__).resolve().parents[2]
    for stage, cls in STAGES.items():
        load_stage(root / "params.yaml", stage, cls)


def test_sixteen_bit_images_are_scaled_not_clipped() -> None:
    from pipeline.data.shards import decode_image

    ramp = np.linspace(0, 65535, 256).astype(np.uint16)[None].repeat(4, 0)
    buffer = io.BytesIO()
    Image.fromarray(ramp).save(buffer, format="PNG")  # a 16-bit grey PNG (PIL mode I;16)
    grey = decode_image(buffer.getvalue(), mode="L", where="ramp")
    assert grey.shape == (1, 4, 256) and grey[0, 0].tolist() == list(range(256))
    assert decode_image(buffer.getvalue(), mode="RGB", where="ramp")[:, 0, 128].tolist() == [128] * 3


def test_max_side_shrinks_palette_and_cmyk_images_as_the_decoded_image() -> None:
    """A palette image shrinks antialiased (PIL alone would use NEAREST for mode P), and a CMYK
    JPEG stored under a .png name is re-encoded instead of failing prepare."""
    from pipeline.data.shards import decode_image
    from pipeline.data.validate import validate_samples
    from pipeline.data.sources import RawSample

    stripes = np.zeros((64, 64, 3), np.uint8)
    stripes[:, ::2] = 255
    pal, cmyk = io.BytesIO(), io.BytesIO()
    Image.fromarray(stripes).convert("P").save(pal, format="PNG")
    Image.fromarray(stripes).convert("CMYK").save(cmyk, format="JPEG")
    samples = [RawSample(label=0, data=pal.getvalue(), ext="png", origin="pal"),
               RawSample(label=0, data=cmyk.getvalue(), ext="png", origin="cmyk")]
    checked = validate_samples(samples, on_corrupt="error", max_corrupt_fraction=0.0, split="train", mode="RGB",
                               max_side=8)
    assert checked.sizes == [(8, 8), (8, 8)] and [r["origin"] for r in checked.reencoded] == ["pal", "cmyk"]
    assert abs(decode_image(checked.samples[0].image, mode="RGB", where="pal").mean() - 127.5) < 8  # averaged


def test_file_backed_sources_hold_where_the_bytes_are_not_the_bytes(tiny, prepare_config, shards_dir,
                                                                     tmp_path) -> None:
    """Directory, uncompressed-tar and WebDataset sources list each image as a reference (file,
    or offset and size in the tar) read on demand, so prepare's memory does not hold the
    dataset; the bytes read back are the members' bytes, a gzip tar still works (read into
    memory) and gives the same shards, and a file changed after listing is refused."""
    import gzip
    import shutil

    from pipeline.data.sources import ImageRef, imagefolder_source, webdataset_source

    members = tiny.members()
    root = tmp_path / "images"
    for name, data in members.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    tar = Path(prepare_config.train)
    for source in (imagefolder_source(root), imagefolder_source(tar), webdataset_source(str(shards_dir / "train-*.tar"))):
        assert all(isinstance(s.data, ImageRef) for s in source.samples)
    by_origin = {s.origin.split(":", 1)[1]: s for s in imagefolder_source(tar).samples}
    assert {name: by_origin[name].image for name in members} == members  # offsets and sizes are the members'
    gz = tmp_path / "images.tar.gz"
    with open(tar, "rb") as src, gzip.open(gz, "wb") as dst:
        shutil.copyfileobj(src, dst)
    assert all(isinstance(s.data, bytes) for s in imagefolder_source(gz).samples)  # no offsets in a gzip stream
    prepare_dataset(dataclasses.replace(prepare_config, train=str(gz)), tmp_path / "from_gz")
    assert {k: v for k, v in shard_files(tmp_path / "from_gz").items() if k.endswith(".tar")} == \
        {k: v for k, v in shard_files(shards_dir).items() if k.endswith(".tar")}
    listed = imagefolder_source(root).samples[0]
    path = Path(listed.data.path)  # type: ignore[union-attr]
    path.write_bytes(path.read_bytes() + b"\0")
    with pytest.raises(SourceError, match=r"changed while `cifd prepare` was reading it"):
        listed.image
    path.unlink()
    with pytest.raises(SourceError, match=r"cannot be read any more \(No such file or directory\)"):
        listed.image


def test_max_side_images_are_re_encoded_when_written_not_held(tiny, make_imagefolder_tar, tmp_path) -> None:
    """A shrunk image is kept as a recipe (source + max_side), and re-encoding is deterministic:
    reading it twice gives the same bytes, the bytes the shard holds."""
    from pipeline.data.sources import imagefolder_source
    from pipeline.data.validate import Shrunk, validate_samples

    big = tiny.encode_image((np.random.default_rng(1).random((60, 90, 3)) * 255).astype(np.uint8), "jpg")
    tar = make_imagefolder_tar(tmp_path / "src.tar", overrides={BAD: big})
    checked = validate_samples(imagefolder_source(tar).samples, on_corrupt="error", max_corrupt_fraction=0.0,
                               split="train", mode="RGB", max_side=45)
    shrunk = [s for s in checked.samples if isinstance(s.data, Shrunk)]
    assert len(shrunk) == 1 and shrunk[0].image == shrunk[0].image
    assert decode_image(shrunk[0].image, mode="RGB", where="x").shape == (3, 30, 45)
