"""Recovery when a writer starts on a folder: committed switches are completed, leftovers of
uncommitted ones removed, and the next save works on the clean folder."""

from __future__ import annotations

import json
import os

import torch

from ksuit.layout import is_journal_filename, is_temp_filename, journal_filename, temp_filename
from ksuit.readers import select_resume_set
from ksuit.storage import PendingFile, SetWriter, load_file, recover_folder
from ksuit.writers.checkpoint_writer import CheckpointWriter
from ksuit.zoo.autoencoder import Autoencoder
from tests.conftest import FakeTrainer, autoencoder_config, train_one_step


def test_first_save_in_a_process_cleans_up_a_crashed_writer(path_provider, update_counter):
    folder = path_provider.checkpoint_path
    folder.mkdir(parents=True)
    # a crashed save: a committed journal whose rename was not applied, and uncommitted temps
    committed = folder / "other_cp=latest_model.th"
    committed_tmp = folder / temp_filename(committed.name, "00000001")
    torch.save({"state_dict": {"w": torch.ones(2)}}, committed_tmp)
    (folder / journal_filename(1)).write_text(json.dumps({"renames": [[committed_tmp.name, committed.name]]}))
    stray = folder / temp_filename("autoencoder_cp=latest_trainer.th", "deadbeef")
    stray.write_bytes(b"half a file")

    model = Autoencoder(autoencoder_config()).initialize()
    train_one_step(model)
    update_counter.next_update()
    CheckpointWriter(path_provider, update_counter).save(
        model, "E0_U1_S0", trainer=FakeTrainer(update_counter)
    )

    names = os.listdir(folder)
    assert not [n for n in names if is_temp_filename(n) or is_journal_filename(n)], names
    assert torch.equal(load_file(committed)["state_dict"]["w"], torch.ones(2))
    chosen, skipped = select_resume_set(path_provider.run_output_path, "autoencoder")
    assert chosen.tag == "E0_U1_S0" and skipped == []


def test_recovery_is_idempotent_after_a_crash_during_recovery(tmp_path):
    """Some renames of a journal already applied (recovery itself was killed): the rest are."""
    writer = SetWriter(tmp_path)
    files = [
        PendingFile(f"m_cp=latest_{k}.th", {"x": torch.full((2,), float(i))}, role=k, group="m", tag="latest")
        for i, k in enumerate(("model", "optim"))
    ]
    writer.write_set(files)
    first, second = tmp_path / "m_cp=latest_model.th", tmp_path / "m_cp=latest_optim.th"
    t1, t2 = (
        tmp_path / temp_filename(first.name, "aaaa0000"),
        tmp_path / temp_filename(second.name, "bbbb0000"),
    )
    torch.save({"x": torch.full((2,), 10.0)}, t1)
    torch.save({"x": torch.full((2,), 11.0)}, t2)
    (tmp_path / journal_filename(5)).write_text(
        json.dumps({"renames": [[t1.name, first.name], [t2.name, second.name]]})
    )
    os.replace(t1, first)  # the first rename happened before the crash
    report = recover_folder(tmp_path)
    assert report.rolled_forward == [second.name]
    assert load_file(first)["x"][0] == 10 and load_file(second)["x"][0] == 11
    assert recover_folder(tmp_path).rolled_forward == []
    assert sorted(os.listdir(tmp_path)) == sorted([first.name, second.name, "m_cp=latest.manifest.json"])
