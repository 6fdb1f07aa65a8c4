"""`--push-to-hub USER/NAME`: upload an exported directory with `huggingface_hub`.

The token comes from the environment (HF_TOKEN) or the user's login (`hf auth login`); it is
handed to huggingface_hub and never printed. Hub errors are re-raised as one line that names the
repository and the HTTP status, never the token.
"""

from __future__ import annotations

import re
from pathlib import Path

from ..errors import StoryseekError

_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")


def check_can_push(repo_id: str) -> None:
    """Fail before exporting: a malformed repo id, or no token to push with."""
    import huggingface_hub

    if not _REPO_ID.fullmatch(repo_id) or ".." in repo_id or len(repo_id) > 96:
        raise StoryseekError(f"--push-to-hub {repo_id!r}: expected USER/NAME (letters, digits, '-', '_', '.')")
    if not huggingface_hub.get_token():
        raise StoryseekError("--push-to-hub: no Hugging Face token; run `hf auth login` or set HF_TOKEN")


def push_folder(folder: str | Path, repo_id: str, private: bool = False) -> str:
    """Create the model repository if needed and upload `folder` as one commit. Returns the repo URL."""
    import huggingface_hub

    api = huggingface_hub.HfApi()
    try:
        url = api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        api.upload_folder(repo_id=repo_id, repo_type="model", folder_path=str(folder),
                          commit_message="Upload storyseek model (storyseek export)")
    except Exception as e:  # HTTP, auth and network errors all end up here
        status = getattr(getattr(e, "response", None), "status_code", None)
        why = f"HTTP {status}" if status else type(e).__name__
        hint = "; check your token's write access (hf auth login)" if status in (401, 403) else ""
        raise StoryseekError(f"push to {repo_id} failed ({why}){hint}; the export in {folder} is complete") from None
    return str(url)
