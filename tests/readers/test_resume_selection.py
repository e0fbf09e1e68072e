"""Resume picks only good sets: the newest complete and consistent one, and says which it
skipped and why."""

from __future__ import annotations

import pytest

from ksuit.readers import list_checkpoints, scan_sets, select_resume_set
from ksuit.utils.training import TrainingIteration
from ksuit.writers.checkpoint_writer import CheckpointWriter
from ksuit.zoo.autoencoder import Autoencoder
from tests.conftest import FakeTrainer, autoencoder_config, train_one_step


@pytest.fixture
def run(path_provider, update_counter):
    """Three saves (U1, U2, U3), each with latest; returns (run_dir, folder, save)."""
    model = Autoencoder(autoencoder_config()).initialize()
    writer = CheckpointWriter(path_provider, update_counter)
    trainer = FakeTrainer(update_counter)

    def save(**kw):
        train_one_step(model)
        update_counter.next_update()
        kw.setdefault("trainer", trainer)
        writer.save(
            model, str(update_counter.cur_iteration), save_latest_weights=True, save_latest_optim=True, **kw
        )

    for _ in range(3):
        save()
    return path_provider.run_output_path, path_provider.checkpoint_path, save, model, writer


def test_newest_set_prefers_latest_on_a_tie(run):
    run_dir, *_ = run
    chosen, skipped = select_resume_set(run_dir, "autoencoder")
    assert (chosen.tag, str(chosen.training_iteration), skipped) == ("latest", "E0_U3_S0", [])
    assert chosen.checksums_verified


def test_a_set_with_a_missing_file_is_skipped_with_the_reason(run):
    run_dir, folder, *_ = run
    (folder / "autoencoder.decoder_cp=latest_optim.th").unlink()
    (folder / "autoencoder.encoder_cp=E0_U3_S0_model.th").unlink()
    chosen, skipped = select_resume_set(run_dir, "autoencoder")
    assert chosen.tag == "E0_U2_S0"
    reasons = dict(skipped)
    assert reasons.keys() == {"latest", "E0_U3_S0"}
    assert "autoencoder.decoder_cp=latest_optim.th: missing" in reasons["latest"]
    assert "autoencoder.encoder_cp=E0_U3_S0_model.th: missing" in reasons["E0_U3_S0"]


def test_an_altered_file_is_caught_by_its_checksum(run):
    run_dir, folder, *_ = run
    victim = folder / "autoencoder.encoder_cp=latest_model.th"
    data = bytearray(victim.read_bytes())
    data[-30] ^= 1
    victim.write_bytes(bytes(data))
    chosen, skipped = select_resume_set(run_dir, "autoencoder")
    assert chosen.tag == "E0_U3_S0"
    assert skipped[0][0] == "latest" and "checksum" in skipped[0][1]


def test_a_damaged_file_shared_by_two_sets_is_caught_in_both(run):
    """The trainer file of U3 and latest is one file (hard link): damage to it shows under both
    names, and resume falls back to the newest set that does not share it."""
    run_dir, folder, *_ = run
    victim = folder / "autoencoder_cp=latest_trainer.th"
    assert victim.stat().st_ino == (folder / "autoencoder_cp=E0_U3_S0_trainer.th").stat().st_ino
    data = bytearray(victim.read_bytes())
    data[-30] ^= 1
    victim.write_bytes(bytes(data))
    chosen, skipped = select_resume_set(run_dir, "autoencoder")
    assert chosen.tag == "E0_U2_S0"
    assert [t for t, _ in skipped] == ["latest", "E0_U3_S0"] and all("checksum" in r for _, r in skipped)


def test_a_latest_set_mixing_iterations_is_skipped(run):
    """latest weights rewritten without latest optimizer state: weights U4, optimizers U3."""
    run_dir, folder, save, model, writer = run
    train_one_step(model)
    writer.update_counter.next_update()
    writer.save(model, "latest", save_optim=False)
    sets = {s.tag: s for s in scan_sets(run_dir)}
    assert "files from different iterations" in sets["latest"].problems["(iterations)"]
    chosen, skipped = select_resume_set(run_dir, "autoencoder")
    assert chosen.tag == "E0_U3_S0"
    assert skipped[0][0] == "latest" and "different iterations" in skipped[0][1]


def test_sets_without_trainer_or_required_files_are_skipped(run):
    run_dir, folder, save, model, writer = run
    save(trainer=None)  # U4: weights and optimizers, no trainer
    chosen, skipped = select_resume_set(run_dir, "autoencoder")
    assert str(chosen.training_iteration) == "E0_U3_S0"
    assert ("E0_U4_S0", "no trainer file (weights only, cannot resume training state)") in skipped
    train_one_step(model)
    writer.update_counter.next_update()
    writer.save(model, "E0_U5_S0", trainer=FakeTrainer(writer.update_counter), save_optim=False)
    chosen, _ = select_resume_set(run_dir, "autoencoder")
    assert chosen.tag == "E0_U5_S0"  # nothing required: weights and trainer suffice
    chosen, skipped = select_resume_set(run_dir, "autoencoder", required=[("autoencoder.encoder", "optim")])
    assert chosen.tag == "E0_U3_S0"
    assert ("E0_U5_S0", "missing autoencoder.encoder optim") in skipped
    # U4 rewrote latest weights and optimizers but had no trainer: latest now mixes U4 and U3
    assert "different iterations" in dict(skipped)["latest"]


def test_a_damaged_manifest_is_reported_not_trusted(run):
    run_dir, folder, *_ = run
    (folder / "autoencoder_cp=latest.manifest.json").write_text("{not json")
    chosen, skipped = select_resume_set(run_dir, "autoencoder")
    assert chosen.tag == "E0_U3_S0"
    assert skipped[0][0] == "latest" and "not a valid ksuit manifest" in skipped[0][1]


def test_select_by_tag_or_iteration(run):
    run_dir, *_ = run
    chosen, _ = select_resume_set(run_dir, "autoencoder", tag="E0_U2_S0")
    assert chosen.tag == "E0_U2_S0"
    chosen, _ = select_resume_set(run_dir, "autoencoder", tag=TrainingIteration(update=1))
    assert str(chosen.training_iteration) == "E0_U1_S0"


def test_listing_gives_latest_its_iteration_from_the_manifest(run):
    run_dir, *_ = run
    infos = list_checkpoints(run_dir)
    assert len(infos) == 4 * 5  # U1, U2, U3, latest x (2 models, 2 optims, trainer)
    latest = [i for i in infos if i.tag == "latest"]
    assert {str(i.training_iteration) for i in latest} == {"E0_U3_S0"}
    encoder_models = [i.tag for i in infos if i.model_name == "autoencoder.encoder" and i.role == "model"]
    assert encoder_models == ["E0_U1_S0", "E0_U2_S0", "E0_U3_S0", "latest"]
