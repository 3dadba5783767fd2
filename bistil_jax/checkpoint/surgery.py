"""Model surgery every phase shares: task heads, SFT merges, vocab maps.

Each function takes host params (nested dicts of arrays) and returns new
ones; nothing here touches devices, so the driver shards the result once.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from bistil_jax import configlib, paths, sparse
from bistil_jax.checkpoint import hf, language
from bistil_jax.checkpoint import sft as sft_lib
from bistil_jax.data import vocab
from bistil_jax.errors import BistilError
from bistil_jax.model import heads
from bistil_jax.model.config import ModelConfig
from bistil_jax.model.encoder import Model, init_params

log = logging.getLogger(__name__)

LANGS = ("source", "target")


def split_list(spec: str) -> list[str]:
  r""" "a,b," -> ["a", "b"] (empty items dropped, "~" expanded; `\,` is a
  comma inside a path, as in eval.sets)."""
  return [str(paths.path(x)) for x in configlib.split_escaped(spec)]


def language_sfts(spec: str) -> tuple[list[str], list[str]]:
  """teacher.sfts of phase 1 -> ([source SFTs], [target SFTs]).

  Items "source=DIR" / "target=DIR" apply to that language's teacher; a bare
  DIR applies to both (docs/method.md 2.1: per-language teachers are the MMT
  plus that language's SFT).
  """
  out: dict[str, list[str]] = {lang: [] for lang in LANGS}
  for item in configlib.split_escaped(spec):
    lang, sep, path = item.partition("=")
    if not sep:
      for v in out.values():
        v.append(item)
    elif lang in out:
      out[lang].append(path)
    else:
      raise BistilError(
        f"teacher.sfts item {item!r}: the language must be source or target"
      )
  return tuple([str(paths.path(p)) for p in out[lang]] for lang in LANGS)


def fill_missing(
  params: Mapping[str, Any], cfg: ModelConfig, rng: jax.Array
) -> tuple[dict[str, Any], list[str]]:
  """The groups `cfg` needs: taken from `params` where present, freshly
  initialised otherwise (HF's behaviour when a checkpoint lacks a head).
  Groups `cfg` does not use (an MLM head under a task head) are dropped.
  Returns (params, names of the fresh top-level groups)."""
  fresh = init_params(cfg, rng)
  new = [k for k in fresh if k not in params]
  out = {k: params[k] if k in params else fresh[k] for k in fresh}
  for k in new:
    out[k] = jax.tree.map(np.asarray, out[k])
  return out, new


def with_task_head(
  params: Mapping[str, Any],
  config: ModelConfig,
  head: str,
  labels: Sequence[str],
  rng: jax.Array,
) -> tuple[dict[str, Any], ModelConfig, list[str]]:
  """Body of `params` + a fresh `head` (a model/config.py HEADS name, the
  one a task kind names) with `labels` as its outputs. Returns (params,
  config, fresh top-level groups: the head, and a pooler where one is
  created)."""
  pooler = config.add_pooler or heads.uses_pooler(config, head)
  cfg = config.replace(
    head=head,
    num_labels=len(labels),
    id2label=tuple(labels),
    add_pooler=pooler,
  )
  body = {k: v for k, v in params.items() if k not in sparse.HEAD_KEYS}
  out, new = fill_missing(body, cfg, rng)
  return out, cfg, new


def config_for_sft(cfg: ModelConfig, sft: sft_lib.SFT) -> ModelConfig:
  """The model config with the SFT's task head (from its metadata)."""
  meta = sft.meta
  head = meta.get("head")
  if not head or head in ("none", "mlm"):
    return cfg
  labels = tuple(meta.get("label_names") or ())
  return cfg.replace(
    head=head,
    num_labels=len(labels) or int(meta.get("num_labels", 2)),
    id2label=labels,
    add_pooler=bool(meta.get("add_pooler", cfg.add_pooler)),
  )


def merged_model(
  model_dir: str, sft_paths: Sequence[str], dtype: str | None = None
) -> tuple[Model, dict[str, Any]]:
  """Base HF dir + SFTs (composed in order), head from the last task SFT.

  Each SFT must have been made for the base with the SFTs before it, or
  for the bare base (a language SFT and a task SFT, each trained on the
  MMT, compose as LT-SFT composes them).

  A task SFT's head (and a pooler it stores whole) replaces what the base
  has; missing groups are filled first so the dense tensors have a place,
  and the base check leaves those groups out (see sft.apply_sft).
  """
  model, params = hf.load_hf(model_dir, **({"dtype": dtype} if dtype else {}))
  cfg, base = model.config, params
  for path in sft_paths:
    sft = sft_lib.load_sft(path, config=cfg)
    if sft.dense:
      cfg = config_for_sft(cfg, sft)
      params, _ = fill_missing(params, cfg, jax.random.PRNGKey(0))
    # Each SFT is checked against the model it was made for: the base with
    # the SFTs before it (a stack) or the bare base (LT-SFT composition).
    params = sft_lib.apply_sft(params, sft, base=base)
  return Model(cfg), params


def load_teacher(path: str, dtype: str) -> tuple[Model, dict[str, Any]]:
  """A phase-1 teacher model dir; a task head is dropped (MLM head kept)."""
  model, params = hf.load_hf(path, dtype=dtype)
  cfg = model.config
  if cfg.head not in ("mlm", "none"):
    params = {k: v for k, v in params.items() if k != "classifier"}
    cfg = cfg.replace(head="none", num_labels=2, id2label=None)
    model = Model(cfg)
  return model, params


def language_teachers(
  base: dict[str, Any],
  tcfg: ModelConfig,
  teacher_dir: str,
  sft_paths: Sequence[Sequence[str]],
) -> list[dict[str, Any]]:
  """[source teacher, target teacher] host params (docs/method.md 2.1).

  Each is base + that language's SFT diffs (only the diffs: a language
  SFT's dense MLM-head values are not applied). The same object is reused
  when both languages get the same SFTs, so no memory is duplicated.
  """
  if not any(sft_paths):
    return [base, base]
  keep_ids = None
  vmap = paths.path(teacher_dir) / vocab.VOCAB_MAP
  if vmap.is_file():
    keep_ids = vocab.keep_ids_from_vocab_map(vocab.read_vocab_map(str(vmap)))
  out = []
  for lang, dirs in zip(LANGS, sft_paths, strict=True):
    if out and list(dirs) == list(sft_paths[0]):
      out.append(out[0])
      continue
    params = base
    for path in dirs:
      # Checks the SFT's base; maps a full-vocabulary SFT of ours onto a
      # trimmed teacher through its vocab map.
      params = language.apply_language_sft(params, path, tcfg, keep_ids)
      log.info("%s teacher: + SFT %s", lang, path)
    out.append(params)
  return out


def map_teacher_vocab(
  params, tcfg: ModelConfig, teacher_dir: str, student_tok_dir: str
) -> tuple[dict[str, Any], ModelConfig]:
  """Slices the teacher's embeddings to the student's vocabulary by token
  string (docs/method.md 1.2), so the teacher reads student ids."""
  t_tok, _ = vocab.load_tokenizer_dir(teacher_dir)
  s_tok, _ = vocab.load_tokenizer_dir(student_tok_dir)
  s_vocab = s_tok.get_vocab(with_added_tokens=True)
  t_vocab = t_tok.get_vocab(with_added_tokens=True)
  if s_vocab == t_vocab:
    return params, tcfg
  missing = [t for t in s_vocab if t not in t_vocab]
  if missing:
    raise BistilError(
      f"{len(missing)} student tokens are not in the teacher's vocabulary "
      f"(e.g. {missing[:5]}): the student was not trimmed from this teacher"
    )
  keep = np.array(
    [t_vocab[t] for t, _ in sorted(s_vocab.items(), key=lambda kv: kv[1])]
  )
  log.info("teacher vocabulary %d -> %d rows", tcfg.vocab_size, keep.size)
  return vocab.slice_vocab_params(params, tcfg, keep)


def recorded_run(
  model_dir: str, sft_dirs: Sequence[str], keys: Sequence[str]
) -> tuple[dict[str, int], str]:
  """What a task run recorded with its export (the SFT's sft.json, or
  bistil_run.json beside a dense export) so that `bistil evaluate` encodes
  as the run did: the window length and its task's options (`keys`, see
  tasks.RECORDED).

  Returns:
    (the values of `keys` there are, the file they were read from) of the
    run that made the last SFT that records them, else of the run that made
    the model dir; ({}, "") when none does.
  """
  for d in reversed(list(sft_dirs)):
    meta = paths.path(d) / sft_lib.SFT_META  # composable-sft dirs have none
    if meta.is_file():
      record = json.loads(paths.read_text(meta))
      if record.get("max_seq_len") is not None:
        return {k: int(record[k]) for k in keys if k in record}, str(meta)
  record = hf.read_run_record(model_dir)
  if record.get("max_seq_len") is not None:
    where = str(paths.path(model_dir) / hf.RUN_RECORD)
    return {k: int(record[k]) for k in keys if k in record}, where
  return {}, ""
