"""The model: an encoder body plus the head named by `config.head`.

The body (model/bert.py: BERT/mBERT and RoBERTa/XLM-R; model/deberta.py:
DeBERTa-v2/v3) and the head
(model/heads.py, chosen through `heads.HEADS`) share the model's parameter
scope, so the tree reads `embeddings/...`, `encoder/layer/N/...`,
`pooler/...`, `lm_head/...` or `classifier/...`, as HF conversion
(checkpoint/hf.py) and checkpoints expect. Every parameter carries logical
axis names; the mapping to mesh axes lives in `bistil_jax.partitioning`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from bistil_jax.model import bert, deberta, heads
from bistil_jax.model.config import ModelConfig

# ModelConfig.family.body -> the encoder body module (returns
# layers.BodyOutput).
BODIES = {"bert": bert.BertBody, "deberta": deberta.DebertaBody}
# Top-level parameter groups of every body, by part of the model (what
# measure.count_parameters reports).
PARAM_GROUPS = {**bert.PARAM_GROUPS, **deberta.PARAM_GROUPS}
# Body -> matmul MACs (config, batch, seq_len) of one forward pass beyond
# the BERT-shaped layers every body has (measure.analytic_macs).
EXTRA_MACS = {"deberta": deberta.relative_macs}


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
      [b, l, l], rel [b, l, relations]; see model/heads.py), or None
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


def prob_layers_for(
  output_attentions: bool | Sequence[int], num_layers: int
) -> tuple[int, ...]:
  """The layers whose attention probabilities `output_attentions` asks for.

  Raises:
    ValueError: a layer index outside [0, num_layers).
  """
  n = num_layers
  if isinstance(output_attentions, bool):
    return tuple(range(n)) if output_attentions else ()
  layers = tuple(sorted({int(i) for i in output_attentions}))
  if any(not 0 <= i < n for i in layers):
    raise ValueError(f"output_attentions {layers} not in [0, {n})")
  return layers


class Model(nn.Module):
  """Encoder body plus the head named by `config.head`.

  Call as `model.apply({'params': params}, input_ids, attention_mask=...,
  token_type_ids=..., output_attentions=True)`; pass
  `deterministic=False` and a "dropout" rng to train with dropout.
  """

  config: ModelConfig

  def setup(self):
    # Shared scopes: the body's and the head's parameter groups sit at the
    # top of the tree, not under "body" / "head".
    self.body = BODIES[self.config.family.body](self.config)
    nn.share_scope(self, self.body)
    head = heads.HEADS[self.config.head].module_for(self.config)
    self.head = None if head is None else head(self.config)
    if self.head is not None:
      nn.share_scope(self, self.head)

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
    """Runs the body and the head.

    Args:
      input_ids: [b, l] int token ids.
      attention_mask: [b, l], 1 for real tokens, 0 for padding (default all 1).
      token_type_ids: [b, l] segment ids (default 0).
      position_ids: [b, l] (default: as HF derives them, see
        bert.position_ids_for).
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
    if attention_mask is None:
      attention_mask = jnp.ones_like(input_ids)
    prob_layers = prob_layers_for(
      output_attentions, self.config.num_hidden_layers
    )
    body = self.body(
      input_ids,
      attention_mask,
      token_type_ids,
      position_ids,
      deterministic,
      prob_layers,
    )
    logits = None
    if self.head is not None:
      logits = self.head(
        body,
        deterministic=deterministic,
        positions=logits_positions,
        arc_heads=heads,
      )
    return EncoderOutput(
      hidden_states=body.hidden_states,
      logits=logits,
      attentions=body.attentions,
      pooled=body.pooled,
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
