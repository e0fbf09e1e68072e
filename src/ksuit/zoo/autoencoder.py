"""The seed documentation's autoencoder: a composite of an encoder and a decoder (MLPs)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ksuit.models import CompositeModel, Model, ModelBase
from ksuit.schemas.models import ModelBaseConfig


class EncoderConfig(ModelBaseConfig):
    kind: str = "ksuit.zoo.autoencoder.Encoder"
    name: str = "encoder"
    input_dim: int = 64
    hidden_dim: int = 128
    latent_dim: int = 16


class DecoderConfig(ModelBaseConfig):
    kind: str = "ksuit.zoo.autoencoder.Decoder"
    name: str = "decoder"
    latent_dim: int = 16
    hidden_dim: int = 128
    output_dim: int = 64


class AutoencoderConfig(ModelBaseConfig):
    kind: str = "ksuit.zoo.autoencoder.Autoencoder"
    name: str = "autoencoder"
    encoder: EncoderConfig = EncoderConfig()
    decoder: DecoderConfig = DecoderConfig()
    freeze_encoder: bool = False


def _mlp(d_in: int, d_hidden: int, d_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, d_hidden), nn.GELU(), nn.Linear(d_hidden, d_out))


class Encoder(Model):
    def __init__(self, model_config: EncoderConfig, **kwargs: Any):
        super().__init__(model_config, **kwargs)
        self.net = _mlp(model_config.input_dim, model_config.hidden_dim, model_config.latent_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.net(x)
        return out


class Decoder(Model):
    def __init__(self, model_config: DecoderConfig, **kwargs: Any):
        super().__init__(model_config, **kwargs)
        self.net = _mlp(model_config.latent_dim, model_config.hidden_dim, model_config.output_dim)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.net(z)
        return out


class Autoencoder(CompositeModel):
    def __init__(self, model_config: AutoencoderConfig, **kwargs: Any):
        super().__init__(model_config, **kwargs)
        shared = {k: v for k, v in kwargs.items() if k != "is_frozen"}
        self.encoder = Encoder(model_config.encoder, is_frozen=model_config.freeze_encoder, **shared)
        self.decoder = Decoder(model_config.decoder, **shared)

    @property
    def submodels(self) -> dict[str, ModelBase | None]:
        return {"encoder": self.encoder, "decoder": self.decoder}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.decoder(self.encoder(x))
        return out
