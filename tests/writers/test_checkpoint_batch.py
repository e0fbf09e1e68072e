"""`CheckpointWriter.batch()` nested: an inner block that raised writes none of its saves, even
when the outer block catches the exception and goes on."""

import pytest

from ksuit.writers import CheckpointWriter
from ksuit.zoo.autoencoder import Autoencoder
from tests.conftest import FakeTrainer, autoencoder_config, train_one_step, written_files


@pytest.fixture
def model():
    m = Autoencoder(autoencoder_config()).initialize()
    train_one_step(m)
    return m


@pytest.mark.parametrize("async_save", [False, True])
def test_a_failed_nested_block_writes_none_of_its_saves(path_provider, update_counter, model, async_save):
    folder = path_provider.checkpoint_path
    with CheckpointWriter(path_provider, update_counter, async_save=async_save) as w:
        with w.batch():
            w.save(model, "E1_U0_S0", save_optim=False)
            with pytest.raises(KeyError):
                with w.batch():
                    w.save(model, "E2_U0_S0", trainer=FakeTrainer(update_counter))
                    w.save(model, "E1_U0_S0")  # the outer file again, now with optimizer files
                    raise KeyError("boom")
            with w.batch():  # a nested block that ends normally joins the outer one
                w.save_model_checkpoint("extra_cp=E3_U0_S0_model.th", model.encoder.state_dict(), "E3_U0_S0")
    written = {p.name for p in folder.iterdir() if p.suffix == ".th"}
    assert written == {
        "autoencoder.encoder_cp=E1_U0_S0_model.th",
        "autoencoder.decoder_cp=E1_U0_S0_model.th",
        "extra_cp=E3_U0_S0_model.th",
    }
    assert not list(folder.glob("*E2_U0_S0*"))


def test_the_outer_block_still_writes_nothing_when_it_fails(path_provider, update_counter, model):
    w = CheckpointWriter(path_provider, update_counter)
    with pytest.raises(ValueError):
        with w.batch():
            with w.batch():
                w.save(model, "E1_U0_S0")
            raise ValueError("outer fails after the inner block ended")
    assert written_files(path_provider) == []
    w.save(model, "E2_U0_S0")  # the writer is usable afterwards
    assert len(list(path_provider.checkpoint_path.glob("*E2_U0_S0*.th"))) == 4
