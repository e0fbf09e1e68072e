"""Plain modules as ksuit models (`ksuit.models.wrap`): saved by the seed writer unchanged, loaded
back into a module the caller built, never rebuilt from the file alone."""

import subprocess
import sys

import pytest
import torch
from torch import nn

import ksuit
from ksuit.models import wrap
from ksuit.models.wrapped import WrappedComposite, WrappedModel
from ksuit.writers import CheckpointWriter
from tests.conftest import assert_bitwise_equal


class Net(nn.Module):
    def __init__(self, dim: int = 6):
        super().__init__()
        self.fc = nn.Linear(dim, 4)
        self.bn = nn.BatchNorm1d(4)
        self.module = nn.Linear(4, 2)  # a child named like the wrapper's own attribute

    def forward(self, x):
        return self.module(self.bn(self.fc(x)))


def step(net: nn.Module, opt: torch.optim.Optimizer, dim: int = 6) -> None:
    loss = net(torch.randn(8, dim)).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()


def test_wrapped_module_keeps_its_own_state_dict_keys_and_trains_shared():
    net = Net()
    model = wrap(net, "net", optimizer=torch.optim.AdamW(net.parameters()))
    assert isinstance(model, WrappedModel) and model.name == "net" and model.is_initialized
    assert list(model.state_dict()) == list(net.state_dict())
    assert_bitwise_equal(dict(model.state_dict()), dict(net.state_dict()))
    assert model(torch.randn(3, 6)).shape == (3, 2)
    other = Net()
    model.load_state_dict(other.state_dict())
    assert_bitwise_equal(dict(net.state_dict()), dict(other.state_dict()))


def test_writer_saves_a_wrapped_module_and_its_optimizer_as_plain_files(path_provider, update_counter):
    net = Net()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    step(net, opt)
    model = wrap(net, "net", optimizer=opt, config={"dim": 6, "note": "baseline"})
    CheckpointWriter(path_provider, update_counter).save(model, "E1_U2_S3")
    folder = path_provider.checkpoint_path
    payload = torch.load(folder / "net_cp=E1_U2_S3_model.th", weights_only=True)
    assert_bitwise_equal(dict(payload["state_dict"]), dict(net.state_dict()))
    assert payload["model_config"]["module_kind"] == "tests.models.test_wrapped.Net"
    assert payload["model_config"]["module_config"] == {"dim": 6, "note": "baseline"}
    optim = torch.load(folder / "net_cp=E1_U2_S3_optim.th", weights_only=True)
    assert_bitwise_equal(optim, opt.state_dict())
    listed = {(c.model_name, c.tag, c.role) for c in ksuit.list_checkpoints(path_provider.run_output_path)}
    assert listed == {("net", "E1_U2_S3", "model"), ("net", "E1_U2_S3", "optim")}


def test_a_dict_of_modules_gives_one_file_per_part(path_provider, update_counter):
    enc, dec = Net(), nn.Linear(2, 6)
    opts = {"encoder": torch.optim.AdamW(enc.parameters()), "decoder": torch.optim.SGD(dec.parameters(), 0.1)}
    model = wrap({"encoder": enc, "decoder": dec}, name="ae", optimizer=opts)
    assert isinstance(model, WrappedComposite)
    assert [n for n, _ in model.iter_leaves()] == ["ae.encoder", "ae.decoder"]
    CheckpointWriter(path_provider, update_counter).save(model, "latest")
    names = sorted(p.name for p in path_provider.checkpoint_path.glob("*.th"))
    assert names == [
        "ae.decoder_cp=latest_model.th",
        "ae.decoder_cp=latest_optim.th",
        "ae.encoder_cp=latest_model.th",
        "ae.encoder_cp=latest_optim.th",
    ]
    enc_payload = torch.load(path_provider.checkpoint_path / names[2], weights_only=True)
    assert_bitwise_equal(dict(enc_payload["state_dict"]), dict(enc.state_dict()))


def test_a_composite_of_wrapped_modules_loads_its_own_state_dict_with_clean_key_names():
    model = wrap({"encoder": Net(), "decoder": nn.Linear(2, 6)}, name="ae")
    state = model.state_dict()
    assert list(state)[:2] == ["encoder.fc.weight", "encoder.fc.bias"] and "encoder.module.weight" in state
    other = wrap({"encoder": Net(), "decoder": nn.Linear(2, 6)}, name="ae")
    other.load_state_dict(state)
    assert_bitwise_equal(dict(other.state_dict()), dict(state))
    del state["encoder.fc.weight"]
    state["encoder.extra"] = torch.zeros(1)
    with pytest.raises(RuntimeError, match=r'Missing key\(s\) in state_dict: "encoder.fc.weight"') as info:
        other.load_state_dict(state)
    assert '"encoder.extra"' in str(info.value) and "encoder.module.fc" not in str(info.value)


def test_load_model_loads_into_the_module_the_caller_built(path_provider, update_counter, caplog):
    net = Net()
    step(net, torch.optim.SGD(net.parameters(), lr=0.1))
    CheckpointWriter(path_provider, update_counter).save(wrap(net, "net"), "latest")
    path = path_provider.checkpoint_path / "net_cp=latest_model.th"
    fresh = Net()
    loaded = ksuit.load_model(path, module=fresh)
    assert loaded is fresh and not fresh.training
    assert_bitwise_equal(dict(fresh.state_dict()), dict(net.state_dict()))
    with pytest.raises(ValueError, match=r"plain torch module \(tests.models.test_wrapped.Net\)") as info:
        ksuit.load_model(path)
    assert "config-described" in str(info.value) and "module=" in str(info.value)

    class Other(Net):
        pass

    ksuit.load_model(path, module=Other())  # fits by its keys: loaded, with a note of the mix-up
    assert "was saved from a tests.models.test_wrapped.Net" in caplog.text


def test_the_files_of_a_wrapped_module_load_without_ksuit(path_provider, update_counter):
    CheckpointWriter(path_provider, update_counter).save(wrap(nn.Linear(3, 2), "lin"), "latest")
    code = (
        "import sys, torch; p = torch.load(sys.argv[1], weights_only=True); "
        "assert set(p['state_dict']) == {'weight', 'bias'}"
    )
    path = path_provider.checkpoint_path / "lin_cp=latest_model.th"
    result = subprocess.run([sys.executable, "-I", "-c", code, str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_the_writer_points_a_plain_module_to_wrap(path_provider, update_counter):
    with pytest.raises(TypeError, match=r"got Linear; for a plain torch module use ksuit.models.wrap"):
        CheckpointWriter(path_provider, update_counter).save(nn.Linear(2, 2), "latest")


def sgd_of_another_module() -> torch.optim.Optimizer:
    return torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=1.0)


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (lambda: wrap({"a": nn.Linear(2, 2)}, "m", optimizer=sgd_of_another_module()),
         TypeError, "one optimizer file per part"),
        (lambda: wrap(nn.Linear(2, 2), "m", optimizer=sgd_of_another_module()),
         ValueError, "not parameters of its module"),
        (lambda: wrap({"a.b": nn.Linear(2, 2)}, "m"), ValueError, "without '.'"),
        (lambda: wrap({"train": nn.Linear(2, 2)}, "m"), ValueError, "clashes with a model attribute"),
        (lambda: wrap({"a": nn.Linear(2, 2)}, "m", optimizer={"b": None}), ValueError, "unknown parts"),
        (lambda: wrap({}, "m"), ValueError, "empty dict"),
        (lambda: wrap(nn.Linear(2, 2), "m", config={"f": object()}), TypeError, "JSON values"),
        (lambda: wrap(nn.Linear(2, 2), "bad/name"), ValueError, "path separators"),
        (lambda: wrap(wrap(nn.Linear(2, 2), "m"), "m"), TypeError, "already a ksuit model"),
        (lambda: wrap("linear", "m"), TypeError, "takes an nn.Module"),
    ],
)  # fmt: skip
def test_wrap_refuses_what_it_cannot_save_correctly(call, error, message):
    with pytest.raises(error, match=message):
        call()
