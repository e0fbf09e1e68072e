"""Identical files of one save are written once: a progress tag's and `latest`'s optimizer and
trainer files (and `last`'s at the end of training) are hard links of one file on local disk, a
copy where the file system refuses links; checksums and readers treat them as ordinary files."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
import torch

from ksuit.readers import list_checkpoints, scan_sets, select_resume_set
from ksuit.schemas.run import load_run_config
from ksuit.storage import PendingFile, SetWriter
from ksuit.trainers.runner import prepare_run, run
from tests.retention.helpers import Saver

TINY = Path(__file__).parents[1] / "e2e" / "tiny_autoencoder.yaml"
SHARED = (
    "autoencoder.encoder_cp={}_optim.th",
    "autoencoder.decoder_cp={}_optim.th",
    "autoencoder_cp={}_trainer.th",
)


def inode(folder: Path, name: str) -> int:
    return (folder / name).stat().st_ino


@pytest.mark.parametrize("async_save", [False, True])
def test_a_progress_tag_and_latest_share_their_identical_files(tmp_path, async_save):
    saver = Saver(tmp_path, async_save=async_save)
    tag = saver.save()
    saver.writer.flush()
    folder = saver.folder
    for pattern in SHARED:
        assert inode(folder, pattern.format(tag)) == inode(folder, pattern.format("latest"))
        assert (folder / pattern.format(tag)).stat().st_nlink == 2
    # weights files carry their own tag (`checkpoint_tag`): two files
    weights = "autoencoder.encoder_cp={}_model.th"
    assert inode(folder, weights.format(tag)) != inode(folder, weights.format("latest"))
    assert torch.load(folder / weights.format("latest"), weights_only=True)["checkpoint_tag"] == "latest"
    assert all(s.ok for s in scan_sets(saver.run_dir, checksum=True))
    chosen, skipped = select_resume_set(saver.run_dir, "autoencoder")
    assert chosen.tag == "latest" and skipped == []


def test_files_are_copied_where_the_file_system_refuses_links(tmp_path, monkeypatch):
    def no_links(src, dst, **kw):
        raise OSError(errno.EXDEV, "Invalid cross-device link (injected)")

    monkeypatch.setattr(os, "link", no_links)
    saver = Saver(tmp_path)
    tag = saver.save()
    folder = saver.folder
    for pattern in SHARED:
        a, b = folder / pattern.format(tag), folder / pattern.format("latest")
        assert a.stat().st_ino != b.stat().st_ino and a.read_bytes() == b.read_bytes()
    assert all(s.ok for s in scan_sets(saver.run_dir, checksum=True))


def test_the_set_writer_links_only_the_same_payload_in_the_same_format(tmp_path):
    payload = {"w": torch.arange(4.0)}
    files = [
        PendingFile("m_cp=E0_U1_S1_optim.th", payload, "torch", "optim", "m", "E0_U1_S1"),
        PendingFile("m_cp=latest_optim.th", payload, "torch", "optim", "m", "latest"),
        PendingFile(
            "m_cp=E0_U1_S1_model.th",
            {"state_dict": {"w": torch.arange(4.0)}},
            "torch",
            "model",
            "m",
            "E0_U1_S1",
        ),
        PendingFile("m_cp=latest_model.th", {"state_dict": payload}, "torch", "model", "m", "latest"),
    ]
    written = SetWriter(tmp_path).write(files)
    assert [w.shared_with for w in written] == [None, "m_cp=E0_U1_S1_optim.th", None, None]
    assert written[0].checksum == written[1].checksum
    assert inode(tmp_path, files[0].filename) == inode(tmp_path, files[1].filename)


def test_last_shares_the_bytes_of_latest_at_the_end_of_training(tmp_path):
    prepared = prepare_run(load_run_config(TINY), tmp_path, "run")
    run(prepared)
    folder = prepared.path_provider.checkpoint_path
    for pattern in SHARED:
        assert inode(folder, pattern.format("last")) == inode(folder, pattern.format("latest"))
    by_tag = {}
    for c in list_checkpoints(prepared.run_dir):
        by_tag.setdefault(c.tag, set()).add(c.role)
    assert by_tag["last"] == {"model", "optim", "trainer"}
    chosen, _ = select_resume_set(prepared.run_dir, "autoencoder", tag="last")
    assert (
        chosen.ok
        and chosen.training_iteration
        == select_resume_set(prepared.run_dir, "autoencoder")[0].training_iteration
    )
