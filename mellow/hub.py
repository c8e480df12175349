"""Models named by a Hugging Face id (`hf:org/name`) are found in the local HF cache, the way transformers finds
them: downloaded there first when the network is allowed, never when HF_HUB_OFFLINE=1."""

from __future__ import annotations

import os
import re
from pathlib import Path

HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")


def model_folder(location: str, option: str, repo_type: str = "model") -> Path:
    """A local model folder as it is, or the snapshot folder of a Hugging Face id (a model, or a dataset with
    repo_type="dataset") in the HF cache; `option` names the setting in errors."""
    if Path(location).is_dir():
        return Path(location)
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    kind = " --repo-type dataset" if repo_type == "dataset" else ""
    try:
        return Path(snapshot_download(location, repo_type=repo_type, local_files_only=True))
    except LocalEntryNotFoundError:
        if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
            raise ValueError(f"{option} hf:{location}: not in the Hugging Face cache and HF_HUB_OFFLINE is set; "
                             f"run `hf download {location}{kind}` on a machine with network and copy the cache, or "
                             "point hf: at a local folder") from None
    try:
        return Path(snapshot_download(location, repo_type=repo_type))
    except Exception as error:  # no network, no such repo, gated: say which, and the way around it
        raise ValueError(f"{option} hf:{location}: could not download it ({type(error).__name__}: {error}); "
                         "point hf: at a local folder that holds "
                         + ("the dataset's files" if kind else "config.json and the weights")) from None

