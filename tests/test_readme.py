"""The README is the front door: its offline commands run as written, and it documents every flag."""

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from storyseek.cli import build_parser
from storyseek.demo import UNTRAINED

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
BIN = Path(sys.executable).parent  # the `storyseek` console script of this environment


def tagged_block(tag: str) -> str:
    """The ```bash block right after `<!-- readme-test: TAG -->`."""
    m = re.search(rf"<!-- readme-test: {tag} -->\s*```bash\n(.*?)```", README, re.S)
    assert m, f"README has no bash block tagged readme-test: {tag}"
    return m.group(1)


def run_bash(script: str, cwd: Path, **env) -> subprocess.CompletedProcess:
    environ = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", **env}
    return subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=cwd, env=environ,
                          capture_output=True, text=True, timeout=600)


def flag_tables() -> str:
    """The README's "Commands and flags" tables, generated from the argument parser itself."""
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    helps = {c.dest: c.help for c in sub._choices_actions}
    out = []
    for name, p in sub.choices.items():
        out += [f"#### `storyseek {name}`", "", p.description or helps[name], "", "| flag | meaning |", "|---|---|"]
        for a in p._actions:
            if isinstance(a, argparse._HelpAction):
                continue
            flags = " / ".join(f"`{o}`" for o in a.option_strings) or f"`{a.metavar or a.dest.upper()}`"
            text = (a.help or "").replace("|", "\\|")
            if a.choices and a.option_strings:
                text += f" (one of: {', '.join(map(str, a.choices))})"
            out.append(f"| {flags} | {text} |")
        out.append("")
    return "\n".join(out)


def readme_flags_section(text: str) -> str:
    start = text.index("#### `storyseek ")
    return text[start : text.index("## Model presets")]


def test_readme_flag_tables_match_the_cli():
    """Regenerate with: python tests/test_readme.py --write"""
    assert readme_flags_section(README).strip() == flag_tables().strip()


@pytest.mark.slow
def test_demo_block_runs_and_prints_stories(tmp_path):
    block = tagged_block("demo")
    assert block.strip() == "storyseek demo"
    # 0.8 minutes: ~70 iterations on a 2-core CPU shared with another process (0.4 gave 36, too few
    # for text: the demo then says so, UNTRAINED), ~200 on a quiet one. Even at 195 iterations one
    # prompt's first sampled token was once <|endoftext|> (45% likely there at that stage): the demo
    # says so (UNTRAINED) and the other prompt still got a story.
    r = run_bash(block, tmp_path, STORYSEEK_DEMO_MINUTES="0.8", STORYSEEK_DEMO_STORIES="1500")
    assert r.returncode == 0, r.stderr[-2000:]
    stories = re.findall(r">>> .*?\n\n(.+?)\n\n", r.stdout, re.S)
    assert len(stories) == 2 and all(s.strip() for s in stories), r.stdout[-2000:]
    assert any(s != UNTRAINED and re.search(r"\b(was|the|a)\b", s) for s in stories), r.stdout[-2000:]
    out = tmp_path / "demo-run"
    for name in ("training_log.csv", "training_metrics.png", "final_model.pt", "data/train.bin"):
        assert (out / name).exists(), name
    assert "storyseek generate --model demo-run/" in r.stdout  # the commands to continue


@pytest.mark.slow
def test_workflow_block_runs_offline_with_the_builtin_corpus(tmp_path):
    """The README says the workflow works offline with the first command swapped for the builtin
    corpus; run exactly that, with the training sizes shrunk."""
    block = tagged_block("workflow")
    offline = "storyseek prepare --dataset builtin --tokenizer bpe:4096"
    assert offline in README
    script = block.replace("storyseek prepare --out data/stories",
                           f"{offline} --max-docs 1500 --out data/stories")
    small = " --preset tiny --max-iters 4 --eval-interval 2 --eval-iters 1 --batch-size 2 --block-size 64"
    script = re.sub(r"(storyseek train [^\n]*)", rf"\1{small}", script)
    script = script.replace('--prompt "', '--max-tokens 8 --prompt "')
    assert script.count(small) == 1 and "--max-tokens 8" in script
    r = run_bash(script, tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "out/stories/training_metrics.png").exists()
    assert (tmp_path / "out/stories-hf/config.json").exists()
    assert (tmp_path / "out/stories-q8_0.gguf").stat().st_size > 0
    assert "iteration,train_loss,val_loss" in (tmp_path / "out/stories/training_log.csv").read_text()


if __name__ == "__main__" and sys.argv[1:] == ["--write"]:
    section = readme_flags_section(README)
    (ROOT / "README.md").write_text(README.replace(section, flag_tables().strip() + "\n\n"), encoding="utf-8")
