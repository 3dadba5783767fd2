"""The BERT (mBERT) and RoBERTa (XLM-R) encoder body, which also runs
DistilBERT (the same post-LN layers without token types or pooler).

Submodule names mirror the PyTorch/HF-Flax names (`embeddings/word_embeddings`,
`encoder/layer/3/attention/self/query`, `LayerNorm`), so conversion is renames
plus transposes. The body returns `layers.BodyOutput`; the heads
(model/heads.py) read only that, whichever family produced it.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from bistil_jax.model import layers
from bistil_jax.model.config import ModelConfig

# Top-level parameter groups of this body, by part of the model (what
# measure.count_parameters reports).
PARAM_GROUPS = {"embeddings": "embeddings", "encoder": "body", "pooler": "body"}


def position_ids_for(config: ModelConfig, input_ids: jax.Array) -> jax.Array:
  """Position ids as HF computes them.

  BERT: 0..l-1 for every row. RoBERTa/XLM-R: real tokens count up from
  pad_token_id + 1 and padding tokens get pad_token_id.

  Args:
    config: the model config.
    input_ids: [b, l] int token ids.

  Returns:
    [b, l] int32 position ids.
  """
  b, l = input_ids.shape
  if not config.is_roberta:
    return jnp.broadcast_to(jnp.arange(l, dtype=jnp.int32), (b, l))
  real = (input_ids != config.pad_token_id).astype(jnp.int32)
  return jnp.cumsum(real, axis=1) * real + config.pad_token_id


class Embeddings(nn.Module):
  """Word + position + token-type embeddings, then LayerNorm and dropout.

  With `type_vocab_size` 0 (DistilBERT) there is no token-type table and
  `token_type_ids` are ignored, so every caller may pass them.
  """

  config: ModelConfig

  @nn.compact
  def __call__(self, input_ids, token_type_ids, position_ids, deterministic):
    cfg = self.config

    def embed(num, axes, name):
      return nn.Embed(
        num,
        cfg.hidden_size,
        dtype=layers.dtype(cfg.dtype),
        param_dtype=layers.dtype(cfg.param_dtype),
        embedding_init=nn.with_logical_partitioning(layers.init(cfg), axes),
        name=name,
      )

    words = embed(cfg.padded_vocab_size, ("vocab", "embed"), "word_embeddings")
    x = words(input_ids)  # [b, l, d]
    x = x + embed(
      cfg.max_position_embeddings, ("position", "embed"), "position_embeddings"
    )(position_ids)
    if cfg.type_vocab_size:  # 0: no token types (DistilBERT); ids ignored
      x = x + embed(
        cfg.type_vocab_size, ("token_type", "embed"), "token_type_embeddings"
      )(token_type_ids)
    x = layers.layer_norm(cfg, "LayerNorm")(x)
    x = nn.Dropout(cfg.hidden_dropout_prob)(x, deterministic=deterministic)
    return layers.constrain(x, ("batch", "length", "act_embed"))


class SelfAttention(nn.Module):
  """Multi-head self-attention; returns context and attention probabilities.

  With `want_probs` False and no active attention dropout the layer calls
  `jax.nn.dot_product_attention` and returns probs None: the probabilities
  never leave the fused attention, which is what a teacher layer without an
  attention loss term and inference need.
  """

  config: ModelConfig
  want_probs: bool = True

  @nn.compact
  def __call__(self, x, bias, deterministic):
    cfg = self.config
    b, l, _ = x.shape
    h, dh = cfg.num_attention_heads, cfg.head_dim

    def heads(name):
      y = layers.dense(cfg, cfg.hidden_size, ("embed", "joined_kv"), name)(x)
      y = y.reshape(b, l, h, dh)  # [b, l, h, dh]
      return layers.constrain(y, ("batch", "length", "act_heads", "kv"))

    q, k, v = heads("query"), heads("key"), heads("value")
    no_dropout = deterministic or cfg.attention_probs_dropout_prob == 0.0
    if not self.want_probs and no_dropout:
      ctx = jax.nn.dot_product_attention(q, k, v, bias=bias.astype(q.dtype))
      # ctx: [b, l, h, dh]
      return ctx.reshape(b, l, h * dh), None
    q = q / jnp.sqrt(dh).astype(q.dtype)
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k)  # [b, h, l, l]
    # Softmax in float32 whatever the compute dtype.
    scores = scores.astype(jnp.float32) + bias
    probs = jax.nn.softmax(scores, axis=-1)
    dropped = nn.Dropout(cfg.attention_probs_dropout_prob)(
      probs, deterministic=deterministic
    )
    ctx = jnp.einsum("bhqk,bkhd->bqhd", dropped.astype(v.dtype), v)
    ctx = ctx.reshape(b, l, h * dh)  # [b, l, d]
    return ctx, probs


class AttentionOutput(nn.Module):
  """Dense projection, dropout and residual post-LayerNorm."""

  config: ModelConfig
  in_axis: str

  @nn.compact
  def __call__(self, x, residual, deterministic):
    cfg = self.config
    x = layers.dense(cfg, cfg.hidden_size, (self.in_axis, "embed"), "dense")(x)
    x = nn.Dropout(cfg.hidden_dropout_prob)(x, deterministic=deterministic)
    return layers.layer_norm(cfg, "LayerNorm")(x + residual)


class Attention(nn.Module):
  config: ModelConfig
  want_probs: bool = True

  @nn.compact
  def __call__(self, x, bias, deterministic):
    ctx, probs = SelfAttention(self.config, self.want_probs, name="self")(
      x, bias, deterministic
    )
    out = AttentionOutput(self.config, "joined_kv", name="output")(
      ctx, x, deterministic
    )
    return out, probs


class Intermediate(nn.Module):
  config: ModelConfig

  @nn.compact
  def __call__(self, x):
    cfg = self.config
    x = layers.dense(cfg, cfg.intermediate_size, ("embed", "mlp"), "dense")(x)
    x = layers.ACTIVATIONS[cfg.hidden_act](x)
    return layers.constrain(x, ("batch", "length", "act_mlp"))


class Layer(nn.Module):
  """One post-LN transformer layer (BERT layout)."""

  config: ModelConfig
  want_probs: bool = True

  @nn.compact
  def __call__(self, x, bias, deterministic):
    attn, probs = Attention(self.config, self.want_probs, name="attention")(
      x, bias, deterministic
    )
    y = Intermediate(self.config, name="intermediate")(attn)
    y = AttentionOutput(self.config, "mlp", name="output")(
      y, attn, deterministic
    )
    return layers.constrain(y, ("batch", "length", "act_embed")), probs


class LayerCollection(nn.Module):
  """Holds layers named "0".."L-1" so paths read `encoder/layer/3/...`.

  `prob_layers`: the layers whose attention probabilities are returned
  (the others return None and may use the fused attention path).
  """

  config: ModelConfig
  prob_layers: tuple[int, ...] = ()

  @nn.compact
  def __call__(self, x, bias, deterministic):
    states, probs = [], []
    for i in range(self.config.num_hidden_layers):
      layer = Layer(self.config, i in self.prob_layers, name=str(i))
      x, p = layer(x, bias, deterministic)
      states.append(x)
      probs.append(p)
    return states, probs


class Encoder(nn.Module):
  config: ModelConfig
  prob_layers: tuple[int, ...] = ()

  @nn.compact
  def __call__(self, x, bias, deterministic):
    return LayerCollection(self.config, self.prob_layers, name="layer")(
      x, bias, deterministic
    )


class Pooler(nn.Module):
  config: ModelConfig

  @nn.compact
  def __call__(self, x):  # x: [b, l, d]
    cfg = self.config
    y = layers.dense(cfg, cfg.hidden_size, ("embed", "embed_out"), "dense")(
      x[:, 0]
    )
    return jnp.tanh(y)


class BertBody(nn.Module):
  """Embeddings, layers and the optional pooler of BERT/RoBERTa.

  Model shares its scope with the body (nn.share_scope), so the parameters
  sit at the top of the tree (`embeddings/...`, `encoder/layer/N/...`,
  `pooler/...`), where HF conversion and checkpoints expect them.
  """

  config: ModelConfig

  @nn.compact
  def __call__(
    self,
    input_ids: jax.Array,
    attention_mask: jax.Array,
    token_type_ids: jax.Array | None,
    position_ids: jax.Array | None,
    deterministic: bool,
    prob_layers: tuple[int, ...],
  ) -> layers.BodyOutput:
    """input_ids, attention_mask [b, l]; see `Model.__call__` for the rest.

    `prob_layers`: the layers whose attention probabilities are returned.
    """
    cfg = self.config
    if token_type_ids is None:
      token_type_ids = jnp.zeros_like(input_ids)
    if position_ids is None:
      position_ids = position_ids_for(cfg, input_ids)
    embeddings = Embeddings(cfg, name="embeddings")
    x = embeddings(input_ids, token_type_ids, position_ids, deterministic)
    # Additive key-padding bias [b, 1, 1, l], float32 like the scores.
    bias = jnp.where(
      attention_mask[:, None, None, :] > 0, 0.0, layers.MASK_VALUE
    ).astype(jnp.float32)
    states, probs = Encoder(cfg, prob_layers, name="encoder")(
      x, bias, deterministic
    )
    hidden_states = (x, *states)
    pooled = None
    if cfg.add_pooler:
      pooled = Pooler(cfg, name="pooler")(hidden_states[-1])  # [b, d]
    table = embeddings.variables["params"]["word_embeddings"]["embedding"]
    return layers.BodyOutput(
      hidden_states=hidden_states,
      attentions=tuple(probs) if prob_layers else None,
      pooled=pooled,
      word_embeddings=nn.unbox(table),  # [padded_vocab, d]
      attention_mask=attention_mask,
    )
