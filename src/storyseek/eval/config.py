"""What `storyseek eval` is asked to do. Torch-free: its flags, help and defaults are built from these
fields (see settings.py); the sampling flags of the story checks are generate's `SamplingConfig`."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import StoryseekError
from ..settings import setting

_SOURCES = "what to score (any of)"
_SCORING = "scoring"
_STORIES = "story checks"


@dataclass
class EvalConfig:
    model: str = ""  # checkpoint file or exported directory (a required flag of its own)
    data: str | None = setting(None, "prepared data directory: its validation split", metavar="DIR", group=_SOURCES)
    files: tuple[str, ...] = setting((), "local .jsonl/.json/.csv/.parquet/.txt files or globs, one source per "
                                         "file, made into documents as `prepare` does", metavar="PATH",
                                     default_text="", group=_SOURCES)
    dataset: str | None = setting(None, "Hugging Face dataset (or a local dataset folder), streamed", metavar="NAME",
                                  group=_SOURCES)
    dataset_config: str | None = setting(None, "--dataset configuration (subset)", flag="config", metavar="NAME",
                                         group=_SOURCES)
    split: str = setting("validation", "--dataset split", group=_SOURCES)
    format: str = setting("story", "--files/--dataset records: story template or plain text",
                          choices=("story", "text"), group=_SOURCES)
    prompt_column: str = setting("prompt", "column holding the prompt", group=_SOURCES)
    text_column: str = setting("text", "column holding the story/text", group=_SOURCES)
    max_docs: int | None = setting(None, "score only the first N documents of each source", default_text="all",
                                   group=_SOURCES)
    stride: int | None = setting(None, "sliding-window step for documents longer than the context: every token "
                                       "keeps at least context - stride tokens before it",
                                 default_text="half the context", group=_SCORING)
    batch_size: int = setting(8, "windows (and stories) per forward pass", group=_SCORING)
    device: str = setting("auto", "auto (cuda, then mps, then cpu), cpu, cuda, cuda:1, mps", group=_SCORING)
    dtype: str = setting("auto", "weights dtype (auto: bfloat16 on GPUs; on a CPU where measured faster)",
                         choices=("auto", "float32", "bfloat16"), group=_SCORING)
    as_json: bool = setting(False, "print one JSON object instead of the table", flag="json", group=_SCORING)
    stories: int = setting(0, "sample N stories and report the story checks", group=_STORIES)
    prompts: str | None = setting(None, "prompts for --stories: a .txt file (one per line) or a data file's prompt "
                                        "column", metavar="FILE", default_text="the scored story documents' prompts",
                                  group=_STORIES)
    max_tokens: int = setting(300, "new tokens per story at most", group=_STORIES)
    seed: int = setting(1337, "random seed of the stories", group=_STORIES)

    def __post_init__(self) -> None:
        if not (self.data or self.files or self.dataset or self.stories):
            raise StoryseekError("nothing to evaluate: give --data DIR, --files PATH, --dataset NAME and/or --stories N")
        for name in ("batch_size", "max_tokens"):
            if getattr(self, name) < 1:
                raise StoryseekError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        for name in ("stride", "max_docs"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise StoryseekError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.stories < 0:
            raise StoryseekError(f"--stories must be >= 0, got {self.stories}")
        if self.format not in ("story", "text"):
            raise StoryseekError(f"--format must be story or text, got {self.format!r}")
