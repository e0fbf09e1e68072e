import logging
from pathlib import Path

import pytest

from ksuit.initializers import ResumeInitializer, parse_checkpoint_spec
from ksuit.schemas.run import load_run_config
from ksuit.trainers.runner import prepare_run, run
from ksuit.utils.training import TrainingIteration

TINY = Path(__file__).parents[1] / "e2e" / "tiny_autoencoder.yaml"
EVERY_EPOCH = [
    "callbacks=[{kind: checkpoint, every_n_epochs: 1, save_latest_weights: true, save_latest_optim: true}]"
]


def finished_run(tmp_path, epochs=3):
    run(prepare_run(load_run_config(TINY, [*EVERY_EPOCH, f"trainer.max_epochs={epochs}"]), tmp_path, "run"))
    return tmp_path / "run"


def resume(tmp_path, spec, epochs=3):
    prepared = prepare_run(
        load_run_config(TINY, [*EVERY_EPOCH, f"trainer.max_epochs={epochs}"]),
        tmp_path,
        "run",
        resume=True,
        resume_from=spec,
    )
    prepared.trainer.setup(prepared.model, prepared.datasets["train"])
    prepared.initializer.apply(prepared.trainer)
    return prepared


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, None),
        ("latest", "latest"),
        ("last", "last"),
        ("E2_U16_S128", "E2_U16_S128"),
        ("best_model.loss.val", "best_model.loss.val"),
        ("E2", TrainingIteration(epoch=2)),
        ("epoch=2", TrainingIteration(epoch=2)),
        ("update=16", TrainingIteration(update=16)),
        ({"sample": 64}, TrainingIteration(sample=64)),
    ],
)
def test_parse_checkpoint_spec(value, expected):
    assert parse_checkpoint_spec(value) == expected


def test_parse_checkpoint_spec_errors():
    with pytest.raises(ValueError, match="expected epoch=N"):
        parse_checkpoint_spec("epochs=2")
    with pytest.raises(ValueError):
        parse_checkpoint_spec("../x")


def test_newest_usable_set_by_default_and_by_tag_or_spec(tmp_path):
    finished_run(tmp_path)
    for spec, tag, iteration in (
        (None, "latest", "E3_U24_S192"),
        ("last", "last", "E3_U24_S192"),
        ("epoch=2", "E2_U16_S128", "E2_U16_S128"),
        ("E1", "E1_U8_S64", "E1_U8_S64"),
        ("E2_U16_S128", "E2_U16_S128", "E2_U16_S128"),
    ):
        prepared = resume(tmp_path, spec)
        assert prepared.trainer.resumed_from.tag == tag
        assert str(prepared.trainer.update_counter.cur_iteration) == iteration


def test_restores_weights_and_optimizer(tmp_path):
    from ksuit.storage import load_file

    folder = finished_run(tmp_path) / "checkpoints"
    prepared = resume(tmp_path, "epoch=2")
    saved = load_file(folder / "autoencoder.decoder_cp=E2_U16_S128_model.th")["state_dict"]
    assert all((prepared.model.decoder.state_dict()[k] == v).all() for k, v in saved.items())
    optim = load_file(folder / "autoencoder.encoder_cp=E2_U16_S128_optim.th")
    assert prepared.model.encoder.optimizer.state_dict()["state"][0]["step"] == optim["state"][0]["step"]


def test_damaged_sets_are_skipped_with_the_reason(tmp_path, caplog):
    folder = finished_run(tmp_path) / "checkpoints"
    # latest's weights: its optimizer and trainer files are hard links of last's (one end-of-run
    # save), so tearing those would tear last too
    (folder / "autoencoder.encoder_cp=latest_model.th").write_bytes(b"torn")
    (folder / "autoencoder.decoder_cp=E3_U24_S192_model.th").unlink()
    with caplog.at_level(logging.INFO, logger="ksuit"):
        prepared = resume(tmp_path, None)
    assert prepared.trainer.resumed_from.tag == "last"
    assert "skipped checkpoint 'latest': autoencoder.encoder_cp=latest_model.th: size" in caplog.text
    assert (
        "skipped checkpoint 'E3_U24_S192': autoencoder.decoder_cp=E3_U24_S192_model.th: missing"
        in caplog.text
    )
    assert "resuming from checkpoint 'last' (E3_U24_S192)" in caplog.text


def test_nothing_usable_is_an_error(tmp_path):
    finished_run(tmp_path, epochs=1)
    with pytest.raises(FileNotFoundError, match="matches epoch=5|no checkpoint set of 'autoencoder' matches"):
        resume(tmp_path, "epoch=5")
    initializer = ResumeInitializer(tmp_path / "run", "best_model.loss.val")
    assert initializer.checkpoint == "best_model.loss.val"


def test_resume_reads_each_file_of_the_set_once(tmp_path, monkeypatch):
    from collections import Counter

    from ksuit.storage.local import LocalBackend

    finished_run(tmp_path)
    opens, separate_hashes = Counter(), Counter()
    original = LocalBackend.open

    def counting_open(self, name, follow_symlinks=False):
        opens[name] += 1
        return original(self, name, follow_symlinks)

    monkeypatch.setattr(LocalBackend, "open", counting_open)
    monkeypatch.setattr(LocalBackend, "checksum", lambda self, name: separate_hashes.update([name]))
    prepared = resume(tmp_path, None)
    chosen = prepared.initializer.chosen
    assert chosen.tag == "latest" and chosen.checksums_verified
    members = set(chosen.manifest.files)
    assert {n: opens[n] for n in members} == dict.fromkeys(members, 1)
    assert separate_hashes == Counter()  # verified from the opened files, not by a second pass


def test_a_flipped_byte_in_the_newest_set_resumes_from_the_one_before(tmp_path, caplog):
    folder = finished_run(tmp_path) / "checkpoints"
    victim = folder / "autoencoder.decoder_cp=latest_model.th"
    data = bytearray(victim.read_bytes())
    data[-40] ^= 1
    victim.write_bytes(bytes(data))
    with caplog.at_level(logging.INFO, logger="ksuit"):
        prepared = resume(tmp_path, None)
    resumed = prepared.trainer.resumed_from
    assert resumed.tag in ("last", "E3_U24_S192") and str(resumed.training_iteration) == "E3_U24_S192"
    assert f"skipped checkpoint 'latest': {victim.name}: checksum " in caplog.text
