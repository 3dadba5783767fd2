"""Encoder, heads and configuration."""

from bistil_jax.model.config import ModelConfig, preset
from bistil_jax.model.encoder import EncoderOutput, Model, init_params

__all__ = ["EncoderOutput", "Model", "ModelConfig", "init_params", "preset"]
