"""The presets and every experiment of studies/cifar10.sh pass the stage schemas.

A typo in an ``-S key=value`` override would otherwise surface only after an hour of
compute, when DVC (or the stage) meets the unknown key.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

from schemas import config as C

ROOT = Path(__file__).resolve().parents[2]
STAGES = {"prepare": C.PrepareConfig, "teacher": C.TeacherConfig, "embed": C.EmbedConfig,
          "rdm": C.RdmConfig, "distill": C.DistillConfig, "evaluate": C.EvaluateConfig}


def _validate(params: dict[str, Any]) -> None:
    C.Paths.from_mapping(params.get("paths"), section="paths")
    for section, cls in STAGES.items():
        cls.from_mapping(params.get(section), section=section)


def _overrides(script: str) -> list[list[tuple[str, Any]]]:
    """The ``-S key=value`` sets of each ``exp NAME ...`` call (line continuations joined)."""
    text = script.replace("\\\n", " ")
    arrays = dict(re.findall(r"(\w+)=\((.*?)\)", text))  # e.g. only_cifd=(-S ... -S ...)
    calls = []
    for line in text.splitlines():
        start = line.find('exp "')  # `exp "main-s$s" ...`, alone or after `do`
        if start < 0:
            continue
        words = shlex.split(line[start:].split("; done")[0], comments=True)
        expanded: list[str] = []
        for word in words[2:]:
            match = re.fullmatch(r"\$\{(\w+)\[@\]\}", word)
            expanded.extend(shlex.split(arrays[match.group(1)]) if match else [word])
        sets = [expanded[i + 1] for i, w in enumerate(expanded) if w == "-S"]
        calls.append([(s.split("=", 1)[0], yaml.safe_load(re.sub(r"\$(s|2)\b", "0", s.split("=", 1)[1])))
                      for s in sets])
    return calls


@pytest.mark.parametrize("preset", ["cifar10.yaml", "cifar10_takd.yaml", "cifar10_gpu.yaml", "cifar10_mobilenet.yaml"])
def test_presets_pass_every_stage_schema(preset: str) -> None:
    _validate(yaml.safe_load((ROOT / "presets" / preset).read_text()))


def test_every_study_experiment_passes_the_schemas() -> None:
    preset = yaml.safe_load((ROOT / "presets" / "cifar10.yaml").read_text())
    calls = _overrides((ROOT / "studies" / "cifar10.sh").read_text())
    assert len(calls) >= 6  # main, three ablations, timm, assistant
    assert any(key == "++distill.ibm" for sets in calls for key, _ in sets)
    for sets in calls:
        params = yaml.safe_load(yaml.safe_dump(preset))
        for key, value in sets:
            # DVC's -S replaces only keys the params file has; ++ adds one or replaces it.
            adds = key.startswith("++")
            section, *parents, field = key.removeprefix("++").split(".")
            assert section in params and field, f"override {key} names no params section"
            node = params[section]
            for part in parents:  # nested keys, e.g. distill.optim.grad_clip
                assert adds or part in node, f"-S {key}: the preset has no '{part}' in '{section}'"
                node = node.setdefault(part, {})
            assert adds or field in node, (
                f"-S {key}: the preset has no '{field}' in '{section}', so DVC refuses the override; "
                f"write -S '++{key}=...'")
            node[field] = value
        _validate(params)
