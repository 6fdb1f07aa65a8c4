"""Settings: config files (TOML, YAML, JSON), flags and help built from the config dataclasses,
environment variables read only by the command that uses them.

Torch-free, so it also runs on the lowest supported Python without the heavy dependencies:
    PYTHONPATH=src python3.10 -m pytest --noconftest tests/test_config.py   (needs tomli, pyyaml)
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import sys

import pytest

from storyseek.cli import build_parser, main
from storyseek.demo import DemoConfig
from storyseek.errors import StoryseekError
from storyseek.generate.config import GenerateConfig, SamplingConfig
from storyseek.settings import flag_name, with_env
from storyseek.train.config import TRAIN_PRESETS, TrainConfig, build_train_config


def test_config_file_and_flags_precedence(tmp_path):
    toml = tmp_path / "c.toml"  # Python 3.10: read by tomli, 3.11+: by tomllib
    toml.write_text('preset = "tiny"\nbatch-size = 7\nmax_iters = 99\nn_layer = 3\nmulti_token = 1\n')
    cfg = build_train_config({"batch_size": 5}, toml)
    assert (cfg.batch_size, cfg.max_iters, cfg.learning_rate) == (5, 99, 4e-3)  # flag > file > tiny preset
    assert cfg.model == {"n_layer": 3, "mtp_depth": 0}
    yaml = tmp_path / "c.yaml"
    yaml.write_text("moe_experts: 8\ndtype: float32\n")
    cfg = build_train_config({}, yaml)
    assert cfg.model == {"n_routed_experts": 8} and cfg.dtype == "float32" and cfg.batch_size == 12
    js = tmp_path / "c.json"
    js.write_text(json.dumps({"eval-interval": 5, "n_embd": 64}))
    cfg = build_train_config({}, js)
    assert cfg.eval_interval == 5 and cfg.model == {"n_embd": 64}
    (tmp_path / "bad.toml").write_text("batch_sise = 3\n")
    with pytest.raises(StoryseekError, match="unknown setting 'batch_sise'"):
        build_train_config({}, tmp_path / "bad.toml")
    (tmp_path / "broken.toml").write_text("batch_size = = 3\n")
    with pytest.raises(StoryseekError, match=r"config file .*broken.toml: .*line 1"):
        build_train_config({}, tmp_path / "broken.toml")
    with pytest.raises(StoryseekError, match="unknown --dtype"):
        TrainConfig(dtype="int8")


def _help(command: str) -> dict[str, str]:
    """--flag -> its help text, from the parser itself."""
    sub = next(a for a in build_parser()._actions if a.dest == "command").choices[command]
    return {opt: a.help for a in sub._actions for opt in a.option_strings}


@pytest.mark.parametrize("cls", [GenerateConfig, SamplingConfig])
def test_generate_flags_and_defaults_come_from_the_dataclasses(cls):
    helps = _help("generate")
    for f in dataclasses.fields(cls):
        if not f.metadata.get("help"):
            continue
        text = helps[f"--{flag_name(f)}"]
        assert text.startswith(f.metadata["help"])
        if isinstance(f.default, (int, float)) and not isinstance(f.default, bool):
            assert f"(default: {f.default})" in text, (f.name, text)


def test_train_help_shows_each_preset_default_from_the_presets():
    helps = _help("train")
    for f in dataclasses.fields(TrainConfig):
        tiny = TRAIN_PRESETS["tiny"].get(f.name)
        if f.metadata.get("help") and tiny is not None:
            assert re.search(rf"\(default: {re.escape(str(f.default))}; tiny: {re.escape(str(tiny))}\)",
                             helps[f"--{flag_name(f)}"]), f.name
    assert "tiny: 1000" in helps["--checkpoint-interval"]  # once said "default 2500" only
    assert "JSON" in helps["--config"] and "TOML" in helps["--config"]
    assert "(default: 2; tiny" not in helps["--multi-token"] and "(default: 2)" in helps["--multi-token"]


def test_verbose_help_says_the_summary_prints_without_it_under_speculative_decoding():
    assert "without it whenever MTP speculative decoding runs" in _help("generate")["--verbose"]


def test_a_command_gets_only_what_the_user_typed(monkeypatch):
    pytest.importorskip("torch", reason="the generate command's module imports torch")
    seen = {}
    monkeypatch.setattr("storyseek.generate.text.generate_command",
                        lambda model, prompts, cfg, **kw: seen.update(model=model, prompts=prompts, cfg=cfg, kw=kw),
                        raising=False)
    assert main(["generate", "--model", "m.pt", "--top-k", "5", "--no-cache", "--no-speculative"]) == 0
    assert seen["cfg"] == GenerateConfig(sampling=SamplingConfig(top_k=5), use_cache=False, speculative=False)
    assert seen["prompts"] == [""] and seen["kw"] == {}  # device/dtype/stream/verbose: the function's defaults


def test_environment_variables_bother_only_the_command_that_reads_them(monkeypatch, tmp_path, capsys):
    pytest.importorskip("torch", reason="storyseek info counts parameters with torch")
    monkeypatch.setenv("STORYSEEK_DEMO_MINUTES", "abc")
    assert main(["info", "--preset", "tiny"]) == 0
    assert "n_layer" in capsys.readouterr().out
    assert main(["demo", "--out", str(tmp_path / "demo")]) == 1
    err = capsys.readouterr().err
    assert err == "storyseek: error: $STORYSEEK_DEMO_MINUTES must be a number, got 'abc'\n"
    assert not (tmp_path / "demo").exists()
    monkeypatch.setenv("STORYSEEK_DEMO_STORIES", "500")
    monkeypatch.setenv("STORYSEEK_DEMO_MINUTES", "0.5")
    assert DemoConfig(**with_env(DemoConfig, {"minutes": 2.0}, os.environ)) == DemoConfig(minutes=2.0, stories=500)


def test_this_file_runs_on_the_lowest_supported_python():
    """pyproject says >=3.10; tomllib is 3.11+, so 3.10 needs the tomli dependency."""
    if sys.version_info < (3, 11):
        import tomli  # noqa: F401  (the conditional dependency is installed)
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    assert 'requires-python = ">=3.10"' in text and "tomli>=1.1; python_version < '3.11'" in text
