"""Flax linen encoder for BERT (mBERT) and RoBERTa (XLM-R) checkpoints.

Submodule names mirror the PyTorch/HF-Flax names (`embeddings/word_embeddings`,
`encoder/layer/3/attention/self/query`, `LayerNorm`), so conversion is renames
plus transposes. Every parameter carries logical axis names; the mapping to
mesh axes lives in `bistil_jax.partitioning`.

Heads use one naming scheme for both families: `lm_head/{dense,layer_norm,
bias[,decoder]}` (MLM) and `classifier/...` (task heads; XLM-R's sequence head
is `classifier/{dense,out_proj}`). checkpoint/hf.py maps these to each
family's HF names.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from bistil_jax.model.config import ModelConfig

# Large negative, finite value for masked logits: exp() underflows to 0 while
# 0 * log_softmax stays finite (finfo.min would overflow to -inf and give NaN).
MASK_VALUE = -1e9

_ACTIVATIONS = {
  "gelu": lambda x: nn.gelu(x, approximate=False),
  "gelu_new": lambda x: nn.gelu(x, approximate=True),
  "gelu_pytorch_tanh": lambda x: nn.gelu(x, approximate=True),
  "relu": nn.relu,
  "tanh": jnp.tanh,
}


@flax.struct.dataclass
class EncoderOutput:
  """What the model returns.

  Attributes:
    hidden_states: tuple of L+1 arrays [b, l, d]; index 0 is the embedding
      output, index i the output of layer i (HF order).
    logits: MLM logits [b, l, padded_vocab] (padded columns hold MASK_VALUE),
      token-classification logits [b, l, labels], sequence-classification
      logits [b, labels], span (question-answering) logits [b, l, 2] with
      start at [..., 0] and end at [..., 1], the biaffine parser's pair (arc
      [b, l, l], rel [b, l, relations]; see model/parser.py), or None
      without a head.
    attentions: tuple of L entries, [b, heads, l, l] post-softmax attention
      probabilities for the requested layers and None for the others; None
      when none was requested.
    pooled: the pooler output [b, d] when the model has a pooler.
  """

  hidden_states: tuple[jax.Array, ...]
  logits: jax.Array | None = None
  attentions: tuple[jax.Array, ...] | None = None
  pooled: jax.Array | None = None

  @property
  def last_hidden_state(self) -> jax.Array:
    return self.hidden_states[-1]


def _dtype(name: str):
  return jnp.dtype(name)


def _init(config: ModelConfig):
  return nn.initializers.normal(stddev=config.initializer_range)


def _dense(config, features, axes, name, use_bias=True):
  """nn.Dense with logical axis names on kernel and bias."""
  return nn.Dense(
    features,
    use_bias=use_bias,
    dtype=_dtype(config.dtype),
    param_dtype=_dtype(config.param_dtype),
    kernel_init=nn.with_logical_partitioning(_init(config), axes),
    bias_init=nn.with_logical_partitioning(
      nn.initializers.zeros_init(), axes[-1:]
    ),
    name=name,
  )


def _layer_norm(config, name):
  return nn.LayerNorm(
    epsilon=config.layer_norm_eps,
    dtype=_dtype(config.dtype),
    param_dtype=_dtype(config.param_dtype),
    scale_init=nn.with_logical_partitioning(
      nn.initializers.ones_init(), ("embed",)
    ),
    bias_init=nn.with_logical_partitioning(
      nn.initializers.zeros_init(), ("embed",)
    ),
    name=name,
  )


def _constrain(x, axes):
  return nn.with_logical_constraint(x, axes)


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


def vocab_logits_mask(config: ModelConfig) -> jax.Array:
  """[padded_vocab] bool, True for real vocabulary columns."""
  return jnp.arange(config.padded_vocab_size) < config.vocab_size


class Embeddings(nn.Module):
  """Word + position + token-type embeddings, then LayerNorm and dropout."""

  config: ModelConfig

  @nn.compact
  def __call__(self, input_ids, token_type_ids, position_ids, deterministic):
    cfg = self.config

    def embed(num, axes, name):
      return nn.Embed(
        num,
        cfg.hidden_size,
        dtype=_dtype(cfg.dtype),
        param_dtype=_dtype(cfg.param_dtype),
        embedding_init=nn.with_logical_partitioning(_init(cfg), axes),
        name=name,
      )

    words = embed(cfg.padded_vocab_size, ("vocab", "embed"), "word_embeddings")
    x = words(input_ids)  # [b, l, d]
    x = x + embed(
      cfg.max_position_embeddings, ("position", "embed"), "position_embeddings"
    )(position_ids)
    x = x + embed(
      cfg.type_vocab_size, ("token_type", "embed"), "token_type_embeddings"
    )(token_type_ids)
    x = _layer_norm(cfg, "LayerNorm")(x)
    x = nn.Dropout(cfg.hidden_dropout_prob)(x, deterministic=deterministic)
    return _constrain(x, ("batch", "length", "act_embed"))


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
      y = _dense(cfg, cfg.hidden_size, ("embed", "joined_kv"), name)(x)
      y = y.reshape(b, l, h, dh)  # [b, l, h, dh]
      return _constrain(y, ("batch", "length", "act_heads", "kv"))

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
    x = _dense(cfg, cfg.hidden_size, (self.in_axis, "embed"), "dense")(x)
    x = nn.Dropout(cfg.hidden_dropout_prob)(x, deterministic=deterministic)
    return _layer_norm(cfg, "LayerNorm")(x + residual)


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
    x = _dense(cfg, cfg.intermediate_size, ("embed", "mlp"), "dense")(x)
    x = _ACTIVATIONS[cfg.hidden_act](x)
    return _constrain(x, ("batch", "length", "act_mlp"))


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
    return _constrain(y, ("batch", "length", "act_embed")), probs


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
    y = _dense(cfg, cfg.hidden_size, ("embed", "embed_out"), "dense")(x[:, 0])
    return jnp.tanh(y)


class MLMHead(nn.Module):
  """dense -> activation -> LayerNorm -> tied (or own) decoder + bias."""

  config: ModelConfig

  @nn.compact
  def __call__(self, x, word_embeddings):
    cfg = self.config
    x = _dense(cfg, cfg.hidden_size, ("embed", "embed_out"), "dense")(x)
    x = _ACTIVATIONS[cfg.hidden_act](x)
    x = _layer_norm(cfg, "layer_norm")(x)
    if cfg.tie_word_embeddings:
      logits = jnp.einsum(
        "bld,vd->blv", x, word_embeddings.astype(_dtype(cfg.dtype))
      )
    else:
      logits = _dense(
        cfg, cfg.padded_vocab_size, ("embed", "vocab"), "decoder", False
      )(x)
    bias = self.param(
      "bias",
      nn.with_logical_partitioning(nn.initializers.zeros_init(), ("vocab",)),
      (cfg.padded_vocab_size,),
      _dtype(cfg.param_dtype),
    )
    logits = logits.astype(jnp.float32) + bias.astype(jnp.float32)
    logits = jnp.where(vocab_logits_mask(cfg), logits, MASK_VALUE)
    return _constrain(logits, ("batch", "length", "act_vocab"))


def _classifier_dropout(config: ModelConfig) -> float:
  if config.classifier_dropout is None:
    return config.hidden_dropout_prob
  return config.classifier_dropout


class RobertaClassifier(nn.Module):
  """RoBERTa sequence head: dense + tanh on <s>, then out_proj."""

  config: ModelConfig

  @nn.compact
  def __call__(self, hidden, deterministic):  # hidden: [b, l, d]
    cfg = self.config
    drop = nn.Dropout(_classifier_dropout(cfg))
    x = drop(hidden[:, 0], deterministic=deterministic)
    x = _dense(cfg, cfg.hidden_size, ("embed", "embed_out"), "dense")(x)
    x = drop(jnp.tanh(x), deterministic=deterministic)
    return _dense(cfg, cfg.num_labels, ("embed_out", "classes"), "out_proj")(x)


class Model(nn.Module):
  """Encoder plus the head named by `config.head`.

  Call as `model.apply({'params': params}, input_ids, attention_mask=...,
  token_type_ids=..., output_attentions=True)`; pass
  `deterministic=False` and a "dropout" rng to train with dropout.
  """

  config: ModelConfig

  @nn.compact
  def __call__(
    self,
    input_ids: jax.Array,
    attention_mask: jax.Array | None = None,
    token_type_ids: jax.Array | None = None,
    position_ids: jax.Array | None = None,
    *,
    deterministic: bool = True,
    output_attentions: bool | Sequence[int] = False,
    logits_positions: jax.Array | None = None,
    heads: jax.Array | None = None,
  ) -> EncoderOutput:
    """Runs the encoder and head.

    Args:
      input_ids: [b, l] int token ids.
      attention_mask: [b, l], 1 for real tokens, 0 for padding (default all 1).
      token_type_ids: [b, l] segment ids (default 0).
      position_ids: [b, l] (default: as HF derives them, see position_ids_for).
      deterministic: False enables dropout (needs a "dropout" rng).
      output_attentions: also return attention probabilities: True for
        every layer, or a sequence of layer indices (the other entries of
        `attentions` are then None and those layers use the fused
        `jax.nn.dot_product_attention`, which never materialises the
        probabilities outside the attention). False: no probabilities, every
        layer fused.
      logits_positions: [b, p] int positions; per-token heads (MLM, token
        classification) then run only there and logits are [b, p, ...]. The
        MLM head over a 120k-250k vocabulary is most of a step's FLOPs, so
        distillation evaluates it at masked positions only.
      heads: biaffine parser only: [b, l] head position of each position,
        where its relation scores are computed (gold heads in training);
        None: at the predicted (argmax arc) heads.

    Returns:
      EncoderOutput.
    """
    cfg = self.config
    if attention_mask is None:
      attention_mask = jnp.ones_like(input_ids)
    if token_type_ids is None:
      token_type_ids = jnp.zeros_like(input_ids)
    if position_ids is None:
      position_ids = position_ids_for(cfg, input_ids)
    embeddings = Embeddings(cfg, name="embeddings")
    x = embeddings(input_ids, token_type_ids, position_ids, deterministic)
    # Additive key-padding bias [b, 1, 1, l], float32 like the scores.
    bias = jnp.where(attention_mask[:, None, None, :] > 0, 0.0, MASK_VALUE)
    bias = bias.astype(jnp.float32)
    n = cfg.num_hidden_layers
    if isinstance(output_attentions, bool):
      prob_layers = tuple(range(n)) if output_attentions else ()
    else:
      prob_layers = tuple(sorted({int(i) for i in output_attentions}))
      if any(not 0 <= i < n for i in prob_layers):
        raise ValueError(f"output_attentions {prob_layers} not in [0, {n})")
    states, probs = Encoder(cfg, prob_layers, name="encoder")(
      x, bias, deterministic
    )
    hidden_states = (x, *states)
    last = hidden_states[-1]  # [b, l, d]
    pooled = Pooler(cfg, name="pooler")(last) if cfg.add_pooler else None
    per_token = last
    if logits_positions is not None:
      per_token = jnp.take_along_axis(
        last, logits_positions[..., None].astype(jnp.int32), axis=1
      )  # [b, p, d]
    logits = None
    if cfg.head == "mlm":
      table = embeddings.variables["params"]["word_embeddings"]["embedding"]
      logits = MLMHead(cfg, name="lm_head")(per_token, nn.unbox(table))
    elif cfg.head == "token_classification":
      x = nn.Dropout(_classifier_dropout(cfg))(
        per_token, deterministic=deterministic
      )
      logits = _dense(cfg, cfg.num_labels, ("embed", "classes"), "classifier")(
        x
      )  # [b, l, labels]
    elif cfg.head == "sequence_classification" and cfg.is_roberta:
      logits = RobertaClassifier(cfg, name="classifier")(last, deterministic)
    elif cfg.head == "sequence_classification":
      if pooled is None:
        raise ValueError("BERT sequence classification needs add_pooler=True")
      x = nn.Dropout(_classifier_dropout(cfg))(
        pooled, deterministic=deterministic
      )
      logits = _dense(cfg, cfg.num_labels, ("embed", "classes"), "classifier")(
        x
      )  # [b, labels]
    elif cfg.head == "biaffine_parser":
      from bistil_jax.model.parser import BiaffineParser  # noqa: PLC0415

      logits = BiaffineParser(cfg, name="classifier")(
        last, attention_mask, heads, deterministic
      )  # (arc [b, l, l], rel [b, l, R])
    elif cfg.head == "question_answering":
      # HF's qa_outputs: one dense layer to (start, end), no dropout.
      logits = _dense(cfg, cfg.num_labels, ("embed", "classes"), "classifier")(
        last
      ).astype(jnp.float32)  # [b, l, 2]
    return EncoderOutput(
      hidden_states=hidden_states,
      logits=logits,
      attentions=tuple(probs) if prob_layers else None,
      pooled=pooled,
    )


def init_params(
  config: ModelConfig, rng: jax.Array, seq_len: int = 8
) -> dict[str, Any]:
  """Randomly initialised, unboxed parameters (HF-style init)."""
  model = Model(config)
  ids = jnp.zeros((1, seq_len), jnp.int32)
  variables = model.init(rng, ids)
  return nn.unbox(variables["params"])


def abstract_params(config: ModelConfig, seq_len: int = 8):
  """Boxed ShapeDtypeStructs of the params: shapes and logical axis names."""
  model = Model(config)
  ids = jax.ShapeDtypeStruct((1, seq_len), jnp.int32)
  return jax.eval_shape(
    lambda: model.init(jax.random.PRNGKey(0), jnp.zeros(ids.shape, ids.dtype))
  )["params"]
