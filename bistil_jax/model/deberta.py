"""The DeBERTa-v2/v3 encoder body (mDeBERTa-v3), with disentangled attention.

Submodule names mirror transformers' DebertaV2 names
(`embeddings/word_embeddings`, `encoder/layer/3/attention/self/query_proj`,
`encoder/rel_embeddings`, `encoder/LayerNorm`, `pooler/dense`), so
conversion (checkpoint/hf.py `BODY_RULES["deberta"]`) is renames plus
transposes. The body returns `layers.BodyOutput` like every body.

What differs from BERT (model/bert.py), per layer with heads h of width dh
and the relative span s (`ModelConfig.rel_span`):

- scores = Q K^T / c + c2p + p2c with c = sqrt(dh * (1 + len(pos_att_type))):
  c2p[q, k] = Q_q . Pk[idx(q, k)] / c (content to position),
  p2c[q, k] = K_k . Pq[idx'(k, q)] / c (position to content), where Pk, Pq
  [2s, h, dh] are the relative-embedding table projected by `key_proj` /
  `query_proj` (`share_att_key`, v3) or by their own `pos_key_proj` /
  `pos_query_proj` (v2), idx = clip(R + s, 0, 2s - 1), idx' = clip(-R + s,
  0, 2s - 1), and R[i, j] the relative position i - j, log-bucketed when
  `position_buckets` > 0 (`relative_positions`).
- The table `encoder/rel_embeddings` [2s, d] is shared by every layer,
  LayerNormed once (`norm_rel_ebd` "layer_norm") and dropped out per layer.
- The mask is [b, 1, l, l] = key mask x query mask and replaces masked
  scores, so a padding query attends uniformly to every position (as
  transformers does); the embedding output is multiplied by the mask.
- No absolute positions when `position_biased_input` is false (v3), no
  token types when `type_vocab_size` is 0.
- The pooler is DeBERTa's ContextPooler: dropout, dense, `pooler_hidden_act`
  on the first token (`pooler/dense`, which HF keeps in the sequence
  classification class).

Not implemented (refused when config.json asks for them, model/config.py):
the ConvLayer of deberta-v2-xlarge (`conv_kernel_size`), `embedding_size`
other than `hidden_size`, and the `z_steps` enhanced mask decoder of the
original pre-training code (transformers runs none either).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from bistil_jax.model import bert, layers
from bistil_jax.model.config import ModelConfig

# Top-level parameter groups of this body, by part of the model (what
# measure.count_parameters reports); the relative table is the encoder's.
PARAM_GROUPS = {"embeddings": "embeddings", "encoder": "body", "pooler": "body"}


# ------------------------------------------------------- relative positions
def log_bucket_positions(
  rel: np.ndarray, bucket_size: int, max_position: int
) -> np.ndarray:
  """Log-bucketed relative positions, as transformers computes them.

  Distances below bucket_size // 2 stay exact; larger ones are mapped onto
  log-spaced buckets up to max_position. The arithmetic is float32 in
  transformers' order, so bucket edges round as they do there.

  Args:
    rel: [..] int relative positions.
    bucket_size: `position_buckets`.
    max_position: the maximum relative distance.

  Returns:
    [..] int64 bucketed positions in (-bucket_size, bucket_size).
  """
  f32 = np.float32
  sign = np.sign(rel)
  mid = bucket_size // 2
  abs_pos = np.where((rel < mid) & (rel > -mid), mid - 1, np.abs(rel))
  ratio = np.log(abs_pos.astype(f32) / f32(mid)) / np.log(
    f32((max_position - 1) / mid)
  )
  log_pos = np.ceil(ratio * f32(mid - 1)) + f32(mid)
  return np.where(abs_pos <= mid, rel, log_pos * sign).astype(np.int64)


def relative_positions(config: ModelConfig, length: int) -> np.ndarray:
  """R [l, l] int32: R[i, j] = i - j, log-bucketed when the config has
  `position_buckets` (a trace-time constant: it depends on shapes only)."""
  ids = np.arange(length, dtype=np.int64)
  rel = ids[:, None] - ids[None, :]
  if config.position_buckets > 0 and config.rel_max_positions > 0:
    rel = log_bucket_positions(
      rel, config.position_buckets, config.rel_max_positions
    )
  return rel.astype(np.int32)


def relative_indices(config: ModelConfig, length: int):
  """(c2p [l, l], p2c [l, l]) int32 rows of the [2s] relative table:
  clip(R + s) and clip(-R + s) into [0, 2s)."""
  rel, s = relative_positions(config, length), config.rel_span
  c2p = np.clip(rel + s, 0, 2 * s - 1).astype(np.int32)
  p2c = np.clip(-rel + s, 0, 2 * s - 1).astype(np.int32)
  return c2p, p2c


def used_rows(config: ModelConfig, length: int):
  """The rows of the [2s] relative table that sequences of `length` read,
  and (c2p, p2c) [l, l] indices into those rows.

  A sequence shorter than the span reads about 2l of the 2s rows (255 of
  512 for mDeBERTa at l = 128): projecting and scoring only those gives
  the same scores for half the work of transformers' whole table.
  """
  c2p, p2c = relative_indices(config, length)
  rows = np.unique(np.concatenate([c2p.ravel(), p2c.ravel()]))
  remap = np.searchsorted(rows, (c2p, p2c)).astype(np.int32)
  return rows.astype(np.int32), (remap[0], remap[1])


def relative_macs(config: ModelConfig, batch_size: int, seq_len: int) -> int:
  """Matmul MACs of the relative-attention terms of one forward pass.

  Per layer and per term of `pos_att_type`: projecting the r rows of the
  relative table that sequences of `seq_len` read (`used_rows`; r <= 2s;
  r d^2, once per batch, not per sequence) and the scores of every
  position against them, Q Pk^T or K Pq^T (l r d per sequence). The
  gathers that pick the [l, l] entries from them count nothing.
  """
  if not config.relative_attention:
    return 0
  d, r = config.hidden_size, len(used_rows(config, seq_len)[0])
  per_term = r * d * d + batch_size * seq_len * r * d
  return config.num_hidden_layers * len(config.pos_att_type) * per_term


# ------------------------------------------------------------------ modules
class Embeddings(nn.Module):
  """Word (+ position, + token-type) embeddings, LayerNorm, mask, dropout."""

  config: ModelConfig

  @nn.compact
  def __call__(self, input_ids, token_type_ids, position_ids, mask, det):
    """ids [b, l] int, mask [b, l] -> [b, l, d]."""
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

    x = embed(cfg.padded_vocab_size, ("vocab", "embed"), "word_embeddings")(
      input_ids
    )  # [b, l, d]
    if cfg.position_biased_input:
      x = x + embed(
        cfg.max_position_embeddings,
        ("position", "embed"),
        "position_embeddings",
      )(position_ids)
    if cfg.type_vocab_size > 0:
      x = x + embed(
        cfg.type_vocab_size, ("token_type", "embed"), "token_type_embeddings"
      )(token_type_ids)
    x = layers.layer_norm(cfg, "LayerNorm")(x)
    x = x * mask[:, :, None].astype(x.dtype)
    x = nn.Dropout(cfg.hidden_dropout_prob)(x, deterministic=det)
    return layers.constrain(x, ("batch", "length", "act_embed"))


def is_linear(rel_idx) -> bool:
  """Whether (c2p, p2c) [l, l] are the plain offsets c2p[q, k] = q - k + l
  - 1 and p2c[k, q] = q - k + l - 1 into 2l - 1 rows: no bucketing or
  clipping within these positions (mDeBERTa up to 128 tokens)."""
  c2p, p2c = (np.asarray(x) for x in rel_idx)
  l = c2p.shape[0]
  offsets = np.arange(l)[:, None] - np.arange(l)[None, :] + l - 1
  return np.array_equal(c2p, offsets) and np.array_equal(p2c, offsets.T)


def skew(x: jax.Array) -> jax.Array:
  """y[..., a, b] = x[..., a, b - a + l - 1] for x [..., l, 2l - 1] and
  y [..., l, l], by reshapes alone (no gather).

  Flattened, y[a, b] sits at l - 1 + a (2l - 2) + b = a (2l - 1) + (b - a +
  l - 1), which is row a, column b - a + l - 1 of x.
  """
  *lead, l, w = x.shape
  flat = x.reshape(*lead, l * w)[..., l - 1 : l - 1 + l * (w - 1)]
  return flat.reshape(*lead, l, w - 1)[..., :l]


def relative_scores(q, k, pk, pq, rel_idx):
  """The unscaled c2p + p2c terms, [b, h, l, l].

  Args:
    q, k: [b, l, h, dh] queries and keys.
    pk, pq: [r, h, dh] the relative table's rows as keys (c2p) and as
      queries (p2c); None leaves that term out.
    rel_idx: (c2p, p2c) [l, l] int32 numpy rows of pk / pq (`used_rows`),
      trace-time constants.
  """
  b, l, h, _ = q.shape
  shape = (b, h, l, l)
  linear = is_linear(rel_idx)
  c2p_idx, p2c_idx = (jnp.asarray(x) for x in rel_idx)
  out = jnp.zeros(shape, q.dtype)
  if pk is not None:
    c2p = jnp.einsum("bqhd,rhd->bhqr", q, pk)  # [b, h, l, r]
    # c2p[b, h, q, k] = Q_q . Pk[c2p_idx[q, k]]
    if linear:  # c2p_idx[q, k] = q - k + l - 1: reversed, a skew
      out = out + skew(c2p[..., ::-1])
    else:
      out = out + jnp.take_along_axis(
        c2p, jnp.broadcast_to(c2p_idx, shape), axis=-1
      )
  if pq is not None:
    p2c = jnp.einsum("bkhd,rhd->bhkr", k, pq)  # [b, h, l, r]
    # p2c[b, h, k, q] = K_k . Pq[p2c_idx[k, q]], then [b, h, q, k]
    if linear:  # p2c_idx[k, q] = q - k + l - 1: a skew
      p2c = skew(p2c)
    else:
      p2c = jnp.take_along_axis(p2c, jnp.broadcast_to(p2c_idx, shape), axis=-1)
    out = out + jnp.swapaxes(p2c, -1, -2)
  return out


class DisentangledSelfAttention(nn.Module):
  """Content-to-content plus the c2p / p2c terms; see the module docstring.

  The scores are always materialised (no fused path); probabilities are
  returned only when `want_probs`.
  """

  config: ModelConfig
  want_probs: bool = True

  @nn.compact
  def __call__(self, x, mask, rel, rel_idx, deterministic):
    """x [b, l, d]; mask [b, 1, l, l] bool; rel [r, d] (the rows of the
    relative table these positions read) or None; rel_idx (c2p, p2c) [l, l]
    int32 rows of `rel`, or None. Returns (context [b, l, d], probs
    [b, h, l, l] float32 or None)."""
    cfg = self.config
    h, dh = cfg.num_attention_heads, cfg.head_dim

    def proj(name):
      return layers.dense(cfg, cfg.hidden_size, ("embed", "joined_kv"), name)

    def heads(y):  # [..., d] -> [..., h, dh]
      y = y.reshape(*y.shape[:-1], h, dh)
      if y.ndim == 4:
        y = layers.constrain(y, ("batch", "length", "act_heads", "kv"))
      return y

    query, key = proj("query_proj"), proj("key_proj")
    q, k, v = heads(query(x)), heads(key(x)), heads(proj("value_proj")(x))
    scale = jnp.sqrt(jnp.float32(dh * (1 + len(cfg.pos_att_type))))
    scale = scale.astype(q.dtype)
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k / scale)  # [b, h, l, l]
    if cfg.relative_attention and cfg.pos_att_type:
      rel = nn.Dropout(cfg.hidden_dropout_prob)(
        rel, deterministic=deterministic
      )
      use = set(cfg.pos_att_type)
      if cfg.share_att_key:  # v3: the content projections
        pos_k, pos_q = key, query
      else:
        pos_k = proj("pos_key_proj") if "c2p" in use else None
        pos_q = proj("pos_query_proj") if "p2c" in use else None
      pk = heads(pos_k(rel)) if "c2p" in use else None  # [r, h, dh]
      pq = heads(pos_q(rel)) if "p2c" in use else None  # [r, h, dh]
      scores = scores + relative_scores(q, k, pk, pq, rel_idx) / scale
    # Masked scores are replaced (not offset), as in transformers: a query
    # with no real key (padding) attends uniformly. Softmax in float32.
    scores = jnp.where(mask, scores.astype(jnp.float32), layers.MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1)
    dropped = nn.Dropout(cfg.attention_probs_dropout_prob)(
      probs, deterministic=deterministic
    )
    ctx = jnp.einsum("bhqk,bkhd->bqhd", dropped.astype(v.dtype), v)
    ctx = ctx.reshape(*x.shape[:2], h * dh)  # [b, l, d]
    return ctx, probs if self.want_probs else None


class Attention(nn.Module):
  config: ModelConfig
  want_probs: bool = True

  @nn.compact
  def __call__(self, x, mask, rel, rel_idx, deterministic):
    ctx, probs = DisentangledSelfAttention(
      self.config, self.want_probs, name="self"
    )(x, mask, rel, rel_idx, deterministic)
    out = bert.AttentionOutput(self.config, "joined_kv", name="output")(
      ctx, x, deterministic
    )
    return out, probs


class Layer(nn.Module):
  """One post-LN layer: disentangled attention, then BERT's FFN block."""

  config: ModelConfig
  want_probs: bool = True

  @nn.compact
  def __call__(self, x, mask, rel, rel_idx, deterministic):
    """x [b, l, d] -> ([b, l, d], probs [b, h, l, l] or None)."""
    attn, probs = Attention(self.config, self.want_probs, name="attention")(
      x, mask, rel, rel_idx, deterministic
    )
    y = bert.Intermediate(self.config, name="intermediate")(attn)
    y = bert.AttentionOutput(self.config, "mlp", name="output")(
      y, attn, deterministic
    )
    return layers.constrain(y, ("batch", "length", "act_embed")), probs


class LayerCollection(nn.Module):
  """Layers named "0".."L-1" (`encoder/layer/3/...`)."""

  config: ModelConfig
  prob_layers: tuple[int, ...] = ()

  @nn.compact
  def __call__(self, x, mask, rel, rel_idx, deterministic):
    states, probs = [], []
    for i in range(self.config.num_hidden_layers):
      layer = Layer(self.config, i in self.prob_layers, name=str(i))
      x, p = layer(x, mask, rel, rel_idx, deterministic)
      states.append(x)
      probs.append(p)
    return states, probs


class Encoder(nn.Module):
  """The layers and the relative table (`encoder/rel_embeddings`, with its
  `encoder/LayerNorm` when `norm_rel_ebd` says layer_norm)."""

  config: ModelConfig
  prob_layers: tuple[int, ...] = ()

  @nn.compact
  def __call__(self, x, mask, deterministic):
    """x [b, l, d], mask [b, 1, l, l] bool -> (L states, L probs)."""
    cfg = self.config
    rel, rel_idx = None, None
    if cfg.relative_attention:
      s2 = 2 * cfg.rel_span
      table = nn.Embed(
        s2,
        cfg.hidden_size,
        dtype=layers.dtype(cfg.dtype),
        param_dtype=layers.dtype(cfg.param_dtype),
        embedding_init=nn.with_logical_partitioning(
          layers.init(cfg), ("rel_position", "embed")
        ),
        name="rel_embeddings",
      )
      rel = table(jnp.arange(s2))  # [2s, d]
      norms = {t.strip() for t in cfg.norm_rel_ebd.lower().split("|")}
      if "layer_norm" in norms:
        rel = layers.layer_norm(cfg, "LayerNorm")(rel)
      # Only the rows these positions read (LayerNorm is per row, so
      # slicing after it changes nothing).
      rows, rel_idx = used_rows(cfg, x.shape[1])
      rel = rel[rows]  # [r, d]
    return LayerCollection(cfg, self.prob_layers, name="layer")(
      x, mask, rel, rel_idx, deterministic
    )


class ContextPooler(nn.Module):
  """DeBERTa's pooler: dropout, dense, activation on the first token."""

  config: ModelConfig

  @nn.compact
  def __call__(self, x, deterministic):  # x: [b, l, d] -> [b, d]
    cfg = self.config
    y = nn.Dropout(cfg.pooler_dropout)(x[:, 0], deterministic=deterministic)
    y = layers.dense(cfg, cfg.hidden_size, ("embed", "embed_out"), "dense")(y)
    return layers.ACTIVATIONS[cfg.pooler_hidden_act](y)


class DebertaBody(nn.Module):
  """Embeddings, layers and the optional ContextPooler of DeBERTa-v2/v3.

  Shares Model's scope (nn.share_scope), so parameters sit at the top of
  the tree (`embeddings/...`, `encoder/...`, `pooler/...`).
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
    b, l = input_ids.shape
    if token_type_ids is None:
      token_type_ids = jnp.zeros_like(input_ids)
    if position_ids is None:
      position_ids = jnp.broadcast_to(jnp.arange(l, dtype=jnp.int32), (b, l))
    embeddings = Embeddings(cfg, name="embeddings")
    x = embeddings(
      input_ids, token_type_ids, position_ids, attention_mask, deterministic
    )
    real = attention_mask > 0  # [b, l]
    mask = real[:, None, :, None] & real[:, None, None, :]  # [b, 1, l, l]
    states, probs = Encoder(cfg, prob_layers, name="encoder")(
      x, mask, deterministic
    )
    hidden_states = (x, *states)
    pooled = None
    if cfg.add_pooler:
      pooled = ContextPooler(cfg, name="pooler")(
        hidden_states[-1], deterministic
      )  # [b, d]
    table = embeddings.variables["params"]["word_embeddings"]["embedding"]
    return layers.BodyOutput(
      hidden_states=hidden_states,
      attentions=tuple(probs) if prob_layers else None,
      pooled=pooled,
      word_embeddings=nn.unbox(table),  # [padded_vocab, d]
      attention_mask=attention_mask,
    )
