"""Resume loads its set in one pass: each file opened once and checked against its manifest from
the bytes that are loaded; a file that differs refuses the set with the reason `ksuit verify` and
`select_resume_set` give."""

from __future__ import annotations

from collections import Counter

import pytest

from ksuit.readers import load_resume_set, select_resume_set
from ksuit.storage import load_file
from ksuit.storage.local import LocalBackend, LocalFile
from ksuit.writers.checkpoint_writer import CheckpointWriter
from ksuit.zoo.autoencoder import Autoencoder
from tests.conftest import FakeTrainer, assert_bitwise_equal, autoencoder_config, train_one_step

GROUP = "autoencoder"
LEAVES = ("autoencoder.encoder", "autoencoder.decoder")
WANTED = [(GROUP, "trainer")] + [(leaf, role) for leaf in LEAVES for role in ("model", "optim")]


@pytest.fixture
def run(path_provider, update_counter):
    """Two saves (U1, U2), each with latest; returns (run_dir, folder)."""
    model = Autoencoder(autoencoder_config()).initialize()
    writer = CheckpointWriter(path_provider, update_counter)
    for _ in range(2):
        train_one_step(model)
        update_counter.next_update()
        writer.save(
            model,
            str(update_counter.cur_iteration),
            trainer=FakeTrainer(update_counter),
            save_latest_weights=True,
            save_latest_optim=True,
        )
    return path_provider.run_output_path, path_provider.checkpoint_path


def _flip(path, at=-30):
    """One byte of this name flipped (a fresh file: a set's files may share their bytes with
    another set's through a hard link, and the damage is meant to hit one set)."""
    data = bytearray(path.read_bytes())
    data[at] ^= 1
    path.unlink()
    path.write_bytes(bytes(data))


def test_each_file_is_opened_once_hashed_once_and_loaded_from_that_opening(run, monkeypatch):
    run_dir, folder = run
    opens, hashes, path_hashes = Counter(), Counter(), Counter()
    open_original, hash_original = LocalBackend.open, LocalFile.checksum

    def counting_open(self, name, follow_symlinks=False):
        opens[name] += 1
        return open_original(self, name, follow_symlinks)

    def counting_checksum(self):
        hashes[self.name] += 1
        return hash_original(self)

    monkeypatch.setattr(LocalBackend, "open", counting_open)
    monkeypatch.setattr(LocalFile, "checksum", counting_checksum)
    monkeypatch.setattr(LocalBackend, "checksum", lambda self, name: path_hashes.update([name]))
    loaded = load_resume_set(run_dir, GROUP, required=WANTED[1:], load=WANTED)
    assert loaded.chosen.tag == "latest" and loaded.skipped == [] and loaded.chosen.checksums_verified
    members = set(loaded.chosen.manifest.files)
    assert len(members) == 5
    assert {n: opens[n] for n in members} == dict.fromkeys(members, 1)  # no second opening ...
    assert {n: hashes[n] for n in members} == dict.fromkeys(members, 1)  # ... and one hash each
    assert path_hashes == Counter()  # no separate verification pass over the folder
    for (model_name, role), payload in loaded.payloads.items():
        info = loaded.chosen.file(model_name, role)
        assert_bitwise_equal(payload, load_file(info.path), info.name)
    assert set(loaded.payloads) == set(WANTED)


@pytest.mark.parametrize(
    "victim", ["autoencoder.encoder_cp=latest_model.th", "autoencoder_cp=latest_trainer.th"]
)
def test_a_flipped_byte_refuses_the_set_with_the_reason_select_gives(run, victim):
    run_dir, folder = run
    _flip(folder / victim)
    loaded = load_resume_set(run_dir, GROUP, required=WANTED[1:], load=WANTED)
    chosen, skipped = select_resume_set(run_dir, GROUP, required=WANTED[1:])
    assert (loaded.chosen.tag, loaded.skipped) == (chosen.tag, skipped)
    assert loaded.chosen.tag == "E0_U2_S0"
    ((tag, reason),) = loaded.skipped
    assert tag == "latest" and reason.startswith(f"{victim}: checksum ") and reason.endswith(" in manifest")
    assert all(p is not None for p in loaded.payloads.values()) and len(loaded.payloads) == 5


def test_nothing_intact_is_the_error_select_gives(run):
    run_dir, folder = run
    for tag in ("latest", "E0_U1_S0", "E0_U2_S0"):
        _flip(folder / f"autoencoder.decoder_cp={tag}_optim.th")
    with pytest.raises(FileNotFoundError) as by_select:
        select_resume_set(run_dir, GROUP, required=WANTED[1:])
    with pytest.raises(FileNotFoundError) as by_load:
        load_resume_set(run_dir, GROUP, required=WANTED[1:], load=WANTED)
    assert str(by_load.value) == str(by_select.value)
    assert "no usable checkpoint set of 'autoencoder'" in str(by_load.value)


def test_a_file_that_matches_its_manifest_but_cannot_be_loaded_raises(run, monkeypatch):
    from ksuit.readers import resume_set
    from ksuit.storage.errors import UnsafeCheckpointError

    def refuse(f, map_location="cpu", mmap=False):
        raise UnsafeCheckpointError(f"refusing to load {f.location}: test")

    monkeypatch.setattr(resume_set, "load_opened", refuse)
    run_dir, _ = run
    with pytest.raises(UnsafeCheckpointError, match="refusing to load"):
        load_resume_set(run_dir, GROUP, required=WANTED[1:], load=WANTED)
