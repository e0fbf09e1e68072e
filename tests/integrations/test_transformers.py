"""`KsuitCallback` with a real Hugging Face Trainer (a tiny GPT-2 built from a config, nothing
downloaded): every checkpoint folder marked complete; after a crash cut the newest one short,
`last_complete_checkpoint` picks the one before and training resumes from it exactly."""

import os
import socket

import pytest
import torch
from typer.testing import CliRunner

os.environ["HF_HUB_OFFLINE"] = "1"  # read when transformers is imported: nothing goes to the network
os.environ["TRANSFORMERS_OFFLINE"] = "1"
pytest.importorskip(
    "transformers", reason="the transformers extra is not installed (pip install 'ksuit[transformers]')"
)

from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments
from transformers.trainer_utils import get_last_checkpoint

from ksuit.cli import app
from ksuit.integrations.transformers import KsuitCallback, last_complete_checkpoint
from ksuit.layout import FOLDER_MANIFEST
from tests.conftest import assert_bitwise_equal


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any connection attempt fails the test (offline flags should keep transformers quiet)."""
    attempts = []
    real_connect = socket.socket.connect

    def connect(self, address):
        if self.family == socket.AF_UNIX:
            return real_connect(self, address)
        attempts.append(address)
        raise OSError("network access in a test")

    monkeypatch.setattr(socket.socket, "connect", connect)
    yield
    assert attempts == []


class Tokens(torch.utils.data.Dataset):
    def __init__(self):
        self.ids = torch.randint(0, 64, (32, 16), generator=torch.Generator().manual_seed(0))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def train(output_dir, steps: int = 6, resume: str | None = None) -> GPT2LMHeadModel:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        config = GPT2Config(
            n_layer=1, n_head=2, n_embd=16, vocab_size=64, n_positions=16, bos_token_id=0, eos_token_id=0
        )
        model = GPT2LMHeadModel(config)
        args = TrainingArguments(
            output_dir=str(output_dir),
            max_steps=steps,
            save_steps=2,
            per_device_train_batch_size=4,
            report_to="none",
            use_cpu=True,
            logging_strategy="no",
            disable_tqdm=True,
            seed=0,
        )
        trainer = Trainer(model=model, args=args, train_dataset=Tokens(), callbacks=[KsuitCallback()])
        trainer.train(resume_from_checkpoint=resume)
        return model
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    return train(tmp_path_factory.mktemp("reference"))


def truncate(path, size: int) -> None:
    with open(path, "r+b") as f:
        f.truncate(size)


CRASHES = {
    # the process died while the Trainer wrote the folder, before the callback marked it
    "before-marking": lambda folder: (
        (folder / FOLDER_MANIFEST).unlink(),
        truncate(folder / "model.safetensors", 100),
    ),
    # a file of the folder was cut short after it was marked (e.g. lost in a power cut)
    "after-marking": lambda folder: truncate(folder / "optimizer.pt", 100),
}


@pytest.mark.parametrize("crash", list(CRASHES))
def test_the_newest_complete_checkpoint_is_found_and_resumes_exactly(tmp_path, uninterrupted, crash):
    train(tmp_path)
    folders = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("checkpoint-"))
    assert folders == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    assert all((tmp_path / f / FOLDER_MANIFEST).is_file() for f in folders)
    assert last_complete_checkpoint(tmp_path) == str(tmp_path / "checkpoint-6")
    assert CliRunner().invoke(app, ["verify", str(tmp_path)]).exit_code == 0

    CRASHES[crash](tmp_path / "checkpoint-6")
    assert get_last_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-6")  # what resume=True takes
    chosen = last_complete_checkpoint(tmp_path)
    assert chosen == str(tmp_path / "checkpoint-4")
    result = CliRunner().invoke(app, ["verify", str(tmp_path)])
    assert result.exit_code == 1 and "checkpoint-6: " in result.output

    resumed = train(tmp_path, resume=chosen)
    assert_bitwise_equal(dict(resumed.state_dict()), dict(uninterrupted.state_dict()))
    assert last_complete_checkpoint(tmp_path) == str(tmp_path / "checkpoint-6")  # saved again, marked
    assert CliRunner().invoke(app, ["verify", str(tmp_path)]).exit_code == 0


def test_no_complete_checkpoint_means_a_fresh_start(tmp_path):
    assert last_complete_checkpoint(tmp_path / "missing") is None
    (tmp_path / "checkpoint-2").mkdir()
    (tmp_path / "checkpoint-2" / "model.safetensors").write_bytes(b"cut")
    assert last_complete_checkpoint(tmp_path) is None
