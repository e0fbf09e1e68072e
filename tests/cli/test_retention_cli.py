"""`ksuit prune`, `ksuit pin`, `ksuit unpin` and what `ksuit ls` shows of them, through typer's
CliRunner."""

from __future__ import annotations

import json

import pytest
from tests.cli.test_listing import rows
from tests.retention.helpers import Saver, bytes_on_disk, progress_tags
from typer.testing import CliRunner

from ksuit.cli import app
from ksuit.layout import PINS_FILENAME
from ksuit.readers import list_checkpoints

runner = CliRunner()


@pytest.fixture
def saved(tmp_path):
    """Six updates, each a progress tag and latest, with a validation loss."""
    saver = Saver(tmp_path, train=False)
    for loss in (0.9, 0.2, 0.5, 0.7, 0.6, 0.8):
        saver.save(metrics={"loss/val": loss})
    return saver


def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def test_prune_dry_run_prints_every_decision_and_deletes_nothing(saved):
    before = sorted(p.name for p in saved.folder.iterdir())
    result = invoke("prune", saved.run_dir, "--keep-last", "2", "--keep-best", "loss/val:min:1", "--dry-run")
    assert result.exit_code == 0, result.output
    table = {r[1]: r for r in rows(result.output)}
    assert table["E0_U1_S4"][4] == "would delete" and table["E0_U1_S4"][5] == "no rule keeps it"
    assert (
        table["E1_U2_S8"][4] == "keep"
        and "keep_best loss/val:min:1 (loss/val 0.2, #1)" in table["E1_U2_S8"][5]
    )
    assert table["E2_U5_S20"][5] == "keep_last 2"
    assert "'latest': the rolling resume point" in table["latest"][5]
    assert "would delete 3 of 7 sets" in result.output
    assert sorted(p.name for p in saved.folder.iterdir()) == before


def test_prune_deletes_what_no_rule_keeps(saved):
    result = invoke("prune", saved.run_dir, "--keep-last", "1", "--keep-every-updates", "2")
    assert result.exit_code == 0, result.output
    assert progress_tags(saved.run_dir) == ["E1_U2_S8", "E2_U4_S16", "E3_U6_S24"]
    assert "deleted 3 of 7 sets" in result.output
    verify = invoke("verify", saved.run_dir)
    assert verify.exit_code == 0, verify.output


def test_prune_to_a_byte_budget(saved):
    budget = bytes_on_disk(saved.folder) * 2 // 3
    result = invoke("prune", saved.run_dir, "--max-bytes", str(budget))
    assert result.exit_code == 0, result.output
    assert bytes_on_disk(saved.folder) <= budget
    assert progress_tags(saved.run_dir)[-1] == "E3_U6_S24"  # the oldest went first
    assert "evicted for the budget" in result.output


def test_pin_protects_a_tag_and_ls_shows_it(saved):
    result = invoke("pin", saved.run_dir, "E1_U2_S8")
    assert result.exit_code == 0 and "pinned: E1_U2_S8" in result.output
    assert invoke("pin", saved.run_dir, "E1_U2_S8").output.strip() == "already pinned: E1_U2_S8"
    pins = json.loads((saved.folder / PINS_FILENAME).read_text())
    assert pins == {"version": 1, "pinned": ["E1_U2_S8"]}
    assert PINS_FILENAME not in {c.name for c in list_checkpoints(saved.run_dir)}  # no checkpoint
    invoke("prune", saved.run_dir, "--keep-last", "1")
    assert progress_tags(saved.run_dir) == ["E1_U2_S8", "E3_U6_S24"]
    ls = invoke("ls", saved.run_dir)
    assert ls.exit_code == 0 and "pinned: E1_U2_S8" in ls.output
    assert invoke("unpin", saved.run_dir, "E1_U2_S8").exit_code == 0
    invoke("prune", saved.run_dir, "--keep-last", "1")
    assert progress_tags(saved.run_dir) == ["E3_U6_S24"]


def test_ls_sizes_counts_hard_links_once(saved):
    result = invoke("ls", saved.run_dir, "--sizes")
    assert result.exit_code == 0, result.output
    table = [r + [""] * (7 - len(r)) for r in rows(result.output.split("sets (bytes on disk)")[1])]
    sets = {r[1]: r for r in table}
    assert sets["E3_U6_S24"][6] == "" and sets["E3_U6_S24"][3] == "6"
    assert sets["E3_U6_S24"][5] != "" and sets["latest"][5] != ""  # they share optimizer and trainer files
    assert sets["E0_U1_S4"][5] == ""  # its former partners in latest were replaced since
    total = bytes_on_disk(saved.folder)
    assert (
        "folder total: " in result.output
        and f"({total} bytes on disk; hard links counted once)" in result.output
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["prune", "{run}"], "give a rule or a budget"),
        (["prune", "{run}", "--keep-best", "loss"], "is not METRIC:min|max:N"),
        (["prune", "{run}", "--max-bytes", "lots"], "is not a byte count"),
        (["prune", "{run}", "--keep-last", "0"], "--keep-last"),
        (["pin", "{run}", "E9_U9_S9"], "no checkpoint set has the tag 'E9_U9_S9'"),
        (["unpin", "{run}", "E0_U1_S4"], "'E0_U1_S4' is not pinned"),
        (["prune", "{missing}", "--keep-last", "1"], "does not exist"),
    ],
)
def test_wrong_arguments_exit_2_with_one_line(saved, tmp_path, args, message):
    args = [a.format(run=saved.run_dir, missing=tmp_path / "nope") for a in args]
    result = invoke(*args)
    assert result.exit_code == 2, result.output
    assert message in result.output


def test_a_damaged_pins_file_is_reported_and_nothing_is_deleted(saved):
    (saved.folder / PINS_FILENAME).write_text('{"version": 1, "pinned": ["../../etc"]}')
    before = sorted(p.name for p in saved.folder.iterdir())
    result = invoke("prune", saved.run_dir, "--keep-last", "1")
    assert (
        result.exit_code == 1 and f"pins file {saved.folder / PINS_FILENAME} cannot be read" in result.output
    )
    assert sorted(p.name for p in saved.folder.iterdir()) == before
    ls = invoke("ls", saved.run_dir)
    assert ls.exit_code == 1 and f"problem: {PINS_FILENAME}" in ls.output
