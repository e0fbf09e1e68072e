"""`ksuit train CONFIG [KEY=VALUE ...] [--output DIR] [--run-id ID] [--resume [TAG]]`."""

from __future__ import annotations

import logging
import os
import re
import shlex
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape

from ksuit.cli.output import EXIT_BAD_CHECKPOINT, EXIT_USAGE, fail
from ksuit.cli.storage_options import storage_option_args
from ksuit.storage.errors import StoreAccessError

_SPEC = re.compile(r"^(epoch|update|sample)=\d+$")

RESUME_HELP = (
    "Continue run --run-id in place. Alone, from its newest usable checkpoint; followed by a TAG "
    "(latest, last, E10_U230_S14720, E10 or epoch=10), from that one: `--resume TAG`. It says which "
    "checkpoint it picked and why it skipped others."
)


def _split_resume_tag(
    tokens: list[str], resume: bool, resume_from: str | None
) -> tuple[list[str], str | None]:
    """Typer cannot give `--resume` an optional value, so `--resume` is a flag and its TAG arrives
    among the positional arguments: the one that is not a KEY=VALUE override (or is `epoch=N`)."""
    overrides, tags = [], []
    for token in tokens:
        if resume and ("=" not in token or _SPEC.match(token)):
            tags.append(token)
        else:
            overrides.append(token)
    if resume_from is not None:
        tags.append(resume_from)
    if len(tags) > 1:
        raise typer.BadParameter(
            f"give one checkpoint to resume from, got {', '.join(tags)}", param_hint="--resume"
        )
    bad = [t for t in overrides if "=" not in t]
    if bad:
        raise typer.BadParameter(
            f"{', '.join(bad)}: overrides are KEY=VALUE (e.g. trainer.max_epochs=5); "
            "a checkpoint tag needs --resume",
            param_hint="OVERRIDES",
        )
    return overrides, (tags[0] if tags else None)


def _setup_logging(verbose: bool, rank: int) -> Console:
    console = Console(stderr=True)
    handler = RichHandler(
        console=console, show_path=False, markup=False, rich_tracebacks=False, log_time_format="[%X]"
    )
    level = logging.DEBUG if verbose else logging.INFO
    root = logging.getLogger("ksuit")
    root.handlers[:] = [handler]
    root.setLevel(level if rank == 0 else logging.WARNING)
    return console


def resume_command(config: Path, overrides: list[str], output: str, run_id: str) -> str:
    """The command line that continues this run (under torchrun, with the same world size)."""
    args = ["train", str(config), *overrides, "--output", str(output), "--run-id", run_id, "--resume"]
    args = [*storage_option_args(), *args]
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        nproc = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        nnodes = "" if nproc == world else f" --nnodes={world // nproc}"
        return f"torchrun{nnodes} --nproc_per_node={nproc} -m ksuit " + shlex.join(args)
    return "ksuit " + shlex.join(args)


def train_command(
    config: Annotated[Path, typer.Argument(help="YAML run config (see examples/autoencoder.yaml).")],
    overrides: Annotated[
        list[str] | None,
        typer.Argument(
            help="KEY=VALUE overrides with dotted keys, e.g. trainer.max_epochs=5 "
            "callbacks.0.every_n_epochs=2"
        ),
    ] = None,
    output: Annotated[
        str,
        typer.Option(
            "--output", "-o", help="Folder that holds the runs: a path or a URL such as s3://bucket/runs."
        ),
    ] = "runs",
    run_id: Annotated[
        str | None, typer.Option("--run-id", help="Run folder name (default: generated).")
    ] = None,
    resume: Annotated[bool, typer.Option("--resume", help=RESUME_HELP)] = False,
    resume_from: Annotated[
        str | None, typer.Option("--resume-from", help="Same as `--resume TAG`.", metavar="TAG")
    ] = None,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Show a progress bar.")] = True,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log every file written.")] = False,
) -> None:
    """Train a model from a YAML config; SIGTERM/Ctrl+C save `latest` and print how to resume.

    Also runs under `torchrun --nproc_per_node=N -m ksuit train ...` (gloo on CPU, nccl on CUDA).
    """
    from ksuit.schemas.run import ConfigError, load_run_config
    from ksuit.trainers import TrainingInterrupted
    from ksuit.trainers.runner import prepare_run, run
    from ksuit.utils import distributed

    overrides, tag = _split_resume_tag(list(overrides or []), resume or resume_from is not None, resume_from)
    resume = resume or resume_from is not None
    console = _setup_logging(verbose, int(os.environ.get("RANK", "0")))
    if not verbose:
        logging.getLogger("ksuit.writers").setLevel(logging.WARNING)
    log = logging.getLogger("ksuit.cli")
    try:
        run_config = load_run_config(config, overrides)
        prepared = prepare_run(run_config, output, run_id, resume=resume, resume_from=tag, progress=progress)
    except (ConfigError, FileNotFoundError, FileExistsError, StoreAccessError, ImportError) as e:
        raise fail(str(e), EXIT_USAGE) from None
    run_id = prepared.path_provider.run_id
    try:
        run(prepared)
    except TrainingInterrupted as e:
        if distributed.is_rank0():
            console.print(
                f"[yellow]{e.signal_name}[/yellow]: training stopped at {e.training_iteration} after saving "
                f"checkpoint '{e.checkpoint_tag}' in {escape(e.run_dir)}.\nResume with:\n  "
                + escape(resume_command(config, overrides, output, run_id)),
                highlight=False,
                soft_wrap=True,
            )
        _shutdown()
        raise typer.Exit(e.exit_code) from None
    except FileNotFoundError as e:  # e.g. no usable checkpoint set to resume from
        _shutdown()
        raise fail(str(e), EXIT_BAD_CHECKPOINT) from None
    _shutdown()
    if distributed.is_rank0():
        log.info("done: %s (list its checkpoints with `ksuit ls %s`)", prepared.run_dir, prepared.run_dir)


def _shutdown() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
