import pydantic
import pytest

from ksuit.schemas.models import ModelBaseConfig, OptimizerConfig
from ksuit.zoo.autoencoder import AutoencoderConfig, EncoderConfig


def test_optimizer_config_keeps_any_kwargs():
    cfg = OptimizerConfig.model_validate({"kind": "torch.optim.AdamW", "lr": 1e-3, "weight_decay": 0.05})
    assert cfg.kind == "torch.optim.AdamW"
    assert cfg.kwargs == {"lr": 1e-3, "weight_decay": 0.05}


def test_config_kind_is_the_class_path():
    assert EncoderConfig().config_kind == "ksuit.zoo.autoencoder.EncoderConfig"


def test_nested_configs_dump_to_json_and_back():
    cfg = AutoencoderConfig(
        encoder=EncoderConfig(latent_dim=3, optimizer_config={"kind": "torch.optim.SGD", "lr": 0.1})
    )
    dumped = cfg.model_dump(mode="json")
    again = AutoencoderConfig.model_validate(dumped)
    assert again == cfg
    assert again.encoder.optimizer_config.kwargs == {"lr": 0.1}


@pytest.mark.parametrize("bad", ["a/b", "x_cp=y", ".hidden", "", "a\0"])
def test_names_validated(bad):
    with pytest.raises(pydantic.ValidationError, match="name"):
        ModelBaseConfig(kind="a.B", name=bad)


def test_unknown_field_rejected():
    with pytest.raises(pydantic.ValidationError, match="laten_dim"):
        EncoderConfig(laten_dim=3)


def test_kind_must_be_an_import_path():
    with pytest.raises(pydantic.ValidationError, match="import path"):
        ModelBaseConfig(kind="Encoder", name="x")
