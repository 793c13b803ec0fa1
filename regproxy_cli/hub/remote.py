"""The Hugging Face Hub: model repos through its cache (offline-aware), and publishing a model directory."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
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
from regproxy_cli.model.config import CARD_NAME, CONFIG_NAME, WEIGHTS_NAME


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


def push_to_hub(directory: str | os.PathLike, repo_id: str, *, private: bool = False, revision: str | None = None,
                token: str | None = None) -> str:
    """Upload a model directory to the Hugging Face Hub; returns the commit URL.

    Args:
        directory: a model directory (written by :func:`~regproxy_cli.hub.checkpoint.save_pretrained`) or its
            ``model.safetensors``, or a training run's directory, whose ``best/`` model (else ``final/``) is
            uploaded. It must load.
        repo_id: ``owner/name``; the repo is created (``private`` when asked) if it does not exist.
        revision: a branch to upload to, created from the main branch if it does not exist; None = main.
        token: a Hub token; None = the login (``hf auth login``) or ``HF_TOKEN``.

    A training run's model (``RUN/best`` or ``RUN/final``, with ``RUN/config.yaml`` beside it) is published with a
    card regenerated to hold that training config, as is a directory without a card; any other directory's
    ``README.md`` is uploaded as it is. The directory itself is never changed.
    """
    from huggingface_hub import HfApi

    from regproxy_cli.hub.checkpoint import load_pretrained, model_card  # torch: hub_snapshot alone does not need it

    directory = Path(directory).expanduser()
    if not directory.exists():
        raise RegproxyError(f"{directory}: no such file or directory")
    if directory.is_file():
        if directory.suffix != ".safetensors":
            raise RegproxyError(f"{directory} is a file, not a model directory: push its model directory (or, with "
                                f"`regproxy push`, an authors' .pth)")
        directory = directory.parent  # the weights of a model directory
    if not (directory / CONFIG_NAME).is_file():  # a training run: its best model, else its last one
        directory = next((directory / sub for sub in ("best", "final") if (directory / sub / CONFIG_NAME).is_file()),
                         directory)
    config = load_pretrained(directory).config  # refuse to publish something that does not load
    run_config = directory.parent / "config.yaml"
    training = run_config.read_text() if directory.name in ("best", "final") and run_config.is_file() else None
    card = model_card(config, training) if training or not (directory / CARD_NAME).is_file() else None

    api = HfApi(token=token)
    at = f" (revision {revision})" if revision else ""
    with _staged(directory, card) if card is not None else nullcontext(directory) as folder:
        try:
            api.create_repo(repo_id, private=private, exist_ok=True)
            if revision:
                api.create_branch(repo_id, branch=revision, exist_ok=True)
            info = api.upload_folder(folder_path=str(folder), repo_id=repo_id, revision=revision,
                                     commit_message=COMMIT_MESSAGE)
        except HfHubHTTPError as exc:
            status = getattr(getattr(exc, "response", None), "status_code", None)
            advice = "check your login and write access (`hf auth login`)" if status in (401, 403) else "try again later"
            raise RegproxyError(f"cannot push to {repo_id}{at} on the Hugging Face Hub (HTTP {status}: "
                                f"{one_line(exc)[:200]}): {advice}") from None
        except Exception as exc:  # noqa: BLE001 - offline, no network, a bad repo id: types vary by Hub version
            raise RegproxyError(f"cannot push to {repo_id}{at} on the Hugging Face Hub ({type(exc).__name__}: "
                                f"{one_line(exc)[:200]}): check the repo id and the network") from None
    return str(info)


COMMIT_MESSAGE = "Upload regproxy model"


@contextmanager
def _staged(directory: Path, card: str) -> Iterator[Path]:
    """A temporary copy of ``directory`` (files hard-linked where the file system allows) with ``card`` as its
    README.md, so the upload carries the new card while the user's directory stays as it is."""
    with tempfile.TemporaryDirectory(prefix=".regproxy-push-", dir=directory.parent) as tmp:
        staged = Path(tmp)
        for file in directory.iterdir():
            if file.is_file() and file.name != CARD_NAME:
                try:
                    os.link(file, staged / file.name)
                except OSError:  # e.g. a file system without hard links
                    shutil.copy2(file, staged / file.name)
        (staged / CARD_NAME).write_text(card, encoding="utf-8")
        yield staged
