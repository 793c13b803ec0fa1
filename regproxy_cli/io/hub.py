"""The Hugging Face Hub: model repos through its cache (offline-aware), and publishing a model directory."""

from __future__ import annotations

import os
from pathlib import Path

from huggingface_hub import constants, snapshot_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from regproxy_cli.errors import RegproxyError, one_line
from regproxy_cli.io.checkpoint import CONFIG_NAME, WEIGHTS_NAME, load_pretrained


class HubModelMissing(RegproxyError):
    """The Hub has no such repo, revision or file, or it is offline or unreachable and the cache lacks it.

    Unlike any other Hub error (auth, server error, a corrupt download), this one lets a caller try another source.
    """


def hub_snapshot(repo_id: str, revision: str | None = None) -> Path:
    """The local folder of a Hub model repo at ``revision`` (a tag, branch or commit; None = main), downloaded
    into, or found in, the Hugging Face cache.

    Raises:
        HubModelMissing: the repo, revision or model files are not there (or offline/unreachable, not cached).
        RegproxyError: any other failure.
    """
    at = f" (revision {revision})" if revision else ""
    fetch = f"hf download {repo_id}" + (f" --revision {revision}" if revision else "")
    try:
        folder = Path(snapshot_download(repo_id, revision=revision,
                                        allow_patterns=[CONFIG_NAME, WEIGHTS_NAME, "README.md"]))
    except GatedRepoError:  # a RepositoryNotFoundError subclass, but the repo is there: access is the problem
        raise RegproxyError(f"{repo_id} on the Hugging Face Hub is gated: request access on its page and log in "
                            f"(`hf auth login`)") from None
    except (LocalEntryNotFoundError, OfflineModeIsEnabled):
        raise HubModelMissing(
            f"{repo_id}{at} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and the Hub is offline or "
            f"unreachable: on a connected machine run `{fetch}` and copy that cache folder here"
        ) from None
    except RevisionNotFoundError:
        raise HubModelMissing(f"{repo_id} on the Hugging Face Hub has no revision {revision}") from None
    except RepositoryNotFoundError:
        raise HubModelMissing(f"no model {repo_id} on the Hugging Face Hub (or it is private: log in)") from None
    except EntryNotFoundError:
        raise HubModelMissing(f"{repo_id}{at} on the Hugging Face Hub lacks a file it lists") from None
    except HfHubHTTPError as exc:
        status = getattr(getattr(exc, "response", None), "status_code", None)
        advice = "check your login (`hf auth login`)" if status in (401, 403) else "try again later"
        raise RegproxyError(f"cannot download {repo_id}{at} from the Hugging Face Hub (HTTP {status}: "
                            f"{one_line(exc)[:200]}): {advice}") from None
    except (OSError, ValueError) as exc:  # e.g. a download that fails its size or checksum check
        raise RegproxyError(f"cannot download {repo_id}{at} from the Hugging Face Hub ({one_line(exc)[:200]}): "
                            f"try again, or remove its folder from {constants.HF_HUB_CACHE}") from None
    if not (folder / CONFIG_NAME).is_file():
        raise HubModelMissing(f"{repo_id}{at} on the Hugging Face Hub is not a regproxy model (no {CONFIG_NAME})")
    return folder


def push_to_hub(directory: str | os.PathLike, repo_id: str, *, private: bool = False, token: str | None = None) -> str:
    """Upload a saved model directory to the Hugging Face Hub; returns the commit URL."""
    from huggingface_hub import HfApi

    directory = Path(directory)
    load_pretrained(directory)  # refuse to publish something that does not load
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    info = api.upload_folder(folder_path=str(directory), repo_id=repo_id, commit_message="Upload regproxy model")
    return str(info)
