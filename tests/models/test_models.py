import pytest
import torch

from ksuit.models import CompositeModel
from ksuit.models.base import require_ksuit_model
from ksuit.schemas.models import ModelBaseConfig
from ksuit.zoo.autoencoder import Autoencoder, Encoder, EncoderConfig
from tests.conftest import autoencoder_config, train_one_step


def test_leaf_model_builds_optimizer_on_initialize():
    enc = Encoder(EncoderConfig(optimizer_config={"kind": "torch.optim.AdamW", "lr": 1e-3}))
    assert enc.optimizer is None
    assert enc.initialize() is enc
    assert isinstance(enc.optimizer.torch_optim, torch.optim.AdamW)
    assert enc.name == "encoder"
    assert enc.model_config.latent_dim == 16


def test_optimizer_state_dict_is_torch_state_dict():
    model = Autoencoder(autoencoder_config()).initialize()
    train_one_step(model)
    sd = model.encoder.optimizer.state_dict()
    assert sd.keys() == model.encoder.optimizer.torch_optim.state_dict().keys()
    assert set(sd["state"][0]) == {"step", "exp_avg", "exp_avg_sq"}


def test_model_without_optimizer_config_has_none():
    model = Autoencoder(autoencoder_config(optim=False)).initialize()
    assert model.encoder.optimizer is None and model.decoder.optimizer is None


def test_frozen_models_have_no_grad_no_optimizer_and_stay_in_eval():
    model = Autoencoder(autoencoder_config(freeze_encoder=True)).initialize()
    assert model.encoder.is_frozen
    assert model.encoder.optimizer is None
    assert all(not p.requires_grad for p in model.encoder.parameters())
    model.train()
    assert not model.encoder.training
    assert model.decoder.training


def test_composite_names_and_leaves():
    model = Autoencoder(autoencoder_config())
    assert [name for name, _ in model.iter_leaves()] == ["autoencoder.encoder", "autoencoder.decoder"]
    assert model.optimizer is None


class _Cfg(ModelBaseConfig):
    kind: str = "tests.models.test_models._Nested"
    name: str = "outer"


class _Nested(CompositeModel):
    def __init__(self, model_config, **kw):
        super().__init__(model_config, **kw)
        self.inner = Autoencoder(autoencoder_config())
        self.head = Encoder(EncoderConfig(name="head", input_dim=16))

    @property
    def submodels(self):
        return {"backbone": self.inner, "head": self.head, "optional": None}


def test_nested_composites_and_none_entries():
    model = _Nested(_Cfg())
    names = [n for n, _ in model.iter_leaves()]
    assert names == ["outer.backbone.encoder", "outer.backbone.decoder", "outer.head"]
    keys = [k for k, _, _ in model.iter_submodels()]
    assert keys == ["backbone", "backbone.encoder", "backbone.decoder", "head"]


def test_composite_without_submodels_property_cannot_be_built():
    class Broken(CompositeModel):
        pass

    with pytest.raises(TypeError):
        Broken(_Cfg())


def test_model_requires_a_config_instance():
    with pytest.raises(TypeError, match="ModelBaseConfig"):
        Encoder({"kind": "x.Y", "name": "e"})


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated")  # torch.compile's import
def test_require_ksuit_model_takes_leaf_and_composite_models_only():
    require_ksuit_model(Encoder(EncoderConfig()))
    require_ksuit_model(Autoencoder(autoencoder_config()))
    with pytest.raises(TypeError, match=r"must be a ksuit ModelBase \(Model or CompositeModel\), got Linear"):
        require_ksuit_model(torch.nn.Linear(2, 2))
    compiled = torch.compile(Encoder(EncoderConfig()))  # wraps; compiles only on the first call
    with pytest.raises(
        TypeError, match=r"torch.compile-wrapped model; pass the original .*compiled._orig_mod"
    ):
        require_ksuit_model(compiled)
