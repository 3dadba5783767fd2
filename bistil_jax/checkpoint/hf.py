"""Hugging Face model dirs in and out: one rule table, strict both ways.

A rule relates one module of our parameter tree to its PyTorch and HF-Flax
names; the module kind says how its leaves are renamed and transformed
(PyTorch Linear weights are [out, in], ours [in, out]). Vocabulary-indexed
leaves are padded to `padded_vocab_size` on import and sliced on export.

Import refuses surprises: a checkpoint key no rule claims, a parameter the
model needs that no key provides, or a shape that disagrees with config.json
is a `BistilError` listing the keys. The only keys dropped silently-but-logged
are ones the model provably does not need (`KNOWN_UNUSED`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import pickle
import re
from collections.abc import Callable, Mapping
from typing import Any

import flax.serialization
import jax
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from bistil_jax import paths
from bistil_jax.checkpoint import parser_head
from bistil_jax.errors import BistilError
from bistil_jax.model.config import ModelConfig
from bistil_jax.model.encoder import Model, abstract_params

log = logging.getLogger(__name__)

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
TORCH_BIN = "pytorch_model.bin"
FLAX_MSGPACK = "flax_model.msgpack"
CONFIG = "config.json"
# What the run that wrote a model dir used and a later command should reuse
# (max_seq_len, read by `bistil evaluate`); not part of the HF format.
RUN_RECORD = "bistil_run.json"
TOKENIZER_FILES = (
  "tokenizer.json",
  "tokenizer_config.json",
  "special_tokens_map.json",
  "added_tokens.json",
  "vocab.txt",
  "sentencepiece.bpe.model",  # XLM-R's SentencePiece model
  "spm.model",  # DeBERTa-v3's
)

# Keys in published checkpoints that no supported class uses (BERT's NSP
# head, position-id buffers). They are dropped with a log line.
KNOWN_UNUSED = (
  re.compile(r"^cls\.seq_relationship\."),
  re.compile(r"(^|\.)embeddings\.position_ids$"),
  # DeBERTa-v3's replaced-token-detection head (transformers ignores it too).
  re.compile(r"^mask_predictions\."),
)


@dataclasses.dataclass(frozen=True)
class Rule:
  """One module: our path, PyTorch name, HF-Flax path (prefix-free)."""

  ours: str  # "/"-joined, "{i}" = layer index
  torch: str  # "."-joined
  flax: str  # "/"-joined
  kind: str  # dense | layernorm | embed | bias
  vocab: bool = False  # has a vocabulary axis (padded / sliced)
  body: bool = True  # lives under the bert./roberta. prefix
  tied: bool = False  # the MLM decoder: absent when tied to the embeddings


# kind -> ((our leaf, torch leaf, flax leaf, transpose), ...)
LEAVES = {
  "dense": (("kernel", "weight", "kernel", True), ("bias", "bias", "bias", 0)),
  "layernorm": (("scale", "weight", "scale", 0), ("bias", "bias", "bias", 0)),
  "embed": (("embedding", "weight", "embedding", 0),),
  "bias": (("bias", "bias", "bias", 0),),
  # A Linear whose bias another rule names (DistilBERT's vocab_projector).
  "projection": (("kernel", "weight", "kernel", True),),
}
# Old TF-converted checkpoints name LayerNorm leaves gamma/beta.
LEGACY_LEAVES = {"gamma": "weight", "beta": "bias"}

_L = "encoder/layer/{i}/"
_T = "encoder.layer.{i}."
BERT_BODY = (
    Rule("embeddings/word_embeddings", "embeddings.word_embeddings",
         "embeddings/word_embeddings", "embed", vocab=True),
    Rule("embeddings/position_embeddings", "embeddings.position_embeddings",
         "embeddings/position_embeddings", "embed"),
    Rule("embeddings/token_type_embeddings",
         "embeddings.token_type_embeddings",
         "embeddings/token_type_embeddings", "embed"),
    Rule("embeddings/LayerNorm", "embeddings.LayerNorm", "embeddings/LayerNorm",
         "layernorm"),
    Rule(_L + "attention/self/query", _T + "attention.self.query",
         _L + "attention/self/query", "dense"),
    Rule(_L + "attention/self/key", _T + "attention.self.key",
         _L + "attention/self/key", "dense"),
    Rule(_L + "attention/self/value", _T + "attention.self.value",
         _L + "attention/self/value", "dense"),
    Rule(_L + "attention/output/dense", _T + "attention.output.dense",
         _L + "attention/output/dense", "dense"),
    Rule(_L + "attention/output/LayerNorm", _T + "attention.output.LayerNorm",
         _L + "attention/output/LayerNorm", "layernorm"),
    Rule(_L + "intermediate/dense", _T + "intermediate.dense",
         _L + "intermediate/dense", "dense"),
    Rule(_L + "output/dense", _T + "output.dense", _L + "output/dense",
         "dense"),
    Rule(_L + "output/LayerNorm", _T + "output.LayerNorm",
         _L + "output/LayerNorm", "layernorm"),
    Rule("pooler/dense", "pooler.dense", "pooler/dense", "dense"),
)  # fmt: skip

# The embedding rules every family's body shares (DistilBERT less its token
# types).
_EMBEDDINGS = tuple(r for r in BERT_BODY if r.ours.startswith("embeddings/"))
_DL = "transformer/layer/{i}/"
_DT = "transformer.layer.{i}."
# DistilBERT on the BERT body: no token types, no pooler.
DISTILBERT_BODY = (
    *(r for r in _EMBEDDINGS if r.ours != "embeddings/token_type_embeddings"),
    Rule(_L + "attention/self/query", _DT + "attention.q_lin",
         _DL + "attention/q_lin", "dense"),
    Rule(_L + "attention/self/key", _DT + "attention.k_lin",
         _DL + "attention/k_lin", "dense"),
    Rule(_L + "attention/self/value", _DT + "attention.v_lin",
         _DL + "attention/v_lin", "dense"),
    Rule(_L + "attention/output/dense", _DT + "attention.out_lin",
         _DL + "attention/out_lin", "dense"),
    Rule(_L + "attention/output/LayerNorm", _DT + "sa_layer_norm",
         _DL + "sa_layer_norm", "layernorm"),
    Rule(_L + "intermediate/dense", _DT + "ffn.lin1", _DL + "ffn/lin1",
         "dense"),
    Rule(_L + "output/dense", _DT + "ffn.lin2", _DL + "ffn/lin2", "dense"),
    Rule(_L + "output/LayerNorm", _DT + "output_layer_norm",
         _DL + "output_layer_norm", "layernorm"),
)  # fmt: skip

_A = _L + "attention/self/"
_AT = _T + "attention.self."
DEBERTA_BODY = (
    *_EMBEDDINGS,
    Rule(_A + "query_proj", _AT + "query_proj", _A + "query_proj", "dense"),
    Rule(_A + "key_proj", _AT + "key_proj", _A + "key_proj", "dense"),
    Rule(_A + "value_proj", _AT + "value_proj", _A + "value_proj", "dense"),
    Rule(_A + "pos_key_proj", _AT + "pos_key_proj", _A + "pos_key_proj",
         "dense"),
    Rule(_A + "pos_query_proj", _AT + "pos_query_proj", _A + "pos_query_proj",
         "dense"),
    *(r for r in BERT_BODY if "attention/self/" not in r.ours
      and r.ours.startswith("encoder/")),  # attention output, FFN: BERT's
    Rule("encoder/rel_embeddings", "encoder.rel_embeddings",
         "encoder/rel_embeddings", "embed"),
    Rule("encoder/LayerNorm", "encoder.LayerNorm", "encoder/LayerNorm",
         "layernorm"),
    # The ContextPooler lives in HF's sequence-classification class, beside
    # (not under) the "deberta." body.
    Rule("pooler/dense", "pooler.dense", "pooler/dense", "dense", body=False),
)  # fmt: skip

# Naming family (ModelConfig.family.hf_names) -> the rules of its body.
BODY_RULES = {
  "bert": BERT_BODY,
  "roberta": BERT_BODY,
  "distilbert": DISTILBERT_BODY,
  "deberta": DEBERTA_BODY,
}
# Naming families transformers has no Flax classes for: their model dirs
# get no flax_model.msgpack.
NO_FLAX_CLASSES = frozenset({"deberta"})

_BERT_MLM = (
    Rule("lm_head/dense", "cls.predictions.transform.dense",
         "cls/predictions/transform/dense", "dense", body=False),
    Rule("lm_head/layer_norm", "cls.predictions.transform.LayerNorm",
         "cls/predictions/transform/LayerNorm", "layernorm", body=False),
    Rule("lm_head", "cls.predictions", "cls/predictions", "bias", vocab=True,
         body=False),
    Rule("lm_head/decoder", "cls.predictions.decoder",
         "cls/predictions/decoder", "dense", vocab=True, body=False,
         tied=True),
)  # fmt: skip
_ROBERTA_MLM = (
    Rule("lm_head/dense", "lm_head.dense", "lm_head/dense", "dense", body=False),
    Rule("lm_head/layer_norm", "lm_head.layer_norm", "lm_head/layer_norm",
         "layernorm", body=False),
    Rule("lm_head", "lm_head", "lm_head", "bias", vocab=True, body=False),
    Rule("lm_head/decoder", "lm_head.decoder", "lm_head/decoder", "dense",
         vocab=True, body=False, tied=True),
)  # fmt: skip
# DistilBERT's MLM head: the decoder's bias is vocab_projector.bias (ours
# lm_head/bias); its weight is absent when tied to the word embeddings.
_DISTILBERT_MLM = (
    Rule("lm_head/dense", "vocab_transform", "vocab_transform", "dense",
         body=False),
    Rule("lm_head/layer_norm", "vocab_layer_norm", "vocab_layer_norm",
         "layernorm", body=False),
    Rule("lm_head", "vocab_projector", "vocab_projector", "bias", vocab=True,
         body=False),
    Rule("lm_head/decoder", "vocab_projector", "vocab_projector",
         "projection", vocab=True, body=False, tied=True),
)  # fmt: skip
# DebertaV2ForMaskedLM with legacy=false (config.json): the decoder is
# always the word-embedding matrix, the head has no decoder of its own.
_DEBERTA_LM = (
    Rule("lm_head/dense", "lm_predictions.lm_head.dense",
         "lm_predictions/lm_head/dense", "dense", body=False),
    Rule("lm_head/layer_norm", "lm_predictions.lm_head.LayerNorm",
         "lm_predictions/lm_head/LayerNorm", "layernorm", body=False),
    Rule("lm_head", "lm_predictions.lm_head", "lm_predictions/lm_head", "bias",
         vocab=True, body=False),
)  # fmt: skip
# HF_HEADS' by_family key of that layout (see head_family).
DEBERTA_LM = "deberta-lm"
_LINEAR_CLS = (
  Rule("classifier", "classifier", "classifier", "dense", body=False),
)
# DistilBERT's sequence head: pre_classifier (dense + ReLU), classifier.
_DISTILBERT_SEQ = (
    Rule("classifier/dense", "pre_classifier", "pre_classifier", "dense",
         body=False),
    Rule("classifier/out_proj", "classifier", "classifier", "dense",
         body=False),
)  # fmt: skip
_ROBERTA_SEQ = (
    Rule("classifier/dense", "classifier.dense", "classifier/dense", "dense",
         body=False),
    Rule("classifier/out_proj", "classifier.out_proj", "classifier/out_proj",
         "dense", body=False),
)  # fmt: skip

# HF's span head: one Linear to (start, end) logits, same in both families.
_QA_SPAN = (
  Rule("classifier", "qa_outputs", "qa_outputs", "dense", body=False),
)

# In HF the MLM decoder bias is the same tensor as the head bias; checkpoints
# may store it under both names. alias -> canonical (prefix-free).
BIAS_ALIASES = {
  "cls.predictions.decoder.bias": "cls.predictions.bias",
  "lm_head.decoder.bias": "lm_head.bias",
}


@dataclasses.dataclass(frozen=True)
class SideFile:
  """A head no transformers class holds: its model dir is the bare encoder
  plus this file beside it (checkpoint/parser_head.py)."""

  name: str
  # (config, params) -> (encoder config, encoder params, the file's bytes)
  split: Callable[..., tuple[ModelConfig, dict[str, Any], bytes]]
  # (file path, encoder config, encoder params) -> (config, params)
  attach: Callable[..., tuple[ModelConfig, dict[str, Any]]]


@dataclasses.dataclass(frozen=True)
class HfHead:
  """How one `config.head` looks in an HF model dir.

  Attributes:
    rules: its rules (BERT's names).
    by_family: naming family ("roberta", "distilbert") -> rules where that
      family's HF class names the head differently.
    bare_body: its HF class is the bare *Model: body keys carry no
      "bert."/"roberta." prefix.
    pooled: its HF class holds a pooler.
    side_file: set for a head without an HF class.
  """

  rules: tuple[Rule, ...] = ()
  by_family: Mapping[str, tuple[Rule, ...]] = dataclasses.field(
    default_factory=dict
  )
  bare_body: bool = False
  pooled: bool = False
  side_file: SideFile | None = None

  def rules_for(self, family: str) -> tuple[Rule, ...]:
    return self.by_family.get(family, self.rules)

  def all_rules(self) -> tuple[Rule, ...]:
    return self.rules + sum(self.by_family.values(), ())


# config.head -> its HF layout: adding a head is one entry.
HF_HEADS = {
  "none": HfHead(bare_body=True, pooled=True),
  # DeBERTa's legacy (default) MLM head has BERT's names.
  "mlm": HfHead(
    _BERT_MLM,
    {
      "roberta": _ROBERTA_MLM,
      "distilbert": _DISTILBERT_MLM,
      DEBERTA_LM: _DEBERTA_LM,
    },
  ),
  "token_classification": HfHead(_LINEAR_CLS),
  "sequence_classification": HfHead(
    _LINEAR_CLS,
    {"roberta": _ROBERTA_SEQ, "distilbert": _DISTILBERT_SEQ},
    pooled=True,
  ),
  "biaffine_parser": HfHead(
    side_file=SideFile(
      parser_head.HEAD_FILE,
      parser_head.split_for_export,
      parser_head.attach_head,
    )
  ),
  "question_answering": HfHead(_QA_SPAN),
}


def family(config: ModelConfig) -> str:
  """The HF naming family ("bert", "roberta" for RoBERTa and XLM-R,
  "distilbert"); also the body prefix of its head classes."""
  return config.family.hf_names


def head_family(config: ModelConfig) -> str:
  """The key of HF_HEADS' `by_family` for this config: its naming family,
  or DEBERTA_LM for a DeBERTa whose config.json says legacy=false (its MLM
  head is `lm_predictions.lm_head`, not `cls.predictions`)."""
  if family(config) == "deberta" and not config.legacy:
    return DEBERTA_LM
  return family(config)


def head_rules(config: ModelConfig) -> tuple[Rule, ...]:
  """The head's rules for this family."""
  return HF_HEADS[config.head].rules_for(head_family(config))


def body_prefix(config: ModelConfig) -> str:
  """The naming family ("bert", ...) for head classes, "" for the bare
  *Model classes."""
  if HF_HEADS[config.head].bare_body:
    return ""
  return family(config)


@functools.cache
def _pattern(template: str) -> re.Pattern:
  """Anchored regex for a name template; "{i}" matches a layer index."""
  esc = re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)")
  return re.compile("^" + esc + "$")


@dataclasses.dataclass(frozen=True)
class _Leaf:
  ours: str
  torch: str
  flax: str
  transpose: bool
  vocab_axis: int | None  # axis of our array that is the vocabulary


def _leaf_table(config: ModelConfig) -> list[_Leaf]:
  """All (our, torch, flax) leaf templates for this config, prefixed."""
  prefix = body_prefix(config)
  out = []
  for rule in BODY_RULES[family(config)] + head_rules(config):
    tp = f"{prefix}." if (rule.body and prefix) else ""
    fp = f"{prefix}/" if (rule.body and prefix) else ""
    for ours, torch, flax_leaf, transpose in LEAVES[rule.kind]:
      vocab_axis = None
      if rule.vocab:  # embedding [V, d], bias [V]: 0; decoder kernel [d, V]: 1
        vocab_axis = 1 if ours == "kernel" else 0
      out.append(
        _Leaf(
          ours=f"{rule.ours}/{ours}",
          torch=f"{tp}{rule.torch}.{torch}",
          flax=f"{fp}{rule.flax}/{flax_leaf}",
          transpose=bool(transpose),
          vocab_axis=vocab_axis,
        )
      )
  return out


def _match(table, attr, key) -> tuple[_Leaf, dict] | None:
  for leaf in table:
    m = _pattern(getattr(leaf, attr)).match(key)
    if m:
      return leaf, m.groupdict()
  return None


def _fill(template: str, groups: dict) -> str:
  return template.format(**groups) if groups else template


def _pad_vocab(x: np.ndarray, axis: int, config: ModelConfig) -> np.ndarray:
  n = x.shape[axis]
  if n != config.vocab_size:
    raise BistilError(
      f"vocab size mismatch: config.json says vocab_size="
      f"{config.vocab_size} but the checkpoint has {n} vocabulary rows"
    )
  pad = [(0, 0)] * x.ndim
  pad[axis] = (0, config.padded_vocab_size - n)
  return np.pad(x, pad)


def _slice_vocab(x: np.ndarray, axis: int, config: ModelConfig) -> np.ndarray:
  return np.take(x, np.arange(config.vocab_size), axis=axis)


def _expected(config: ModelConfig) -> dict[str, Any]:
  return {
    "/".join(k): v for k, v in flatten_dict(abstract_params(config)).items()
  }


def _to_param(x: np.ndarray, config: ModelConfig) -> np.ndarray:
  return np.asarray(x, dtype=np.dtype(config.param_dtype))


def params_from_hf(
  state: dict[str, np.ndarray], config: ModelConfig, fmt: str
) -> dict[str, Any]:
  """Converts a flat HF state dict into our nested params.

  Args:
    state: flat names -> arrays, PyTorch names ("a.b.weight") when
      fmt == "torch", HF-Flax paths ("a/b/kernel") when fmt == "flax".
    config: the target model config (head, pooler, vocab size decided).
    fmt: "torch" or "flax".

  Returns:
    Nested dict of numpy arrays in `config.param_dtype`.

  Raises:
    BistilError: unmatched or missing keys, or mismatched shapes.
  """
  table = _leaf_table(config)
  state = dict(state)
  if fmt == "torch":
    state = _canonical_torch_state(state, config)
  flat, unmatched = {}, []
  for key, value in state.items():
    hit = _match(table, fmt, key)
    if hit is None:
      unmatched.append(key)
      continue
    leaf, groups = hit
    x = np.asarray(value)
    if fmt == "torch" and leaf.transpose:
      x = x.T
    if leaf.vocab_axis is not None:
      x = _pad_vocab(x, leaf.vocab_axis, config)
    flat[_fill(leaf.ours, groups)] = _to_param(x, config)
  expected = _expected(config)
  if unmatched:
    raise BistilError(
      f"checkpoint has {len(unmatched)} key(s) that {config.architecture} "
      f"does not use: {sorted(unmatched)[:20]}"
    )
  missing = sorted(set(expected) - set(flat))
  if missing:
    raise BistilError(
      f"checkpoint lacks {len(missing)} parameter(s) that "
      f"{config.architecture} needs: {missing[:20]}"
    )
  extra = sorted(set(flat) - set(expected))
  if extra:  # e.g. layer 7 in a 6-layer config
    raise BistilError(
      f"checkpoint has parameters outside config.json's architecture: "
      f"{extra[:20]}"
    )
  for key, x in flat.items():
    want = tuple(expected[key].value.shape)
    if x.shape != want:
      raise BistilError(
        f"shape mismatch for {key}: checkpoint {x.shape}, config.json "
        f"implies {want}"
      )
  return unflatten_dict({tuple(k.split("/")): v for k, v in flat.items()})


def _canonical_torch_state(state, config):
  """Drops known-unused keys, resolves bias aliases, legacy names, ties."""
  out = {}
  prefix = body_prefix(config)
  for key, value in state.items():
    if any(p.search(key) for p in KNOWN_UNUSED):
      log.info("dropping unused checkpoint key %s", key)
      continue
    parts = key.rsplit(".", 1)
    if len(parts) == 2 and parts[1] in LEGACY_LEAVES:
      key = f"{parts[0]}.{LEGACY_LEAVES[parts[1]]}"
    out[key] = value
  for alias, canon in BIAS_ALIASES.items():
    if alias in out:
      value = out.pop(alias)
      if canon in out and not np.array_equal(out[canon], value):
        raise BistilError(f"{alias} differs from {canon}; expected one tensor")
      out.setdefault(canon, value)
  tied = [r for r in head_rules(config) if r.tied]
  if tied and config.tie_word_embeddings:
    dec = f"{tied[0].torch}.weight"
    if dec in out:
      emb_key = (f"{prefix}." if prefix else "") + (
        "embeddings.word_embeddings.weight"
      )
      dec_w = out.pop(dec)
      if emb_key in out and not np.array_equal(out[emb_key], dec_w):
        raise BistilError(
          f"tie_word_embeddings is true but {dec} differs from the word "
          "embeddings; set tie_word_embeddings=false in config.json"
        )
  return out


def without_pooler(params: dict[str, Any], config: ModelConfig):
  """`params` less a pooler the HF class of `config` cannot hold (logged
  once)."""
  if "pooler" not in params or holds_pooler(config):
    return params
  keys = ["/".join(("pooler", *p)) for p in flatten_dict(params["pooler"])]
  log.info(
    "%s has no pooler; not exporting %s",
    config.architecture,
    ", ".join(sorted(keys)),
  )
  return {k: v for k, v in params.items() if k != "pooler"}


def holds_pooler(config: ModelConfig) -> bool:
  """Whether the HF class of `config` holds a pooler, from the tables: its
  head's class has one (`HfHead.pooled`), its family's body rules name one
  (DistilBERT's do not), and the pooler is in the body or the class is a
  head class (DeBERTa's ContextPooler sits in its sequence head's class,
  outside the bare DebertaV2Model)."""
  head = HF_HEADS[config.head]
  rules = [r for r in BODY_RULES[family(config)] if r.ours == "pooler/dense"]
  return head.pooled and any(r.body or not head.bare_body for r in rules)


def params_to_hf(
  params: dict[str, Any], config: ModelConfig, fmt: str
) -> dict[str, np.ndarray]:
  """Our params -> flat HF names (fmt "torch" or "flax"), vocab sliced.

  Leaves the target HF class cannot hold (a pooler on a class without one)
  are dropped with a log line.
  """
  table = _leaf_table(config)
  out = {}
  for path, value in flatten_dict(without_pooler(params, config)).items():
    key = "/".join(path)
    hit = _match(table, "ours", key)
    if hit is None:
      raise BistilError(f"no export rule for parameter {key}")
    leaf, groups = hit
    x = np.asarray(value, dtype=np.float32)
    if leaf.vocab_axis is not None:
      x = _slice_vocab(x, leaf.vocab_axis, config)
    if fmt == "torch" and leaf.transpose:
      x = x.T
    out[_fill(getattr(leaf, fmt), groups)] = np.ascontiguousarray(x)
  return out


# --------------------------------------------------------------------- files
def read_json(path: paths.PathLike) -> dict[str, Any]:
  """The JSON in `path`; BistilError if it is missing or unreadable."""
  try:
    return json.loads(paths.path(path).read_bytes())
  except FileNotFoundError:
    raise BistilError(f"missing {path}") from None
  except (OSError, ValueError) as e:
    raise BistilError(f"cannot read {path}: {e}") from None


def read_safetensors(path: paths.PathLike) -> dict[str, np.ndarray]:
  """The tensors of a safetensors file; BistilError if it is corrupt."""
  from safetensors import SafetensorError
  from safetensors.numpy import load_file

  try:
    # A local file is memory-mapped as it is; a remote one is downloaded.
    with paths.local_copy(path) as local:
      return load_file(local)
  except (SafetensorError, OSError, ValueError) as e:
    raise BistilError(f"corrupt or unreadable {path}: {e}") from None


# Keys under which training scripts commonly nest a model's state dict.
_TORCH_NESTING = ("state_dict", "model", "model_state_dict", "module")


def _read_torch_bin(path: str) -> dict[str, np.ndarray]:
  """A torch state dict as numpy, refusing anything but plain tensors.

  Accepts a flat {name: tensor} dict and the common nestings
  {'state_dict': {...}} / {'model': {...}} (also 'model_state_dict' and
  'module'). torch.load runs with weights_only=True, so a pickle that
  would run code is refused, never executed.
  """
  try:
    import torch
  except ImportError:
    raise BistilError(
      f"reading {path} needs torch: pip install 'bistil_jax[torch]' "
      "(or convert it to model.safetensors)"
    ) from None
  try:
    with paths.path(path).open("rb") as f:
      state = torch.load(f, map_location="cpu", weights_only=True)
  except pickle.UnpicklingError as e:
    if "unsupported global" not in str(e).lower():
      # Not a refused object: bytes that are no pickle torch can read.
      raise BistilError(
        f"corrupt or unreadable {path} (not a torch checkpoint)"
      ) from None
    # torch's text repeats advice to load with weights_only=False, which
    # would run the file's code: never pass that on.
    raise BistilError(
      f"{path} is not a plain tensor checkpoint: it holds Python objects "
      "that safe (weights_only) loading refused; convert it to "
      "model.safetensors with the tool that wrote it"
    ) from None
  except Exception as e:  # torch raises many types for bad files
    msg = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
    raise BistilError(
      f"corrupt or unreadable {path} ({type(e).__name__}: {msg})"
    ) from None
  return _torch_tensors(state, path)


def _torch_tensors(state: Any, path: str) -> dict[str, np.ndarray]:
  """{name: array} from a loaded torch object (flat or nested once)."""
  import torch

  if isinstance(state, dict):
    for key in _TORCH_NESTING:
      inner = state.get(key)
      if isinstance(inner, dict) and inner and not _all_tensors(state):
        state = inner
        break
  if not isinstance(state, dict) or not state:
    raise BistilError(
      f"{path} holds a {type(state).__name__}, not a state dict of tensors"
    )
  bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
  if bad:
    kinds = sorted({type(state[k]).__name__ for k in bad})
    raise BistilError(
      f"{path} is not a state dict of tensors: {len(bad)} of {len(state)} "
      f"entries (e.g. {str(bad[0])[:60]!r}) hold {', '.join(kinds)}"
    )
  out = {}
  for k, v in state.items():
    if v.dtype == torch.bfloat16:
      v = v.float()
    out[str(k)] = v.detach().cpu().numpy()
  return out


def _all_tensors(state: dict) -> bool:
  import torch

  return all(isinstance(v, torch.Tensor) for v in state.values())


def _read_flax_msgpack(path: paths.PathLike) -> dict[str, np.ndarray]:
  try:
    tree = flax.serialization.msgpack_restore(paths.path(path).read_bytes())
  except Exception as e:  # msgpack raises several unrelated types
    raise BistilError(f"corrupt or unreadable {path}: {e}") from None
  return {"/".join(k): np.asarray(v) for k, v in flatten_dict(tree).items()}


def read_weights(path: paths.PathLike) -> tuple[dict[str, np.ndarray], str]:
  """Reads the weights of an HF dir: (flat state, "torch" | "flax").

  Preference order as in transformers: safetensors (single or sharded),
  pytorch_model.bin, flax_model.msgpack.
  """
  d = paths.path(path)
  if (d / SAFETENSORS).is_file():
    return read_safetensors(d / SAFETENSORS), "torch"
  index = d / SAFETENSORS_INDEX
  if index.is_file():
    shards = sorted(set(read_json(index).get("weight_map", {}).values()))
    if not shards:
      raise BistilError(f"{index} has an empty weight_map")
    state = {}
    for shard in shards:
      state.update(read_safetensors(d / shard))
    return state, "torch"
  if (d / TORCH_BIN).is_file():
    # torch.load wants a local file (and reports errors with its name).
    with paths.local_copy(d / TORCH_BIN) as local:
      return _read_torch_bin(local), "torch"
  if (d / FLAX_MSGPACK).is_file():
    return _read_flax_msgpack(d / FLAX_MSGPACK), "flax"
  raise BistilError(
    f"no weights in {path}: expected {SAFETENSORS}, {TORCH_BIN} or "
    f"{FLAX_MSGPACK}"
  )


def weights_format(path: str) -> str:
  """The weights file `read_weights` reads in an HF dir, named as it is.

  "safetensors" (model.safetensors or a sharded index), "pytorch" (a
  torch-pickled pytorch_model.bin) or "flax" (flax_model.msgpack); the
  format that `read_weights` returns names the parameter naming instead
  (PyTorch "torch" names are used by both safetensors and .bin files).
  """
  for name, fmt in (
    (SAFETENSORS, "safetensors"),
    (SAFETENSORS_INDEX, "safetensors"),
    (TORCH_BIN, "pytorch"),
    (FLAX_MSGPACK, "flax"),
  ):
    if (paths.path(path) / name).is_file():
      return fmt
  raise BistilError(f"no weights in {path}")


def _has_pooler(state: dict[str, Any], fmt: str) -> bool:
  sep = "." if fmt == "torch" else "/"
  return any(
    k.startswith(f"pooler{sep}") or f"{sep}pooler{sep}" in k for k in state
  )


def _has_deberta_lm(state: dict[str, Any], fmt: str) -> bool:
  """The checkpoint names its MLM head as DeBERTa-v3 files do."""
  sep = "." if fmt == "torch" else "/"
  return any(k.startswith(f"lm_predictions{sep}") for k in state)


def _infer_head(state: dict[str, Any], fmt: str) -> str:
  """The head whose rules claim some of the checkpoint's head keys."""
  sep = "." if fmt == "torch" else "/"

  def names(head: HfHead) -> set[str]:
    return {getattr(r, fmt) for r in head.all_rules()}

  def claims(head: HfHead) -> bool:
    return any(k.startswith(f"{n}{sep}") for n in names(head) for k in state)

  found = [name for name, head in HF_HEADS.items() if claims(head)]
  for name in found:  # a head whose names no other head uses decides
    if not any(
      names(HF_HEADS[name]) & names(HF_HEADS[other])
      for other in HF_HEADS
      if other != name
    ):
      return name
  if found:
    raise BistilError(
      "config.json has no 'architectures' and the checkpoint's head keys "
      f"fit {' and '.join(found)}: cannot tell which"
    )
  return "none"


def load_hf(
  path: str, dtype: str = "float32", param_dtype: str = "float32", **overrides
) -> tuple[Model, dict[str, Any]]:
  """Loads an HF model dir as (model, params).

  Args:
    path: dir with config.json and model.safetensors | pytorch_model.bin |
      flax_model.msgpack.
    dtype: compute dtype of the returned model.
    param_dtype: dtype of the returned params (numpy arrays on the host).
    **overrides: ModelConfig fields to set (e.g. dropout rates).

  Returns:
    (Model, params) with params a nested dict of numpy arrays.

  Raises:
    BistilError: missing files, unknown architecture, mismatched keys/shapes.
  """
  if not paths.path(path).is_dir():
    raise BistilError(f"model dir {path} does not exist")
  hf = read_json(paths.path(path) / CONFIG)
  state, fmt = read_weights(path)
  kw = {
    "add_pooler": _has_pooler(state, fmt),
    "dtype": dtype,
    "param_dtype": param_dtype,
  }
  if not hf.get("architectures"):
    kw["head"] = _infer_head(state, fmt)
  if "legacy" not in hf and _has_deberta_lm(state, fmt):
    # A DeBERTa-v3 file: lm_predictions names, decoder = word embeddings.
    kw.update(legacy=False, tie_word_embeddings=True)
  kw.update(overrides)
  config = ModelConfig.from_hf_dict(hf, **kw)
  params = params_from_hf(state, config, fmt)
  if config.head == "none":  # a head without an HF class has its own file
    for head in HF_HEADS.values():
      side = head.side_file
      if side is not None and (paths.path(path) / side.name).is_file():
        config, params = side.attach(
          paths.path(path) / side.name, config, params
        )
        break
  log.info(
    "loaded %s from %s (%s weights, vocab %d)",
    config.architecture,
    path,
    weights_format(path),
    config.vocab_size,
  )
  return Model(config), params


def check_out_dir(path: paths.PathLike, overwrite: bool) -> None:
  """Refuses an output path that is a file, or a non-empty dir unless
  `overwrite` (every writer of an output dir calls this first)."""
  p = paths.path(path)
  if p.exists() and not p.is_dir():
    raise BistilError(f"{path} exists and is not a directory")
  if p.is_dir() and any(p.iterdir()) and not overwrite:
    raise BistilError(
      f"output dir {path} exists and is not empty (use --overwrite to replace it)"
    )


def copy_tokenizer(src: paths.PathLike, dst: paths.PathLike) -> list[str]:
  """Copies the tokenizer files found in src; returns their names."""
  s = paths.path(src)
  if not s.is_dir():
    raise BistilError(f"tokenizer dir {src} does not exist")
  names = [n for n in TOKENIZER_FILES if (s / n).is_file()]
  if not names:
    raise BistilError(f"no tokenizer files in {src}")
  for n in names:
    paths.copy_file(s / n, paths.path(dst) / n)
  return names


def save_hf(
  path: paths.PathLike,
  model: Model | ModelConfig,
  params: dict[str, Any],
  tokenizer_dir: paths.PathLike | None = None,
  overwrite: bool = False,
  write_flax: bool = True,
  record: dict[str, Any] | None = None,
) -> None:
  """Writes an HF model dir: config.json, model.safetensors, flax msgpack.

  The dir is written in a temp sibling and moved into place at the end
  (`paths.atomic_dir`); an existing non-empty dir is refused unless
  `overwrite`.

  Args:
    path: output dir (local or a URL).
    model: the Model (or its ModelConfig).
    params: our nested params (numpy or fully addressable jax arrays).
    tokenizer_dir: dir whose tokenizer files are copied in.
    overwrite: replace an existing non-empty dir.
    write_flax: also write flax_model.msgpack with HF-Flax names.
    record: what the run that made the model used, written as RUN_RECORD
      (e.g. {"max_seq_len": 64}; see `read_run_record`).
  """
  check_out_dir(path, overwrite)
  with paths.atomic_dir(path) as tmp:
    write_hf(tmp, model, params, tokenizer_dir, write_flax)
    if record:
      paths.write_text(
        tmp / RUN_RECORD, json.dumps(record, indent=2, sort_keys=True)
      )
  config = model.config if isinstance(model, Model) else model
  log.info("wrote %s (safetensors) to %s", config.architecture, path)


def read_run_record(path: paths.PathLike) -> dict[str, Any]:
  """The RUN_RECORD of a model dir; {} when it has none (any HF dir)."""
  p = paths.path(path) / RUN_RECORD
  if not p.is_file():
    return {}
  record = read_json(p)
  if not isinstance(record, dict):
    raise BistilError(f"{p} holds no JSON object")
  return record


def write_hf(
  out: paths.PathLike,
  model: Model | ModelConfig,
  params: dict[str, Any],
  tokenizer_dir: paths.PathLike | None = None,
  write_flax: bool = True,
) -> None:
  """Writes the files of an HF model dir into `out` (see `save_hf`)."""
  from safetensors.numpy import save

  config = model.config if isinstance(model, Model) else model
  params = _to_numpy(params)
  tmp = paths.path(out)
  side = HF_HEADS[config.head].side_file
  if side is not None:  # no HF class: encoder + head file
    config, params, head = side.split(config, params)
    paths.write_bytes(tmp / side.name, head)
  # Dropped once here, not by each format's conversion below.
  params = without_pooler(params, config)
  paths.write_text(
    tmp / CONFIG, json.dumps(config.to_hf_dict(), indent=2, sort_keys=True)
  )
  paths.write_bytes(
    tmp / SAFETENSORS,
    save(params_to_hf(params, config, "torch"), metadata={"format": "pt"}),
  )
  if write_flax and family(config) not in NO_FLAX_CLASSES:
    flat = params_to_hf(params, config, "flax")
    tree = unflatten_dict({tuple(k.split("/")): v for k, v in flat.items()})
    paths.write_bytes(
      tmp / FLAX_MSGPACK, flax.serialization.msgpack_serialize(tree)
    )
  if tokenizer_dir is not None:
    copy_tokenizer(tokenizer_dir, tmp)


def _to_numpy(params):
  return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), params)


# -------------------------------------------------------------- single names
def torch_name_to_ours(
  name: str, config: ModelConfig
) -> tuple[str, bool, int | None] | None:
  """Maps one PyTorch parameter name to (our path, transpose, vocab axis).

  For files that name parameters one by one (composable-sft diffs). The body
  prefix ("bert."/"roberta.", whichever is this config's family) may be
  present or not whatever the head; legacy gamma/beta leaf names and the
  MLM decoder-bias alias are accepted.

  Returns:
    (our "/"-joined path, whether the PyTorch tensor is the transpose of
    ours, the vocabulary axis of OUR array or None), or None when no rule of
    this config claims the name.
  """
  stem, _, leaf = name.rpartition(".")
  if stem and leaf in LEGACY_LEAVES:
    name = f"{stem}.{LEGACY_LEAVES[leaf]}"
  bare = name.removeprefix(f"{family(config)}.")
  bare = BIAS_ALIASES.get(bare, bare)
  prefix = body_prefix(config)
  table = _leaf_table(config)
  for candidate in (f"{prefix}.{bare}" if prefix else bare, bare):
    hit = _match(table, "torch", candidate)
    if hit is not None:
      leaf_rule, groups = hit
      ours = _fill(leaf_rule.ours, groups)
      return ours, leaf_rule.transpose, leaf_rule.vocab_axis
  return None
