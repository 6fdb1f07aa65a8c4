"""`storyseek serve`'s settings (torch- and web-free: the CLI builds its flags from these fields)."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import StoryseekError
from ..settings import setting


@dataclass
class ServeConfig:
    model: str = ""  # checkpoint file or exported directory (a required flag of its own)
    host: str = setting("127.0.0.1", "address to listen on; 0.0.0.0 for every interface")
    port: int = setting(8000, "port to listen on; 0 picks a free one")
    device: str = setting("auto", "auto, cpu, cuda, cuda:1, ...")
    dtype: str = setting("auto", "weights and cache dtype; auto = bfloat16 on GPUs that support it, else float32",
                         choices=("auto", "float32", "bfloat16"))
    threads: int | None = setting(None, "CPU threads torch may use (1 is fastest for tiny models on a busy machine)",
                                  default_text="torch's default, one per core")
    compile: bool = setting(False, "compile the decode step with torch.compile at startup, for every batch size up "
                                   "to --max-batch (8 s for the tiny preset at --max-batch 8 on a 2-core CPU with "
                                   "torch's compile cache warm, longer the first time), then faster steps; on a small "
                                   "CPU the HTTP work around them can take the gain (benchmarks/bench_serve.py --compile)")
    cuda_graphs: bool = setting(True, "on a CUDA GPU, replay the decode step as a CUDA graph, one recorded per "
                                      "batch size at its first step")
    max_batch: int = setting(16, "sequences decoded together; a request with n choices takes n")
    max_tokens: int = setting(512, "new tokens per choice at most, and what a request that names none gets")
    max_prompt_chars: int = setting(1000, "longer prompts are answered 413")
    max_queue: int = setting(64, "requests waiting for a free slot; more are answered 429")
    api_key: str | None = setting(None, "require 'Authorization: Bearer KEY' on /v1 (the page asks for it)",
                                  env="STORYSEEK_API_KEY", default_text="no key")
    model_name: str = setting("storyseek", "the model id in /v1/models and in responses")

    def __post_init__(self) -> None:
        for name in ("max_batch", "max_tokens", "max_prompt_chars"):
            if getattr(self, name) < 1:
                raise StoryseekError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.max_queue < 0:
            raise StoryseekError(f"--max-queue must be >= 0, got {self.max_queue}")
        if self.threads is not None and self.threads < 1:
            raise StoryseekError(f"--threads must be >= 1, got {self.threads}")
        if not 0 <= self.port <= 65535:
            raise StoryseekError(f"--port must be in 0..65535, got {self.port}")
