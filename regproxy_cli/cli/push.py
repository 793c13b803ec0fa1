"""``regproxy push``: publish a model directory, a training run's best model or an authors' .pth on the Hub."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Annotated

import typer

from regproxy_cli.cli.output import console, err_console
from regproxy_cli.errors import RegproxyError

SUMMARY = "Upload a model to the Hugging Face Hub (model directory, training run or authors' .pth)."
HELP = """Upload a model to the Hugging Face Hub as a regproxy model repo (config.json + model.safetensors + a model
card with the Hub metadata, the metrics and the paper's citation), which --model REPO_ID then loads.

--model is a model directory, a training run's directory (its best/ model is uploaded, with the run's
config.yaml in the card) or an authors' .pth (converted first, as --model converts it). The model must load
before anything is uploaded. Log in first (`hf auth login`) or set HF_TOKEN.

The old spelling `regproxy push MODEL REPO_ID` still works in this release, with a deprecation line on stderr."""

EXAMPLES = """[bold]Examples[/]

  regproxy push --model runs/demo me/regproxy-demo

  regproxy push --model models/s16-ade me/s16-ade --private --revision v1

  regproxy push -m regproxy-s16-ade.pth me/s16-ade"""

MODEL_HELP = "Model directory, training run directory or authors' .pth file."
DEPRECATED = ("deprecated: `regproxy push MODEL REPO_ID` becomes `regproxy push --model MODEL REPO_ID`; "
              "the positional MODEL goes in the next release")


def push(
    repo_id: Annotated[list[str], typer.Argument(
        metavar="REPO_ID", help="The Hub repo, owner/name (MODEL REPO_ID, the old spelling, still works).",
        show_default=False)],
    model: Annotated[Path | None, typer.Option("--model", "-m", help=MODEL_HELP, show_default=False)] = None,
    private: Annotated[bool, typer.Option("--private", help="Create the repo private (if it does not exist).")] = False,
    revision: Annotated[str | None, typer.Option(
        "--revision", metavar="BRANCH", help="Upload to this branch, created if needed (default: main)."
    )] = None,
) -> None:
    from regproxy_cli.hub.checkpoint import save_pretrained
    from regproxy_cli.hub.remote import push_to_hub
    from regproxy_cli.hub.zoo import load_model

    model, repo_id = _model_and_repo(model, repo_id)
    with err_console.status(f"uploading {model} to {repo_id}"):
        if model.is_file() and model.suffix in (".pth", ".pt"):  # an authors' checkpoint, as --model reads it
            with tempfile.TemporaryDirectory(prefix="regproxy-push-") as converted:
                save_pretrained(load_model(model), converted)
                url = push_to_hub(converted, repo_id, private=private, revision=revision)
        else:
            url = push_to_hub(model, repo_id, private=private, revision=revision)
    console.print(f"pushed {model} to {repo_id}" + (f" (revision {revision})" if revision else "") + f": {url}")


def _model_and_repo(model: Path | None, positional: list[str]) -> tuple[Path, str]:
    """``--model MODEL REPO_ID``, or the deprecated ``MODEL REPO_ID`` (one line on stderr says so)."""
    if len(positional) > 2 or (model is not None and len(positional) > 1):
        raise RegproxyError(f"push takes one REPO_ID, got {' '.join(positional)}: regproxy push --model MODEL REPO_ID")
    if len(positional) == 1:
        if model is None:
            raise RegproxyError("push needs the model: regproxy push --model MODEL REPO_ID")
        return model, positional[0]
    err_console.print(DEPRECATED, highlight=False, markup=False)
    return Path(positional[0]), positional[1]
