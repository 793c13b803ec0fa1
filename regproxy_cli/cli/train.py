"""``regproxy train``: parse the config and overrides, then hand over to the training loop."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from regproxy_cli.cli.output import console

SUMMARY = "Train a model from a YAML config with the paper's protocol (torchrun for several GPUs)."
HELP = """Train RegProxy with the paper's protocol from a YAML config (see configs/: one per zoo model, plus
demo.yaml, which needs no download). Multi-GPU / multi-node: launch with torchrun, e.g.
`torchrun --nproc-per-node 8 -m regproxy_cli train configs/s16-ade.yaml`.

Writes RUN/config.yaml (resolved), RUN/log.jsonl, RUN/last.pt (for --resume), RUN/best/ and RUN/final/
(model directories that --model accepts)."""

EXAMPLES = """[bold]Examples[/]

  regproxy train configs/demo.yaml

  regproxy train configs/s16-ade.yaml --set data.root=/data/ADEChallengeData2016 --set run.precision=bf16

  regproxy train configs/s16-ade.yaml --resume"""


def train(
    config: Annotated[Path, typer.Argument(help="YAML training config.")],
    overrides: Annotated[
        list[str] | None, typer.Option("--set", help="Override one value: section.key=value (repeatable).")
    ] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in run.out_dir from last.pt.")] = False,
    allow_config_change: Annotated[bool, typer.Option(
        "--allow-config-change", help="With --resume: continue although the config differs from last.pt's.")] = False,
) -> None:
    from regproxy_cli.engine.config import load_config
    from regproxy_cli.engine.train import train as run_training

    cfg = load_config(config, overrides or [])
    best = run_training(cfg, resume=resume, allow_config_change=allow_config_change)
    if best is None:  # a torchrun process other than the main one: the main one reports
        return
    # with --set overrides the run's own config.yaml (written with them) names the data it was trained on
    data = best.parent / "config.yaml" if overrides else config
    console.print(f"model: {best}  (regproxy eval --model {best} --data {data})")
