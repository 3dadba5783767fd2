"""Building blocks that every encoder body and every head shares, and the
body's output that heads read.

Dense and LayerNorm layers carrying logical axis names (the mapping to mesh
axes lives in `bistil_jax.partitioning`), the activations config.json can
name, the masking value of logits and the vocabulary-padding mask. Nothing
here knows an encoder family.
"""

from __future__ import annotations

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from bistil_jax.model.config import ModelConfig

# Large negative, finite value for masked logits: exp() underflows to 0 while
# 0 * log_softmax stays finite (finfo.min would overflow to -inf and give NaN).
MASK_VALUE = -1e9

ACTIVATIONS = {
  "gelu": lambda x: nn.gelu(x, approximate=False),
  "gelu_new": lambda x: nn.gelu(x, approximate=True),
  "gelu_pytorch_tanh": lambda x: nn.gelu(x, approximate=True),
  "relu": nn.relu,
  "tanh": jnp.tanh,
}


def dtype(name: str):
  return jnp.dtype(name)


def init(config: ModelConfig):
  """The HF initialiser of weights: normal(initializer_range)."""
  return nn.initializers.normal(stddev=config.initializer_range)


def dense(config: ModelConfig, features, axes, name, use_bias=True):
  """nn.Dense with logical axis names on kernel and bias."""
  return nn.Dense(
    features,
    use_bias=use_bias,
    dtype=dtype(config.dtype),
    param_dtype=dtype(config.param_dtype),
    kernel_init=nn.with_logical_partitioning(init(config), axes),
    bias_init=nn.with_logical_partitioning(
      nn.initializers.zeros_init(), axes[-1:]
    ),
    name=name,
  )


def layer_norm(config: ModelConfig, name):
  return nn.LayerNorm(
    epsilon=config.layer_norm_eps,
    dtype=dtype(config.dtype),
    param_dtype=dtype(config.param_dtype),
    scale_init=nn.with_logical_partitioning(
      nn.initializers.ones_init(), ("embed",)
    ),
    bias_init=nn.with_logical_partitioning(
      nn.initializers.zeros_init(), ("embed",)
    ),
    name=name,
  )


def constrain(x, axes):
  return nn.with_logical_constraint(x, axes)


def vocab_logits_mask(config: ModelConfig) -> jax.Array:
  """[padded_vocab] bool, True for real vocabulary columns."""
  return jnp.arange(config.padded_vocab_size) < config.vocab_size


def classifier_dropout(config: ModelConfig) -> float:
  """The dropout rate of task heads: `classifier_dropout`, else the hidden
  dropout (HF's rule)."""
  if config.classifier_dropout is None:
    return config.hidden_dropout_prob
  return config.classifier_dropout


@flax.struct.dataclass
class BodyOutput:
  """What an encoder body returns and every head reads.

  Attributes:
    hidden_states: tuple of L+1 arrays [b, l, d]; index 0 is the embedding
      output, index i the output of layer i (HF order).
    attentions: tuple of L entries, [b, heads, l, l] post-softmax attention
      probabilities for the requested layers and None for the others; None
      when none was requested.
    pooled: the pooler output [b, d] when the body has a pooler, else None.
    word_embeddings: the word-embedding table [padded_vocab, d] (a tied MLM
      decoder reads it).
    attention_mask: [b, l], 1 for real tokens, 0 for padding.
  """

  hidden_states: tuple[jax.Array, ...]
  attentions: tuple[jax.Array, ...] | None
  pooled: jax.Array | None
  word_embeddings: jax.Array
  attention_mask: jax.Array

  @property
  def last_hidden_state(self) -> jax.Array:
    return self.hidden_states[-1]
