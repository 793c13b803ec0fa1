"""The Hugging Face Hub: model repos through its cache (offline-aware), and publishing a model directory."""

from __future__ import annotations

import os
from pathlib import Path

from huggingface_hub import constants, snapshot_download
from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

from regproxy_cli.errors import RegproxyError
from regproxy_cli.io.checkpoint import CONFIG_NAME, WEIGHTS_NAME, load_pretrained


def hub_snapshot(repo_id: str) -> Path:
    """The local folder of a Hub model repo (downloaded into, or found in, the Hugging Face cache)."""
    try:
        return Path(snapshot_download(repo_id, allow_patterns=[CONFIG_NAME, WEIGHTS_NAME, "README.md"]))
    except LocalEntryNotFoundError:
        raise RegproxyError(
            f"{repo_id} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and the Hub is offline or "
            f"unreachable: on a connected machine run `hf download {repo_id}` and copy that cache folder here"
        ) from None
    except RepositoryNotFoundError:
        raise RegproxyError(f"no model {repo_id} on the Hugging Face Hub (or it is private: log in)") from None
    except HfHubHTTPError as exc:
        raise RegproxyError(f"cannot download {repo_id} from the Hugging Face Hub: {exc}") from None


def push_to_hub(directory: str | os.PathLike, repo_id: str, *, private: bool = False, token: str | None = None) -> str:
    """Upload a saved model directory to the Hugging Face Hub; returns the commit URL."""
    from huggingface_hub import HfApi

    directory = Path(directory)
    load_pretrained(directory)  # refuse to publish something that does not load
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    info = api.upload_folder(folder_path=str(directory), repo_id=repo_id, commit_message="Upload regproxy model")
    return str(info)
