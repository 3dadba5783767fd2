"""Heads: what runs on an encoder body's output, for any body.

A head reads `layers.BodyOutput` (hidden states, pooled output, word
embeddings, attention mask) and never asks which family produced it. Every
head module is called as `head(body, deterministic=..., positions=...,
arc_heads=...)` and returns the logits that `EncoderOutput.logits` holds.

Model shares its scope with the head (nn.share_scope), so a head names its
own top-level parameter group: `lm_head/{dense,layer_norm,bias[,decoder]}`
(MLM) or `classifier/...` (task heads; XLM-R's and DistilBERT's sequence
heads are `classifier/{dense,out_proj}`). checkpoint/hf.py maps these to each family's
HF names. `HEADS` is the table of heads by `config.head`: adding a head is a
module here and one entry there.

The biaffine parser (`config.head = "biaffine_parser"`, docs/method.md 4.2,
4.3, 5.1) keeps its params under `classifier`, so LT-SFT
(sparse.HEAD_KEYS) trains and stores it densely, like every task head. It
reads only the last hidden state. Scorers, on the first sub-word vector of
each word (x) and every candidate head position (y; [CLS]/<s> at position 0
stands for the root):

- arc(x, y) = [x; 1]^T W_arc y: biaffine with the bias on the dependent side
  only (a per-head prior), W_arc = [kernel [d, d]; bias [d]].
- rel(x, y)_r = [x; 1]^T W_r [y; 1]: biaffine with both biases,
  W_r = [[kernel[:, r, :], dep[:, r]], [head[:, r], bias[r]]].

All weights start at zero, as released: an untrained parser gives every
candidate the same score. Dropout (the classifier dropout, by default
`hidden_dropout_prob`) is applied to the encoder output, as released.

Its logits are the pair (arc [b, l, l], rel [b, l, R]):

- arc[b, i, j]: score of position j as the head of position i, over every
  position; padded keys hold MASK_VALUE (probability 0).
- rel[b, i, r]: relation scores of position i *at one head*: the `heads`
  given to the model (gold heads in training, docs/method.md 4.3), else the
  argmax head of arc (prediction). Computing rel at one head per dependent
  keeps memory at O(b l R d) instead of the O(b l^2 R) of all head
  candidates (at l = 256, R = 38 that is 2.5M floats per sentence).

NOTE (deviation, documented): the released parser represents a word by the
mean of its sub-word vectors and lists only words as candidates; here a word
is its first sub-word (the same positions the token tasks use) and every
non-padding position is a candidate head, so no word-pooling input is needed
and distillation compares distributions over the same positions for both
models. Its export layout is checkpoint/parser_head.py's.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from bistil_jax.model import layers
from bistil_jax.model.config import ModelConfig
from bistil_jax.model.layers import BodyOutput


def at_positions(x: jax.Array, positions: jax.Array | None) -> jax.Array:
  """x [b, l, d] at positions [b, p] -> [b, p, d]; x itself for None."""
  if positions is None:
    return x
  return jnp.take_along_axis(
    x, positions[..., None].astype(jnp.int32), axis=1
  )  # [b, p, d]


class MLMHead(nn.Module):
  """dense -> activation -> LayerNorm -> tied (or own) decoder + bias."""

  config: ModelConfig

  @nn.compact
  def __call__(self, x, word_embeddings):
    cfg = self.config
    x = layers.dense(cfg, cfg.hidden_size, ("embed", "embed_out"), "dense")(x)
    x = layers.ACTIVATIONS[cfg.hidden_act](x)
    x = layers.layer_norm(cfg, "layer_norm")(x)
    if cfg.tie_word_embeddings:
      logits = jnp.einsum(
        "bld,vd->blv", x, word_embeddings.astype(layers.dtype(cfg.dtype))
      )
    else:
      logits = layers.dense(
        cfg, cfg.padded_vocab_size, ("embed", "vocab"), "decoder", False
      )(x)
    bias = self.param(
      "bias",
      nn.with_logical_partitioning(nn.initializers.zeros_init(), ("vocab",)),
      (cfg.padded_vocab_size,),
      layers.dtype(cfg.param_dtype),
    )
    logits = logits.astype(jnp.float32) + bias.astype(jnp.float32)
    logits = jnp.where(layers.vocab_logits_mask(cfg), logits, layers.MASK_VALUE)
    return layers.constrain(logits, ("batch", "length", "act_vocab"))


class RobertaClassifier(nn.Module):
  """RoBERTa sequence head: dense + tanh on <s>, then out_proj."""

  config: ModelConfig

  @nn.compact
  def __call__(self, hidden, deterministic):  # hidden: [b, l, d]
    cfg = self.config
    drop = nn.Dropout(layers.classifier_dropout(cfg))
    x = drop(hidden[:, 0], deterministic=deterministic)
    x = layers.dense(cfg, cfg.hidden_size, ("embed", "embed_out"), "dense")(x)
    x = drop(jnp.tanh(x), deterministic=deterministic)
    return layers.dense(
      cfg, cfg.num_labels, ("embed_out", "classes"), "out_proj"
    )(x)


class DistilBertClassifier(nn.Module):
  """DistilBERT sequence head: dense (HF `pre_classifier`) + ReLU on the
  first token, dropout `seq_classif_dropout`, then out_proj (HF
  `classifier`); no dropout before the dense, as in HF."""

  config: ModelConfig

  @nn.compact
  def __call__(self, hidden, deterministic):
    """hidden [b, l, d] -> logits [b, labels]."""
    cfg = self.config
    x = layers.dense(cfg, cfg.hidden_size, ("embed", "embed_out"), "dense")(
      hidden[:, 0]
    )  # [b, d]
    x = nn.Dropout(cfg.seq_classif_dropout)(
      nn.relu(x), deterministic=deterministic
    )
    return layers.dense(
      cfg, cfg.num_labels, ("embed_out", "classes"), "out_proj"
    )(x)


def _zeros(axes):
  return nn.with_logical_partitioning(nn.initializers.zeros_init(), axes)


class BiaffineParser(nn.Module):
  """Arc and relation scorers; see the module docstring."""

  config: ModelConfig

  @nn.compact
  def __call__(self, hidden, attention_mask, heads, deterministic):
    """hidden [b, l, d], attention_mask [b, l], heads [b, l] or None.

    Returns (arc [b, l, l] float32, rel [b, l, R] float32).
    """
    cfg = self.config
    d, r = cfg.hidden_size, cfg.num_labels
    dt, pdt = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)

    def param(name, shape, axes):
      return self.param(name, _zeros(axes), shape, pdt).astype(dt)

    x = nn.Dropout(layers.classifier_dropout(cfg))(
      hidden, deterministic=deterministic
    ).astype(dt)  # [b, l, d]
    arc_k = param("arc_kernel", (d, d), ("embed", "embed_out"))
    arc_b = param("arc_bias", (d,), ("embed_out",))
    rel_k = param("rel_kernel", (d, r, d), ("embed", "classes", "embed_out"))
    rel_dep = param("rel_dep", (d, r), ("embed", "classes"))
    rel_head = param("rel_head", (d, r), ("embed_out", "classes"))
    rel_b = param("rel_bias", (r,), ("classes",))

    # arc[b, i, j] = x_i W x_j + bias . x_j
    dep = jnp.einsum("bid,de->bie", x, arc_k) + arc_b  # [b, l, d]
    arc = jnp.einsum("bie,bje->bij", dep, x).astype(jnp.float32)  # [b, l, l]
    keys = attention_mask[:, None, :] > 0  # [b, 1, l]
    arc = jnp.where(keys, arc, layers.MASK_VALUE)
    if heads is None:
      heads = jnp.argmax(arc, axis=-1)  # [b, l]
    heads = jnp.clip(heads, 0, x.shape[1] - 1).astype(jnp.int32)
    y = jnp.take_along_axis(x, heads[..., None], axis=1)  # [b, l, d]
    rel = (
      jnp.einsum("bid,dre,bie->bir", x, rel_k, y)
      + jnp.einsum("bid,dr->bir", x, rel_dep)
      + jnp.einsum("bie,er->bir", y, rel_head)
      + rel_b
    ).astype(jnp.float32)  # [b, l, R]
    return arc, rel


# ----------------------------------------------------------------- the heads
# Each is called with the body's output and names its parameter group.


class MaskedLM(nn.Module):
  """MLM logits [b, l or p, padded_vocab] (padded columns MASK_VALUE)."""

  config: ModelConfig

  @nn.compact
  def __call__(self, body: BodyOutput, *, deterministic, positions, arc_heads):
    del deterministic, arc_heads  # the MLM head has no dropout
    x = at_positions(body.last_hidden_state, positions)  # [b, p, d]
    return MLMHead(self.config, name="lm_head")(x, body.word_embeddings)


class TokenClassification(nn.Module):
  """Per-token logits [b, l or p, labels]."""

  config: ModelConfig

  @nn.compact
  def __call__(self, body: BodyOutput, *, deterministic, positions, arc_heads):
    del arc_heads
    cfg = self.config
    x = at_positions(body.last_hidden_state, positions)  # [b, p, d]
    x = nn.Dropout(layers.classifier_dropout(cfg))(
      x, deterministic=deterministic
    )
    return layers.dense(
      cfg, cfg.num_labels, ("embed", "classes"), "classifier"
    )(x)  # [b, p, labels]


class PooledClassification(nn.Module):
  """Sequence logits [b, labels] from the pooled output (BERT's layout)."""

  config: ModelConfig

  @nn.compact
  def __call__(self, body: BodyOutput, *, deterministic, positions, arc_heads):
    del positions, arc_heads
    cfg = self.config
    if body.pooled is None:
      raise ValueError(
        "sequence classification on the pooled output needs add_pooler=True"
      )
    x = nn.Dropout(layers.classifier_dropout(cfg))(
      body.pooled, deterministic=deterministic
    )
    return layers.dense(
      cfg, cfg.num_labels, ("embed", "classes"), "classifier"
    )(x)  # [b, labels]


class FirstTokenClassification(nn.Module):
  """Sequence logits [b, labels] from the first token through its own
  dense + tanh (RoBERTa's layout, `classifier/{dense,out_proj}`)."""

  config: ModelConfig

  @nn.compact
  def __call__(self, body: BodyOutput, *, deterministic, positions, arc_heads):
    del positions, arc_heads
    return RobertaClassifier(self.config, name="classifier")(
      body.last_hidden_state, deterministic
    )  # [b, labels]


class DistilBertFirstTokenClassification(nn.Module):
  """Sequence logits [b, labels] of DistilBERT's layout
  (`classifier/{dense,out_proj}`, HF `pre_classifier` and `classifier`)."""

  config: ModelConfig

  @nn.compact
  def __call__(self, body: BodyOutput, *, deterministic, positions, arc_heads):
    del positions, arc_heads
    return DistilBertClassifier(self.config, name="classifier")(
      body.last_hidden_state, deterministic
    )  # [b, labels]


class SpanClassification(nn.Module):
  """Span logits [b, l, 2] float32: start at [..., 0], end at [..., 1]."""

  config: ModelConfig

  @nn.compact
  def __call__(self, body: BodyOutput, *, deterministic, positions, arc_heads):
    del positions, arc_heads
    cfg = self.config
    # HF's qa_outputs: one dense layer to (start, end); dropout before it
    # only in DistilBERT's class (`qa_dropout`, None in other families).
    x = nn.Dropout(cfg.qa_dropout or 0.0)(
      body.last_hidden_state, deterministic=deterministic
    )  # [b, l, d]
    return layers.dense(
      cfg, cfg.num_labels, ("embed", "classes"), "classifier"
    )(x).astype(jnp.float32)  # [b, l, 2]


class DependencyParsing(nn.Module):
  """The biaffine parser's (arc [b, l, l], rel [b, l, R])."""

  config: ModelConfig

  @nn.compact
  def __call__(self, body: BodyOutput, *, deterministic, positions, arc_heads):
    del positions
    return BiaffineParser(self.config, name="classifier")(
      body.last_hidden_state, body.attention_mask, arc_heads, deterministic
    )


# ----------------------------------------------------------------- the table
@dataclasses.dataclass(frozen=True)
class Head:
  """One `config.head`, as the model and its measurements see it.

  Attributes:
    module: the head module Model calls (None: no head).
    key: its top-level parameter group (None: no parameters).
    macs: matmul multiply-accumulates of the head on one sequence of
      length l (fvcore's convention; see measure.analytic_macs).
    macs_cover_pooler: `macs` already counts the pooler's dense layer.
    by_model_type: model_type -> module where a family's HF class lays the
      head out differently (XLM-R's sequence head).
  """

  module: type[nn.Module] | None
  key: str | None
  macs: Callable[[ModelConfig, int], int]
  macs_cover_pooler: bool = False
  by_model_type: Mapping[str, type[nn.Module]] = dataclasses.field(
    default_factory=dict
  )

  def module_for(self, config: ModelConfig) -> type[nn.Module] | None:
    return self.by_model_type.get(config.model_type, self.module)


def _no_macs(config: ModelConfig, l: int) -> int:
  del config, l
  return 0


HEADS: dict[str, Head] = {
  "none": Head(None, None, _no_macs),
  "mlm": Head(
    MaskedLM,
    "lm_head",
    # dense, then the decoder over the padded vocabulary the program
    # computes (fvcore on the exported model would count vocab_size).
    lambda c, l: l * c.hidden_size**2 + l * c.hidden_size * c.padded_vocab_size,
  ),
  "token_classification": Head(
    TokenClassification,
    "classifier",
    lambda c, l: l * c.hidden_size * c.num_labels,
  ),
  "sequence_classification": Head(
    PooledClassification,
    "classifier",
    # The pooler or RoBERTa's dense, then the classifier, on one token.
    lambda c, l: c.hidden_size**2 + c.hidden_size * c.num_labels,
    macs_cover_pooler=True,
    by_model_type={
      "xlm-roberta": FirstTokenClassification,
      "roberta": FirstTokenClassification,
      "distilbert": DistilBertFirstTokenClassification,
    },
  ),
  # The parser's and the span head's matmuls have never been counted
  # (measure.analytic_macs documents the heads it counts).
  "biaffine_parser": Head(DependencyParsing, "classifier", _no_macs),
  "question_answering": Head(SpanClassification, "classifier", _no_macs),
}


def uses_pooler(config: ModelConfig, head: str) -> bool:
  """Whether `head` on `config`'s family reads the body's pooled output
  (BERT's sequence head; RoBERTa's and DistilBERT's read the first token)."""
  return HEADS[head].module_for(config) is PooledClassification
