"""``regproxy push``: publish a model directory, a training run's best model or an authors' .pth on the Hub."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Annotated

import typer

from regproxy_cli.cli.output import console, err_console
from regproxy_cli.io.checkpoint import save_pretrained
from regproxy_cli.io.hub import push_to_hub
from regproxy_cli.io.zoo import load_model

SUMMARY = "Upload a model to the Hugging Face Hub (model directory, training run or authors' .pth)."
HELP = """Upload a model to the Hugging Face Hub as a regproxy model repo (config.json + model.safetensors + a model
card with the Hub metadata, the metrics and the paper's citation), which --model REPO_ID then loads.

MODEL is a model directory, a training run's directory (its best/ model is uploaded, with the run's
config.yaml in the card) or an authors' .pth (converted first, as --model converts it). The model must load
before anything is uploaded. Log in first (`hf auth login`) or set HF_TOKEN."""

EXAMPLES = """[bold]Examples[/]

  regproxy push runs/demo me/regproxy-demo

  regproxy push models/s16-ade me/s16-ade --private --revision v1

  regproxy push regproxy-s16-ade.pth me/s16-ade"""


def push(
    model: Annotated[Path, typer.Argument(
        help="Model directory, training run directory or authors' .pth file.", show_default=False)],
    repo_id: Annotated[str, typer.Argument(help="The Hub repo, owner/name.", show_default=False)],
    private: Annotated[bool, typer.Option("--private", help="Create the repo private (if it does not exist).")] = False,
    revision: Annotated[str | None, typer.Option(
        "--revision", metavar="BRANCH", help="Upload to this branch, created if needed (default: main)."
    )] = None,
) -> None:
    with err_console.status(f"uploading {model} to {repo_id}"):
        if model.is_file() and model.suffix in (".pth", ".pt"):  # an authors' checkpoint, as --model reads it
            with tempfile.TemporaryDirectory(prefix="regproxy-push-") as converted:
                save_pretrained(load_model(model), converted)
                url = push_to_hub(converted, repo_id, private=private, revision=revision)
        else:
            url = push_to_hub(model, repo_id, private=private, revision=revision)
    console.print(f"pushed {model} to {repo_id}" + (f" (revision {revision})" if revision else "") + f": {url}")
