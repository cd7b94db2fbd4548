"""The upload: ``huggingface_hub``'s ``create_repo`` + ``upload_folder``, every failure one line.

The token comes from where huggingface_hub looks (``HF_TOKEN``, ``huggingface-cli login``). No network,
no token, a repository owned by someone else, ``HF_HUB_OFFLINE=1``: each becomes a UserError naming
the repository and the reason, and the assembled folder stays for a retry (``sdxl publish`` again).
"""

from __future__ import annotations

from pathlib import Path

from sdxl_trainer import console
from sdxl_trainer.errors import UserError


def _reason(e: Exception) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def upload(folder: Path, repo_id: str, *, private: bool = False, message: str = "Upload with sdxl-trainer") -> str:
    """Create ``repo_id`` (if needed) and upload ``folder``; returns the repository URL."""
    from huggingface_hub import HfApi

    api = HfApi()
    retry = f"the folder is ready at {folder}: fix that and run `sdxl publish` again to retry"
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        console.info(f"uploading {folder} → {url}")
        api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model", commit_message=message)
    except Exception as e:  # huggingface_hub's HTTP/offline/auth errors, requests' and the OS's network errors
        raise UserError(f"upload to {repo_id} failed ({type(e).__name__}: {_reason(e)})", where=str(folder),
                        fix=f"check the network and the token (HF_TOKEN or `huggingface-cli login`); {retry}") from e  # fmt: skip
    return str(url)
