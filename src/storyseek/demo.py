"""`storyseek demo`: the whole pipeline in one command, offline, in about five minutes on a laptop CPU.

    embedded story corpus -> byte-level BPE -> train the `tiny` preset (MLA + MoE + MTP)
    -> training_log.csv + training_metrics.png + checkpoints -> two stories -> what to run next
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from .data.prepare import PrepareConfig, prepare
from .errors import StoryseekError
from .settings import setting

# What a model trained too briefly writes (a slow or busy machine, a small --minutes): only blank lines.
UNTRAINED = "(no story yet: the model wrote only blank lines; it needs more training, e.g. --minutes 4)"

PROMPTS = (  # phrased like the corpus's own prompts, which is what a 4-minute model can follow
    "Write a children's story about a shy little rabbit who learns that everyone needs a friend.",
    "Write a children's story about a clever little fox who learns that it is okay to ask for help.",
)


@dataclass
class DemoConfig:
    out: str = setting("demo-run", "output directory", metavar="DIR")
    minutes: float = setting(4.0, "training time budget in minutes", env="STORYSEEK_DEMO_MINUTES")
    stories: int = setting(20_000, "stories drawn from the embedded corpus", env="STORYSEEK_DEMO_STORIES")
    vocab: int = 2048  # trained byte-level BPE size: small, so the embedding does not dominate
    device: str = setting("auto", "auto (cuda, then mps, then cpu), cpu, cuda, ...")
    seed: int = setting(1337, "random seed")
    force: bool = setting(False, "start over if --out holds an earlier demo run")

    def __post_init__(self) -> None:
        if not self.minutes > 0:
            raise StoryseekError(f"--minutes must be positive, got {self.minutes}")
        if self.stories < 100:
            raise StoryseekError(f"--stories must be at least 100, got {self.stories}")


def run_demo(cfg: DemoConfig) -> Path:
    from .generate.decode import GenerateConfig
    from .generate.load import load_model
    from .generate.sampling import SamplingConfig
    from .generate.text import generate
    from .train.config import build_train_config
    from .train.loop import train

    out = Path(cfg.out)
    if (out / "latest.pt").exists():
        if not cfg.force:
            raise StoryseekError(f"{out} already holds a demo run: remove it, add --force to start over, or choose another --out")
        for old in [*out.glob("*.pt"), out / "training_log.csv", out / "training_metrics.png"]:
            old.unlink(missing_ok=True)
    started = time.time()
    _step(1, "prepare the embedded story corpus (no network needed)")
    data = prepare(PrepareConfig(dataset="builtin", max_docs=cfg.stories, tokenizer=f"bpe:{cfg.vocab}",
                                 out=str(out / "data")))

    _step(2, f"train the tiny preset (MLA + MoE + MTP) for about {cfg.minutes:g} minutes")
    # Short, frequent evaluations: a curve worth plotting for ~1% of the time budget. Never compiled:
    # in a run of minutes the compiling (up to a minute) would take a large share of the budget.
    train(build_train_config(dict(data=str(data), out=str(out), preset="tiny", max_minutes=cfg.minutes,
                                  eval_interval=50, eval_iters=4, device=cfg.device, seed=cfg.seed, compile=False)))

    _step(3, "write two stories")
    best = out / "best_model.pt"
    model, tokenizer = load_model(best if best.exists() else out / "final_model.pt", device=cfg.device)
    gen = GenerateConfig(max_tokens=300, seed=cfg.seed, sampling=SamplingConfig(temperature=0.4, top_p=0.9))
    result = generate(model, tokenizer, list(PROMPTS), gen)
    for prompt, story in zip(PROMPTS, result.texts):
        print(f"\n>>> {prompt}\n\n{story.strip() or UNTRAINED}\n")

    minutes = (time.time() - started) / 60
    print(f"demo finished in {minutes:.1f} minutes; everything is in {out}/")
    print(NEXT_STEPS.format(out=out, data=data))
    return out


NEXT_STEPS = """
What next:
  # more stories (--temperature, --top-p, --num-samples, --verbose for speed and MTP acceptance)
  storyseek generate --model {out}/best_model.pt --prompt "Write a children's story about a brave little fox who learns to be brave for a friend."
  # train longer: names stay consistent and stories follow their prompt better
  storyseek train --data {data} --preset tiny --out {out} --resume --max-iters 4000
  storyseek plot {out}/training_log.csv
  # the transformers DeepseekV3 format
  storyseek export --model {out}/best_model.pt --out {out}/hf
  # the real thing (network, a GPU): the default preset on the Children-Stories-Collection
  storyseek prepare --out data/stories
  storyseek train --data data/stories --out out/stories
"""


def _step(n: int, what: str) -> None:
    print(f"\n[{n}/3] {what}", flush=True)
