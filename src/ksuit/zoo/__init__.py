"""Small ready-made models, used by the examples and tests (importable, so `load_model` can
rebuild them from any checkpoint)."""

from ksuit.zoo.autoencoder import (
    Autoencoder,
    AutoencoderConfig,
    Decoder,
    DecoderConfig,
    Encoder,
    EncoderConfig,
)

__all__ = ["Autoencoder", "AutoencoderConfig", "Decoder", "DecoderConfig", "Encoder", "EncoderConfig"]
