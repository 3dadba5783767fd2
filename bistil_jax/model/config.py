"""Frozen model configuration, HF config.json mapping and size presets.

One `ModelConfig` is passed whole to every module. It covers BERT (mBERT),
RoBERTa (XLM-R) and DeBERTa-v2/v3 (mDeBERTa) encoders with an optional head.
Derive variants with `config.replace(...)`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from bistil_jax.errors import BistilError


@dataclasses.dataclass(frozen=True)
class Family:
  """How one HF `model_type` maps onto this project.

  Attributes:
    arch_prefix: prefix of its HF class names ("Bert" in BertForMaskedLM).
    hf_names: its parameter-naming family in checkpoint/hf.py's rule tables,
      which is also the body prefix of its head classes ("bert." in
      `bert.encoder.layer.0...`).
    body: the encoder body that runs it (model/encoder.py `BODIES`).
  """

  arch_prefix: str
  hf_names: str
  body: str
  # config.json keys (ModelConfig fields) that only this family reads and
  # writes; other families neither read nor write them.
  hf_keys: tuple[str, ...] = ()
  # Values of ModelConfig fields that this family's config.json omits when
  # they are transformers' defaults and ours differ.
  hf_defaults: tuple[tuple[str, Any], ...] = ()


# model_type -> family; adding an architecture is one entry here, its body
# in model/encoder.py and its names in checkpoint/hf.py.
FAMILIES = {
  "bert": Family("Bert", "bert", "bert"),
  "xlm-roberta": Family("XLMRoberta", "roberta", "bert"),
  "roberta": Family("Roberta", "roberta", "bert"),
  # DistilBERT runs on the BERT body without token types (type_vocab_size 0)
  # or pooler; its config.json has keys of its own (DISTILBERT_KEYS).
  "distilbert": Family("DistilBert", "distilbert", "bert"),
  "deberta-v2": Family(
    "DebertaV2",
    "deberta",
    "deberta",
    hf_keys=(
      "relative_attention",
      "max_relative_positions",
      "position_buckets",
      "pos_att_type",
      "share_att_key",
      "norm_rel_ebd",
      "position_biased_input",
      "pooler_hidden_act",
      "pooler_dropout",
      "legacy",
    ),
    hf_defaults=(
      ("layer_norm_eps", 1e-7),
      ("pad_token_id", 0),
      ("type_vocab_size", 0),
    ),
  ),
}
MODEL_TYPES = tuple(FAMILIES)
# config.json states, in its standard keys, the dropout a user of the model
# should fine-tune with; where this project trains the model with other
# rates (a distilled student trains without dropout, docs/method.md 2.2 and
# 4.2), they are recorded under this key, which our loader reads back and
# transformers ignores.
TRAINING_DROPOUT_KEY = "bistil_training_dropout"
DROPOUT_KEYS = ("hidden_dropout_prob", "attention_probs_dropout_prob")
ACTIVATIONS = ("gelu", "gelu_new", "gelu_pytorch_tanh", "relu", "tanh")
# DeBERTa's relative-attention terms (`pos_att_type`): content->position
# and position->content.
POS_ATT_TYPES = ("c2p", "p2c")
DTYPES = ("float32", "bfloat16", "float16")

# Every `config.head`, with the suffix of the HF class it exports as (after
# the family's prefix). Its module is model/heads.py's, its HF names
# checkpoint/hf.py's: one entry in each table per head.
HEAD_ARCH_SUFFIX = {
  "none": "Model",
  "mlm": "ForMaskedLM",
  "token_classification": "ForTokenClassification",
  "sequence_classification": "ForSequenceClassification",
  # No HF class: exports as the bare encoder (*Model) plus a file.
  "biaffine_parser": "Model",
  "question_answering": "ForQuestionAnswering",
}
HEADS = tuple(HEAD_ARCH_SUFFIX)


def _architectures() -> dict[str, tuple[str, str]]:
  """HF architecture name -> (model_type family, head); a class name two
  heads export as (*Model) reads back as the first of them ("none")."""
  out: dict[str, tuple[str, str]] = {}
  for model_type, family in FAMILIES.items():
    for head, suffix in HEAD_ARCH_SUFFIX.items():
      out.setdefault(family.arch_prefix + suffix, (model_type, head))
  return out


ARCHITECTURES = _architectures()


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Architecture of a BERT/RoBERTa/DeBERTa-v2 encoder and its head.

  Attributes mirror HF `config.json` names where one exists.
  """

  model_type: str = "bert"  # a FAMILIES key: bert | xlm-roberta | ...
  vocab_size: int = 119547  # real rows; params hold `padded_vocab_size`
  hidden_size: int = 768
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  intermediate_size: int = 3072
  hidden_act: str = "gelu"  # exact (erf) GELU, as HF "gelu"
  hidden_dropout_prob: float = 0.1
  attention_probs_dropout_prob: float = 0.1
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12
  initializer_range: float = 0.02
  pad_token_id: int = 0
  bos_token_id: int | None = None
  eos_token_id: int | None = None
  tie_word_embeddings: bool = True
  head: str = "mlm"  # none | mlm | token_classification | ...
  add_pooler: bool = False  # BERT pooler (tanh dense on [CLS])
  num_labels: int = 2
  id2label: tuple[str, ...] = ()  # label names; empty = LABEL_i
  classifier_dropout: float | None = None
  # (hidden, attention) dropout that config.json states when it differs
  # from the training rates above: a student exported with its teacher's
  # rates, so that fine-tuning it in transformers regularises as the
  # teacher did (see TRAINING_DROPOUT_KEY). None: the training rates.
  export_dropout: tuple[float, float] | None = None
  # DistilBERT only (None elsewhere): the dropout of its sequence head
  # (after pre_classifier) and of its span head (before qa_outputs).
  seq_classif_dropout: float | None = None
  qa_dropout: float | None = None
  # config.json's `tokenizer_class`, kept so AutoTokenizer picks the same
  # class on an exported dir (a BERT body with XLM-R's tokenizer names
  # XLMRobertaTokenizer). None: not written.
  tokenizer_class: str | None = None
  # Embedding rows are padded to a multiple of this so the vocab axis shards
  # evenly; padded logits are masked (see layers.vocab_logits_mask).
  vocab_pad_multiple: int = 128
  dtype: str = "float32"  # compute dtype
  param_dtype: str = "float32"
  # DeBERTa-v2/v3 only (model_type "deberta-v2"; config.json names and
  # transformers' defaults; model/deberta.py). Other families leave them.
  relative_attention: bool = False  # disentangled attention, rel table
  max_relative_positions: int = -1  # < 1: max_position_embeddings
  position_buckets: int = -1  # > 0: log-bucketed relative positions
  pos_att_type: tuple[str, ...] = ()  # of POS_ATT_TYPES
  share_att_key: bool = False  # positions projected by query/key_proj
  norm_rel_ebd: str = "none"  # "layer_norm": LayerNorm on the rel table
  position_biased_input: bool = True  # absolute position embeddings
  pooler_hidden_act: str = "gelu"  # ContextPooler activation
  pooler_dropout: float = 0.0  # ContextPooler dropout
  legacy: bool = True  # MLM head names: cls.predictions (True) or
  # lm_predictions.lm_head (False)

  def __post_init__(self):
    def bad(msg):
      raise BistilError(f"invalid model config: {msg}")

    if self.model_type not in MODEL_TYPES:
      bad(f"model_type {self.model_type!r} not in {MODEL_TYPES}")
    if self.head not in HEADS:
      bad(f"head {self.head!r} not in {HEADS}")
    if self.hidden_act not in ACTIVATIONS:
      bad(f"hidden_act {self.hidden_act!r} not in {ACTIVATIONS}")
    for name in ("dtype", "param_dtype"):
      if getattr(self, name) not in DTYPES:
        bad(f"{name} {getattr(self, name)!r} not in {DTYPES}")
    if self.vocab_size <= 0 or self.hidden_size <= 0:
      bad("vocab_size and hidden_size must be positive")
    if self.hidden_size % self.num_attention_heads:
      bad(
        f"hidden_size {self.hidden_size} is not a multiple of "
        f"num_attention_heads {self.num_attention_heads}"
      )
    if self.vocab_pad_multiple < 1:
      bad("vocab_pad_multiple must be >= 1")
    if self.head == "question_answering" and self.num_labels != 2:
      bad(f"a question_answering head has 2 outputs, not {self.num_labels}")
    if self.id2label and len(self.id2label) != self.num_labels:
      bad(f"{len(self.id2label)} label names for num_labels={self.num_labels}")
    if self.type_vocab_size < 0:
      bad("type_vocab_size must be >= 0 (0: no token-type embeddings)")
    self._check_distilbert_fields(bad)
    if self.max_position_embeddings <= self.position_offset:
      bad("max_position_embeddings too small for the position offset")
    self._check_deberta(bad)
    if self.export_dropout is not None:
      rates = tuple(self.export_dropout)
      if len(rates) != 2 or not all(0.0 <= float(r) < 1.0 for r in rates):
        bad(
          f"export_dropout {self.export_dropout!r} is not two rates in [0, 1)"
        )
      object.__setattr__(self, "export_dropout", tuple(map(float, rates)))

  def _check_distilbert_fields(self, bad) -> None:
    """DistilBERT's own dropouts exist there only (unset: HF's defaults);
    it has no token types, and its heads take no `classifier_dropout`
    (HF's DistilBERT classes ignore that key)."""
    own = ("seq_classif_dropout", "qa_dropout")
    if self.model_type != "distilbert":
      named = [k for k in own if getattr(self, k) is not None]
      if named:
        bad(f"{', '.join(named)} are DistilBERT options, not {self.model_type}")
      return
    if self.type_vocab_size:
      bad("DistilBERT has no token types: type_vocab_size must be 0")
    if self.classifier_dropout is not None:
      bad(
        "DistilBERT heads take no classifier_dropout (they use dropout, "
        "seq_classif_dropout and qa_dropout)"
      )
    for k in own:
      v = getattr(self, k)
      if v is None:
        object.__setattr__(self, k, DISTILBERT_DEFAULTS[k])
      elif not 0.0 <= float(v) < 1.0:
        bad(f"{k} {v!r} is not in [0, 1)")

  def _check_deberta(self, bad) -> None:
    """Validates the DeBERTa fields; other families must keep defaults."""
    object.__setattr__(self, "pos_att_type", tuple(self.pos_att_type))
    object.__setattr__(self, "pooler_dropout", float(self.pooler_dropout))
    if self.model_type != "deberta-v2":
      return
    if self.pooler_hidden_act not in ACTIVATIONS:
      bad(f"pooler_hidden_act {self.pooler_hidden_act!r} not in {ACTIVATIONS}")
    if not 0.0 <= float(self.pooler_dropout) < 1.0:
      bad(f"pooler_dropout {self.pooler_dropout!r} not in [0, 1)")
    unknown = [t for t in self.pos_att_type if t not in POS_ATT_TYPES]
    if unknown or len(set(self.pos_att_type)) != len(self.pos_att_type):
      bad(
        f"pos_att_type {list(self.pos_att_type)} is not a set of "
        f"{POS_ATT_TYPES}"
      )
    if self.pos_att_type and not self.relative_attention:
      bad(
        f"pos_att_type {list(self.pos_att_type)} needs relative_attention "
        "true (transformers would scale the scores for terms it never adds)"
      )
    norms = {x.strip() for x in self.norm_rel_ebd.lower().split("|")}
    if not norms <= {"none", "layer_norm"}:
      bad(f"norm_rel_ebd {self.norm_rel_ebd!r}: only layer_norm or none")
    if self.relative_attention and self.rel_span < 1:
      bad("the relative position span must be positive")
    if self.position_buckets > 0 and self.position_buckets < 4:
      bad(f"position_buckets {self.position_buckets} < 4 (or -1 for none)")
    if not self.tie_word_embeddings and not self.legacy:
      bad(
        "DeBERTa's lm_predictions MLM head (legacy false) always ties the "
        "decoder to the word embeddings: tie_word_embeddings must be true"
      )

  @property
  def rel_max_positions(self) -> int:
    """DeBERTa's maximum relative distance (`max_relative_positions`, or
    max_position_embeddings where config.json says < 1)."""
    if self.max_relative_positions < 1:
      return self.max_position_embeddings
    return self.max_relative_positions

  @property
  def rel_span(self) -> int:
    """DeBERTa's attention span s: relative positions index rows
    [0, 2s) of `encoder/rel_embeddings` (buckets, else max distance)."""
    if self.position_buckets > 0:
      return self.position_buckets
    return self.rel_max_positions

  def replace(self, **changes: Any) -> ModelConfig:
    return dataclasses.replace(self, **changes)

  @property
  def family(self) -> Family:
    """Its `FAMILIES` entry: HF class prefix, naming family, body."""
    return FAMILIES[self.model_type]

  @property
  def is_roberta(self) -> bool:
    return self.model_type in ("xlm-roberta", "roberta")

  @property
  def position_offset(self) -> int:
    """First position id of a real token (RoBERTa counts from pad + 1)."""
    return self.pad_token_id + 1 if self.is_roberta else 0

  @property
  def stated_dropout(self) -> tuple[float, float]:
    """(hidden, attention) dropout that config.json states."""
    if self.export_dropout is not None:
      return self.export_dropout
    return (self.hidden_dropout_prob, self.attention_probs_dropout_prob)

  @property
  def max_length(self) -> int:
    """Longest input the position table allows."""
    return self.max_position_embeddings - self.position_offset

  @property
  def padded_vocab_size(self) -> int:
    m = self.vocab_pad_multiple
    return int(math.ceil(self.vocab_size / m) * m)

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_attention_heads

  @property
  def architecture(self) -> str:
    """The HF class name this config exports as."""
    return self.family.arch_prefix + HEAD_ARCH_SUFFIX[self.head]

  @property
  def label_names(self) -> tuple[str, ...]:
    return self.id2label or tuple(f"LABEL_{i}" for i in range(self.num_labels))

  # ---------------------------------------------------------------- HF json
  @classmethod
  def from_hf_dict(cls, d: dict[str, Any], **overrides: Any) -> ModelConfig:
    """Builds a config from an HF `config.json` dict.

    Args:
      d: the parsed config.json.
      **overrides: fields to set on top (e.g. head, add_pooler, dtype).

    Raises:
      BistilError: for architectures or options this encoder cannot run.
    """
    model_type = d.get("model_type")
    archs = d.get("architectures") or []
    if len(archs) > 1:
      raise BistilError(f"config.json lists several architectures: {archs}")
    head = None
    if archs:
      if archs[0] not in ARCHITECTURES:
        raise BistilError(
          f"unknown architecture {archs[0]!r}; supported: "
          + ", ".join(sorted(ARCHITECTURES))
        )
      family, head = ARCHITECTURES[archs[0]]
      model_type = model_type or family
    if model_type not in MODEL_TYPES:
      raise BistilError(
        f"unsupported model_type {model_type!r}; supported: {MODEL_TYPES}"
      )
    if model_type in HF_DIALECTS:  # config.json keys of its own
      d = HF_DIALECTS[model_type][0](d)
    if d.get("position_embedding_type", "absolute") != "absolute":
      raise BistilError(
        "only absolute position embeddings are supported, got "
        f"{d['position_embedding_type']!r}"
      )
    if d.get("is_decoder") or d.get("add_cross_attention"):
      raise BistilError("decoder / cross-attention configs are not supported")
    labels: tuple[str, ...] = ()
    if "id2label" in d:
      id2label = {int(k): v for k, v in d["id2label"].items()}
      labels = tuple(id2label[i] for i in range(len(id2label)))
    fields = {f.name for f in dataclasses.fields(cls)}
    own = ("id2label", "export_dropout")  # not config.json keys
    # Keys one family owns are read for that family alone.
    others = {
      k for t, fam in FAMILIES.items() if t != model_type for k in fam.hf_keys
    } - set(FAMILIES[model_type].hf_keys)
    kw = {k: d[k] for k in fields if k in d and k not in own + tuple(others)}
    training = d.get(TRAINING_DROPOUT_KEY)
    if training is not None:
      if not isinstance(training, dict) or set(training) != set(DROPOUT_KEYS):
        raise BistilError(
          f"config.json's {TRAINING_DROPOUT_KEY} must map "
          f"{' and '.join(DROPOUT_KEYS)} to rates, got {training!r}"
        )
      defaults = {f.name: f.default for f in dataclasses.fields(cls)}
      kw["export_dropout"] = tuple(
        float(d.get(k, defaults[k])) for k in DROPOUT_KEYS
      )
      kw.update({k: float(training[k]) for k in DROPOUT_KEYS})
    kw["model_type"] = model_type
    if head is not None:
      kw["head"] = head
    if labels:
      kw["id2label"] = labels
      kw["num_labels"] = len(labels)
    # Default values that differ between families when config.json omits them.
    for k, v in FAMILIES[model_type].hf_defaults:
      kw.setdefault(k, v)
    if model_type != "bert":
      kw.setdefault("layer_norm_eps", 1e-5)
      kw.setdefault("pad_token_id", 1)
      kw.setdefault("type_vocab_size", 1)
    for k in ("dtype", "param_dtype"):
      kw.pop(k, None)  # HF "dtype" is a storage dtype, not our compute dtype
    kw.update(overrides)
    return cls(**kw)

  def to_hf_dict(self) -> dict[str, Any]:
    """The `config.json` dict that transformers' classes load."""
    d = {
      "architectures": [self.architecture],
      "model_type": self.model_type,
      "vocab_size": self.vocab_size,
      "hidden_size": self.hidden_size,
      "num_hidden_layers": self.num_hidden_layers,
      "num_attention_heads": self.num_attention_heads,
      "intermediate_size": self.intermediate_size,
      "hidden_act": self.hidden_act,
      **dict(zip(DROPOUT_KEYS, self.stated_dropout, strict=True)),
      "max_position_embeddings": self.max_position_embeddings,
      "type_vocab_size": self.type_vocab_size,
      "layer_norm_eps": self.layer_norm_eps,
      "initializer_range": self.initializer_range,
      "pad_token_id": self.pad_token_id,
      "position_embedding_type": "absolute",
      "tie_word_embeddings": self.tie_word_embeddings,
      "torch_dtype": "float32",
    }
    if self.bos_token_id is not None:
      d["bos_token_id"] = self.bos_token_id
    if self.eos_token_id is not None:
      d["eos_token_id"] = self.eos_token_id
    if self.classifier_dropout is not None:
      d["classifier_dropout"] = self.classifier_dropout
    if self.export_dropout is not None:
      d[TRAINING_DROPOUT_KEY] = {
        "hidden_dropout_prob": self.hidden_dropout_prob,
        "attention_probs_dropout_prob": self.attention_probs_dropout_prob,
      }
    # Label names are kept even for heads that do not use them (nothing lost).
    if self.id2label or self.head.endswith("classification"):
      names = self.label_names
      d["id2label"] = {str(i): n for i, n in enumerate(names)}
      d["label2id"] = {n: i for i, n in enumerate(names)}
    if self.tokenizer_class is not None:
      d["tokenizer_class"] = self.tokenizer_class
    if self.model_type in HF_DIALECTS:
      d = HF_DIALECTS[self.model_type][1](d, self)
    return d


def _deberta_from_hf(d: dict[str, Any]) -> dict[str, Any]:
  """A DeBERTa-v2 config.json dict with its own keys in our terms.

  Raises:
    BistilError: for what model/deberta.py does not implement.
  """
  hidden = d.get("hidden_size", ModelConfig.hidden_size)
  heads = d.get("num_attention_heads", ModelConfig.num_attention_heads)
  if int(d.get("conv_kernel_size") or 0) > 0:
    raise BistilError(
      "DeBERTa's ConvLayer (conv_kernel_size > 0, as in deberta-v2-xlarge) "
      "is not implemented"
    )
  for key, want in (
    ("embedding_size", hidden),
    ("pooler_hidden_size", hidden),
    ("attention_head_size", hidden // max(int(heads), 1)),
  ):
    if d.get(key) is not None and d[key] != want:
      raise BistilError(
        f"DeBERTa with {key}={d[key]} (not {want}) is not implemented"
      )
  out = dict(d)
  pos = d.get("pos_att_type")
  if isinstance(pos, str):  # transformers' older "p2c|c2p" form
    pos = [x.strip() for x in pos.lower().split("|") if x.strip()]
  if "pos_att_type" in d:
    out["pos_att_type"] = tuple(pos or ())
  if d.get("legacy") is False:  # lm_predictions: tied, whatever it says
    out["tie_word_embeddings"] = True
  if d.get("cls_dropout") is not None and d.get("classifier_dropout") is None:
    out["classifier_dropout"] = d["cls_dropout"]
  return out


def _deberta_to_hf(d: dict[str, Any], config: ModelConfig) -> dict[str, Any]:
  """BERT-named config.json dict `d` of `config` with DeBERTa's own keys
  (`Family.hf_keys`) and its names for the shared ones."""
  d = {k: v for k, v in d.items() if k != "position_embedding_type"}
  d.update({k: getattr(config, k) for k in config.family.hf_keys})
  d["pos_att_type"] = list(config.pos_att_type)
  d["pooler_hidden_size"] = config.hidden_size
  d["pooler_dropout"] = float(config.pooler_dropout)
  if config.classifier_dropout is not None:
    d["cls_dropout"] = config.classifier_dropout
  if not config.legacy:
    # The lm_predictions head always decodes with the word embeddings;
    # transformers 4.57 ties them to its lm_head.dense when
    # tie_word_embeddings is true, which breaks its forward pass, so the
    # file says false (_deberta_from_hf reads this layout as tied).
    d["tie_word_embeddings"] = False
  return d


# ------------------------------------------------------- config.json dialects
# DistilBERT's config.json name -> ours (HF DistilBertConfig).
DISTILBERT_KEYS = {
  "dim": "hidden_size",
  "n_layers": "num_hidden_layers",
  "n_heads": "num_attention_heads",
  "hidden_dim": "intermediate_size",
  "activation": "hidden_act",
  "dropout": "hidden_dropout_prob",
  "attention_dropout": "attention_probs_dropout_prob",
}
# HF DistilBertConfig's defaults for what config.json may omit, and what its
# modelling code fixes (LayerNorm eps 1e-12, no token types).
DISTILBERT_FIXED = {"type_vocab_size": 0, "layer_norm_eps": 1e-12}
DISTILBERT_DEFAULTS = {
  "hidden_size": 768,
  "num_hidden_layers": 6,
  "num_attention_heads": 12,
  "intermediate_size": 3072,
  "hidden_act": "gelu",
  "hidden_dropout_prob": 0.1,
  "attention_probs_dropout_prob": 0.1,
  "max_position_embeddings": 512,
  "pad_token_id": 0,
  "seq_classif_dropout": 0.2,
  "qa_dropout": 0.1,
}


def _distilbert_from_hf(d: dict[str, Any]) -> dict[str, Any]:
  """A DistilBERT config.json dict in BERT's key names.

  Raises:
    BistilError: sinusoidal position embeddings (HF freezes that table and
      its Flax classes hold no parameter for it; ours would train it).
  """
  if d.get("sinusoidal_pos_embds"):
    raise BistilError(
      "DistilBERT with sinusoidal_pos_embds=true is not supported: "
      "transformers keeps that position table frozen (and out of its Flax "
      "parameters), ours would train it"
    )
  out = {k: v for k, v in d.items() if k not in DISTILBERT_KEYS}
  out.update({ours: d[k] for k, ours in DISTILBERT_KEYS.items() if k in d})
  for k, v in DISTILBERT_DEFAULTS.items():
    out.setdefault(k, v)
  out.update(DISTILBERT_FIXED)
  # Keys DistilBERT's classes ignore, so ours do too.
  for k in ("classifier_dropout", "position_embedding_type"):
    out.pop(k, None)
  return out


def _distilbert_to_hf(d: dict[str, Any], config: ModelConfig) -> dict[str, Any]:
  """BERT-named config.json dict `d` of `config` in DistilBERT's keys."""
  ours_to_theirs = {ours: k for k, ours in DISTILBERT_KEYS.items()}
  drop = (*DISTILBERT_FIXED, "position_embedding_type")
  out = {ours_to_theirs.get(k, k): v for k, v in d.items() if k not in drop}
  out["sinusoidal_pos_embds"] = False
  out["seq_classif_dropout"] = config.seq_classif_dropout
  out["qa_dropout"] = config.qa_dropout
  return out


# model_type -> (config.json dict -> BERT-named dict, its inverse), for the
# families whose config.json names keys differently or has keys of its own.
HF_DIALECTS = {
  "distilbert": (_distilbert_from_hf, _distilbert_to_hf),
  "deberta-v2": (_deberta_from_hf, _deberta_to_hf),
}


def preset(name: str, **overrides: Any) -> ModelConfig:
  """Named sizes: "mbert", "distilmbert", "xlmr-base", "tiny" (tests),
  "tiny-xlmr", "tiny-deberta"."""
  presets = {
    "mbert": ModelConfig(),
    # DistilmBERT (distilbert-base-multilingual-cased): 6 layers, 135M.
    "distilmbert": ModelConfig(
      model_type="distilbert", num_hidden_layers=6, type_vocab_size=0
    ),
    "xlmr-base": ModelConfig(
      model_type="xlm-roberta",
      vocab_size=250002,
      max_position_embeddings=514,
      type_vocab_size=1,
      layer_norm_eps=1e-5,
      pad_token_id=1,
      bos_token_id=0,
      eos_token_id=2,
    ),
    "tiny": ModelConfig(
      vocab_size=300,
      hidden_size=32,
      num_hidden_layers=2,
      num_attention_heads=4,
      intermediate_size=64,
      max_position_embeddings=64,
    ),
    "tiny-xlmr": ModelConfig(
      model_type="xlm-roberta",
      vocab_size=300,
      hidden_size=32,
      num_hidden_layers=2,
      num_attention_heads=4,
      intermediate_size=64,
      max_position_embeddings=66,
      type_vocab_size=1,
      layer_norm_eps=1e-5,
      pad_token_id=1,
      bos_token_id=0,
      eos_token_id=2,
    ),
  }
  # mDeBERTa-v3's layout at the tiny size (log buckets from distance 8).
  presets["tiny-deberta"] = presets["tiny"].replace(
    model_type="deberta-v2",
    type_vocab_size=0,
    layer_norm_eps=1e-7,
    relative_attention=True,
    position_buckets=16,
    pos_att_type=("p2c", "c2p"),
    share_att_key=True,
    norm_rel_ebd="layer_norm",
    position_biased_input=False,
  )
  if name not in presets:
    raise BistilError(f"unknown model preset {name!r}; have {sorted(presets)}")
  return presets[name].replace(**overrides)
