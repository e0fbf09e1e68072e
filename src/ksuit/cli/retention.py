"""`ksuit prune`, `ksuit pin`, `ksuit unpin`: apply a retention policy to a run now, and protect
a tag from it.

`prune` prints every set with what happens to it and why (the rule or guarantee that keeps it,
or why it goes), then deletes with the same crash-safe protocol as retention during training
(`--dry-run` deletes nothing). Exit codes as everywhere (`ksuit.cli.output`): 0 done, 1 a
checkpoint file is damaged or unsafe (e.g. the pins file), 2 wrong arguments.
"""

from __future__ import annotations

import re
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from ksuit.cli.listing import RunDir
from ksuit.cli.output import EXIT_USAGE, console, exit_on_errors, fail, printable
from ksuit.retention import KeepBest, Plan, RetentionPolicy, pin, prune, unpin
from ksuit.utils.units import human_bytes, parse_bytes

_BEST = re.compile(r"^(?P<metric>.+):(?P<mode>min|max):(?P<n>[0-9]+)$")
Tag = Annotated[str, typer.Argument(help="a checkpoint tag, e.g. E10_U200_S800")]


def _keep_best(specs: list[str]) -> list[KeepBest]:
    result = []
    for spec in specs:
        match = _BEST.match(spec)
        if match is None or int(match["n"]) < 1:
            raise fail(
                f"--keep-best {spec!r} is not METRIC:min|max:N with N >= 1 (e.g. loss/val:min:3)", EXIT_USAGE
            )
        result.append(
            KeepBest.model_validate({"metric": match["metric"], "mode": match["mode"], "n": int(match["n"])})
        )
    return result


def prune_command(
    run_dir: RunDir,
    keep_last: Annotated[int | None, typer.Option(min=1, help="keep the newest N sets of each group")] = None,
    keep_every_epochs: Annotated[int | None, typer.Option(min=1, help="keep a set every K epochs")] = None,
    keep_every_updates: Annotated[int | None, typer.Option(min=1, help="keep a set every K updates")] = None,
    keep_every_samples: Annotated[int | None, typer.Option(min=1, help="keep a set every K samples")] = None,
    keep_best: Annotated[
        list[str] | None, typer.Option(help="keep the best N sets by a recorded metric: METRIC:min|max:N")
    ] = None,
    keep_within_hours: Annotated[
        float | None, typer.Option(min=0.0, help="keep every set saved within the last H hours")
    ] = None,
    max_bytes: Annotated[
        str | None,
        typer.Option(help="delete the oldest sets the rules keep until the folder fits, e.g. 20GiB"),
    ] = None,
    min_free_bytes: Annotated[
        str | None, typer.Option(help="delete the oldest sets the rules keep until this much is free")
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="print what would be deleted; delete nothing")
    ] = False,
) -> None:
    """Delete the checkpoint sets a retention policy does not keep, crash-safely.

    Only progress-tag sets (E10_U200_S800) are ever deleted; latest, last, best_* and other named
    tags, pinned sets and the set resume would pick always stay.
    """
    with exit_on_errors():
        policy = RetentionPolicy(
            keep_last=keep_last,
            keep_every_epochs=keep_every_epochs,
            keep_every_updates=keep_every_updates,
            keep_every_samples=keep_every_samples,
            keep_best=_keep_best(keep_best or []) or None,
            keep_within_hours=keep_within_hours or None,
            max_bytes=None if max_bytes is None else parse_bytes(max_bytes),
            min_free_bytes=None if min_free_bytes is None else parse_bytes(min_free_bytes),
        )
        if not policy.has_rules and not policy.has_budget:
            raise fail(
                "give a rule or a budget (--keep-last, --keep-every-epochs, --keep-best, --max-bytes, ...); "
                "without one prune keeps everything",
                EXIT_USAGE,
            )
        decided = prune(run_dir, policy, dry_run=dry_run)
    _print_plan(decided, policy, dry_run)


def _print_plan(decided: Plan, policy: RetentionPolicy, dry_run: bool) -> None:
    out = console()
    table = Table(title=f"retention: {escape(policy.describe())}")
    for column in ("group", "tag", "iteration"):
        table.add_column(column)
    table.add_column("size", justify="right")
    table.add_column("action")
    table.add_column("why")
    for d in sorted(decided.decisions, key=lambda d: (d.set.group, d.set.age_key())):
        s = d.set
        size = decided.sizes.get(s.manifest, 0)
        action = ("would delete" if dry_run else "deleted") if d.delete else "keep"
        cells = (s.group, s.tag, str(s.iteration) if s.iteration is not None else "?")
        table.add_row(
            *(escape(printable(c)) for c in cells),
            human_bytes(size),
            f"[red]{action}[/red]" if d.delete else action,
            escape(printable("; ".join(d.reasons))),
        )
    out.print(table)
    gone = [d for d in decided.decisions if d.delete]
    verb = "would delete" if dry_run else "deleted"
    out.print(
        f"{verb} {len(gone)} of {len(decided.decisions)} sets; "
        f"the folder holds {human_bytes(decided.bytes_before)}"
        f" ({decided.bytes_before} bytes), {human_bytes(decided.bytes_after)} ({decided.bytes_after} bytes) "
        f"{'after' if dry_run else 'now'} (hard links counted once)",
        markup=False,
    )
    if decided.shortfall is not None:
        out.print(f"budget not met: {printable(decided.shortfall)}", markup=False, soft_wrap=True)


def pin_command(run_dir: RunDir, tag: Tag) -> None:
    """Protect the sets of TAG (every group) from retention and prune."""
    with exit_on_errors():
        added = pin(run_dir, tag)
    console().print(f"{'pinned' if added else 'already pinned'}: {printable(tag)}", markup=False)


def unpin_command(run_dir: RunDir, tag: Tag) -> None:
    """Let retention and prune decide about the sets of TAG again."""
    with exit_on_errors():
        unpin(run_dir, tag)
    console().print(f"unpinned: {printable(tag)}", markup=False)
