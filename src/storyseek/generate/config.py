"""What generation is asked to do: `SamplingConfig` (how a token is chosen) and `GenerateConfig` (how
many, from which prompts, by which decoding path). Torch-free: `storyseek generate`'s flags, their help
and defaults are built from these fields (see settings.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import StoryseekError
from ..settings import setting


# Story mode: the model writes the rest of the header (a character line) before <|story|>. One that
# writes this many tokens without it is not following the template (a model trained on plain text):
# its text counts as begun, so it may end again (generate/sampling.py).
HEADER_TOKENS = 64


@dataclass
class SamplingConfig:
    """Processing order follows transformers' / llama2.c's: the end held back before min_tokens,
    repetition penalty, temperature, top-k, top-p."""

    temperature: float = setting(0.8, "sampling temperature; 0 = greedy")
    top_k: int = setting(0, "sample among the k most likely tokens; 0 = off")
    top_p: float = setting(0.9, "nucleus sampling: the smallest set of tokens whose probability reaches this, "
                                "in (0, 1]; 1 = off")
    # CTRL (Keskar et al. 2019): divide the positive logits of tokens already in the text (multiply the negative)
    repetition_penalty: float = setting(1.0, "> 1 discourages repeating tokens already in the text; 1 = off")
    # transformers' min_new_tokens, vLLM's min_tokens: a barely trained model often ends at once
    min_tokens: int = setting(1, "new tokens a text has before it may end (before them the end token, and in story "
                                 "mode <|prompt|>, are never chosen; in story mode they count from the <|story|> "
                                 f"marker, before which (for up to {HEADER_TOKENS} header tokens) the text cannot end): "
                                 "1 = never an empty story; 0 = off")

    def __post_init__(self) -> None:
        if not self.temperature >= 0:  # also rejects NaN
            raise StoryseekError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k < 0:
            raise StoryseekError(f"top-k must be >= 0 (0 = off), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise StoryseekError(f"top-p must be in (0, 1], got {self.top_p}")
        if not self.repetition_penalty > 0:
            raise StoryseekError(f"repetition penalty must be > 0 (1 = off), got {self.repetition_penalty}")
        if self.min_tokens < 0:
            raise StoryseekError(f"min-tokens must be >= 0 (0 = off), got {self.min_tokens}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


@dataclass
class GenerateConfig:
    max_tokens: int = setting(200, "new tokens per story at most")
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    seed: int | None = setting(None, "random seed for reproducible samples", default_text="random")
    num_samples: int = setting(1, "stories per prompt, decoded together as one batch")
    speculative: bool | None = setting(None, "MTP self-speculative decoding",
                                       default_text="auto: with MTP weights, the first steps time both paths "
                                                    "and the faster one is kept, and remembered for this model "
                                                    "on this machine")
    use_cache: bool = setting(True, "keep the latent KV cache between tokens; --no-cache recomputes the whole "
                                    "window every token (the slow reference path)", flag="cache")
    raw: bool = setting(False, "continue the prompt as plain text instead of placing it in the story template")
    compile: bool = setting(False, "compile the decode step with torch.compile: once per process (7-12 s on a 2-core "
                                   "CPU with torch's compile cache warm, 20-40 s the first time), then faster steps "
                                   "(1.2-2.3x for the demo's model there; on a GPU inside the CUDA graphs, 1.2x); pays "
                                   "off for long outputs")
    cuda_graphs: bool = setting(True, "on a CUDA GPU, replay each decode step as a CUDA graph, recorded when the step "
                                      "first runs: one launch instead of ~1,000 small kernels per token")

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise StoryseekError(f"max-tokens must be >= 1, got {self.max_tokens}")
        if self.num_samples < 1:
            raise StoryseekError(f"num-samples must be >= 1, got {self.num_samples}")
        if self.speculative and not self.use_cache:
            raise StoryseekError("speculative decoding needs the cache; drop --no-cache or add --no-speculative")
        if self.compile and not self.use_cache:
            raise StoryseekError("--compile compiles the cached decode step; drop --no-cache or --compile")

    def use_speculative(self, model) -> bool:
        """Whether `model` (a Transformer) starts decoding speculatively under this config (auto
        starts so, then keeps whichever path measures faster: see generate/decode.py)."""
        has_mtp = model.cfg.mtp_depth >= 1
        if self.speculative and not has_mtp:
            raise StoryseekError("this model has no MTP module, so it cannot draft tokens; use --no-speculative")
        return has_mtp and self.use_cache if self.speculative is None else self.speculative
