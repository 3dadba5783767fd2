"""Language SFTs (`bistil lang-sft`): LT-SFT with the MLM objective on one
language's corpus (docs/method.md 4.1, last paragraph; 4.4-4.6).

The same LT-SFT schedule as task LT-SFT (train/lt_sft.py run):
a dense stage; the mask = global top-K |theta - theta0| over the eligible
body (lt_sft.select_mask); the sparse stage from theta0 with a fresh
optimiser gated by that mask. As the released language SFTs were trained
(composable-sft run_mlm.py with --freeze_layer_norm --freeze_decoder):

  - the output decoder is untied from the word embeddings (a copy) and
    frozen, so training the input embeddings leaves the output projection
    at the base values; the LayerNorms (body and head) are frozen in both
    stages; the rest of the MLM head (transform dense, output bias) trains
    densely and is stored whole;
  - L1 toward theta0 over the eligible body in both stages (loss.l1).

The export is an SFT dir of kind "language" (sft.save_sft) whose body
diffs phase 1 adds to its teacher per language (surgery.language_teachers;
the stored head is not applied there, docs/method.md 4.6). Its metadata records
the base body's fingerprint, checked wherever it is applied; and, so the
SFT also applies to a vocabulary-trimmed copy of its base
(checkpoint/language.py), the fingerprint of the base without its
embeddings and the base's vocabulary size.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
from typing import Any

import jax
import ml_collections
import numpy as np

from bistil_jax import configlib, losses, partitioning, paths, sparse
from bistil_jax.checkpoint import hf
from bistil_jax.checkpoint import language as lang_ckpt
from bistil_jax.checkpoint import manager as ckpt
from bistil_jax.checkpoint import sft as sft_lib
from bistil_jax.data import corpus, pipeline, vocab
from bistil_jax.errors import BistilError
from bistil_jax.model.config import ModelConfig
from bistil_jax.model.encoder import Model
from bistil_jax.train import distil, driver, loop, lt_sft, steps

log = logging.getLogger(__name__)

PHASE = "lang-sft"
RESULTS = "results.json"
STAGES = lt_sft.STAGES  # ("dense", "sparse"), each with its checkpoints
DECODER = "decoder"  # lm_head/decoder: the untied output projection


# ------------------------------------------------------------------ models
def untie_decoder(params: dict[str, Any], cfg: ModelConfig):
  """(params, config) with the output decoder a copy of the word
  embeddings (`lm_head/decoder/kernel` [d, padded vocab]), untied."""
  table = np.asarray(params["embeddings"]["word_embeddings"]["embedding"])
  head = dict(params["lm_head"])
  head[DECODER] = {"kernel": np.ascontiguousarray(table.T)}  # [d, V]
  return {**params, "lm_head": head}, cfg.replace(tie_word_embeddings=False)


def head_trainable(head: Any, *, layer_norm: bool, frozen: bool = False) -> Any:
  """Bool tree over `lm_head`: the decoder and (unless `layer_norm`) the
  LayerNorm frozen, the transform and output bias trainable; everything
  frozen with `frozen`."""

  def leaf(path, x):
    name = "/".join(str(getattr(k, "key", k)) for k in path)
    frozen_leaf = (
      frozen
      or name.startswith(DECODER)
      or ("layer_norm" in name.lower() and not layer_norm)
    )
    return np.full(np.shape(x), not frozen_leaf)

  return jax.tree_util.tree_map_with_path(leaf, head)


def trainable_mask(eligible: Any, params0: Any, sparse_cfg) -> Any:
  """The dense stage's mask: every eligible body entry (LayerNorms out
  unless sparse.layer_norm) and the trainable head entries."""
  out = {
    k: jax.tree.map(lambda e: np.array(np.broadcast_to(e, np.shape(e))), sub)
    for k, sub in eligible.items()
  }
  out["lm_head"] = head_trainable(
    params0["lm_head"],
    layer_norm=sparse_cfg.layer_norm,
    frozen=sparse_cfg.freeze_head,
  )
  return out


def lang_sft_losses(
  params, frozen, batch, key, *, model: Model, loss_cfg, eligible, l1: float
):
  """MLM cross-entropy + l1 x mean |theta - theta0| over the eligible body.

  frozen = {"origin": theta0 or None}.
  """
  total, terms = steps.distil_losses(
    params,
    None,
    batch,
    key,
    student_model=model,
    teacher_model=None,
    loss_cfg=loss_cfg,
  )
  if l1 > 0:
    penalty = sparse.l1_to_origin(params, frozen["origin"], eligible, l1)
    terms["l1"] = losses.LossTerm(penalty, jax.numpy.float32(1.0))
    total = total + penalty
  return total, terms


def validate(config) -> steps.DistilLossConfig:
  configlib.check_keys_set(config, ("student.model", "data.corpus"))
  s = config.sparse
  if not 0 < s.density <= 1:
    raise BistilError(f"sparse.density must be in (0, 1], got {s.density}")
  if s.num_entries < 0:
    raise BistilError(f"sparse.num_entries must be >= 0, got {s.num_entries}")
  if config.train.num_steps < 1 or s.num_steps < 1:
    raise BistilError("train.num_steps and sparse.num_steps must be >= 1")
  if config.loss.l1 < 0:
    raise BistilError(f"loss.l1 must be >= 0, got {config.loss.l1}")
  if config.loss.mlm <= 0:
    raise BistilError("lang-sft needs loss.mlm > 0")
  return steps.DistilLossConfig(
    hidden=0.0, attention=0.0, kl=0.0, mlm=config.loss.mlm
  )


def _model(config):
  """(base model, its host params, trained config, trained params0)."""
  model_dir = configlib.expand(config.student.model)
  base, params = hf.load_hf(model_dir)
  if base.config.head != "mlm" or "lm_head" not in params:
    raise BistilError(
      f"lang-sft needs an MLM model dir; {model_dir} has a "
      f"{base.config.head} head"
    )
  cfg = base.config
  params0 = params
  if config.sparse.freeze_decoder and cfg.tie_word_embeddings:
    params0, cfg = untie_decoder(params, cfg)
  cfg = cfg.replace(
    dtype=config.student.dtype, param_dtype=config.student.param_dtype
  )
  return base, params, cfg, params0


# -------------------------------------------------------------------- data
def _data(config, tokenizer, cfg: ModelConfig):
  """(this host's training batches, {name: fixed dev batches})."""
  size, mask_id = pipeline.checked_mlm_ids(
    tokenizer, cfg.vocab_size, "the model's", "use the model's tokenizer"
  )
  d = config.data
  dev_specs = configlib.parse_named_list(config.eval.sets)
  corpus.check_corpora(
    configlib.expand(x) for x in (d.corpus, *dict(dev_specs).values())
  )
  hosts = jax.process_count()
  if d.batch_size % hosts:
    raise BistilError(
      f"data.batch_size {d.batch_size} does not split over {hosts} hosts"
    )

  def stream(spec):
    return pipeline.LanguageStream.from_corpus(
      tokenizer,
      configlib.expand(spec),
      d.max_seq_len,
      max_lines=d.max_lines or None,
      process_index=jax.process_index(),
      num_processes=hosts,
    )

  kw = dict(vocab_size=size, mask_id=mask_id, mlm_probability=d.mlm_probability)
  rows = stream(d.corpus)

  def batches(seed):
    # One language: the corpus is both "languages" of the bilingual
    # iterator (two seeded walks over it, each half the steps); it brings
    # resumable, seeded masking for free.
    return pipeline.BilingualBatches(
      rows, rows, d.batch_size // hosts, seed, balance_block=2, **kw
    )

  probe = batches(config.seed)
  dev = {
    name: pipeline.eval_batches(
      stream(spec),
      0,
      d.batch_size // hosts,
      config.eval.batches,
      config.seed + 1,
      max_predictions=probe.max_predictions,
      **kw,
    )
    for name, spec in dev_specs
  }
  return batches, probe.max_seq_len, dev


def evaluator(model: Model, loss_cfg, dev_arrays):
  """params -> {"NAME/mlm": mean MLM loss, "NAME/mlm_acc": accuracy} on
  fixed masked dev batches (the same rows and masks for every model)."""
  sums = jax.jit(
    functools.partial(
      distil.eval_sums,
      student_model=model,
      teacher_model=None,
      loss_cfg=loss_cfg,
    )
  )

  def evaluate(params) -> dict[str, float]:
    out = {}
    for name, batches in dev_arrays.items():
      host = partitioning.fetch_all(
        [functools.partial(sums, params, None, b) for b in batches]
      )
      for k, v in loop.reduce_metrics(host).items():
        out[f"{name}/{k}"] = v
    return out

  return evaluate


# --------------------------------------------------------------------- run
@dataclasses.dataclass
class _Inputs:
  """What a lang-sft run loads and checks before its run.json exists."""

  base: Model  # the base model as loaded (tied decoder, its own head)
  base_params: Any
  cfg: ModelConfig  # the trained model's config (decoder untied)
  params0: Any  # theta0 of the trained model
  model: Model
  eligible: Any  # the body entries LT-SFT may select
  make_batches: Any  # seed -> this host's training batches
  seq_len: int
  dev: dict[str, Any]  # {name: fixed masked dev batches (host)}


def run(
  config: ml_collections.ConfigDict, workdir: str, *, overwrite: bool = False
) -> str:
  """Runs (or resumes) `bistil lang-sft`; returns the SFT dir
  (workdir/export), or "" when config.train.export is False."""
  loss_cfg = validate(config)
  outputs = STAGES + (RESULTS,)
  with driver.start(
    config, workdir, PHASE, overwrite=overwrite, outputs=outputs
  ) as claim:
    inp = _prepare(config)
    ctx = claim.open()
    dev = {n: [ctx.to_global(b) for b in bs] for n, bs in inp.dev.items()}
    evaluate = evaluator(inp.model, loss_cfg, dev)
    state = _train(ctx, inp, loss_cfg, evaluate)
    return _finish(ctx, inp, state, loss_cfg, dev, evaluate)


def _prepare(config) -> _Inputs:
  """The model, tokenizer and data, checked (K fits) before run.json."""
  base, base_params, cfg, params0 = _model(config)
  driver.check_seq_len(cfg, config.data.max_seq_len, "model")
  tok_dir = configlib.expand(config.data.tokenizer) or configlib.expand(
    config.student.model
  )
  tokenizer, _ = vocab.load_tokenizer_dir(tok_dir)
  make_batches, seq_len, dev = _data(config, tokenizer, cfg)
  eligible = lt_sft.eligible_entries(config, cfg, params0, [])
  lt_sft.trainable_count(config, eligible)  # K fits, before run.json
  return _Inputs(
    base,
    base_params,
    cfg,
    params0,
    Model(cfg),
    eligible,
    make_batches,
    seq_len,
    dev,
  )


def _train(ctx, inp: _Inputs, loss_cfg, evaluate):
  """The LT-SFT schedule (lt_sft.run) of the MLM objective; returns the
  sparse stage's final device state."""
  config, cfg, params0 = ctx.config, inp.cfg, inp.params0
  frozen = {"origin": ctx.shard(params0, cfg) if config.loss.l1 > 0 else None}

  def stage(name, mask, num_steps, offset, seed):
    return driver.Stage(
      name=name,
      model_config=cfg,
      params=params0,
      loss_fn=functools.partial(
        lang_sft_losses,
        model=inp.model,
        loss_cfg=loss_cfg,
        eligible=inp.eligible,
        l1=config.loss.l1,
      ),
      batches=inp.make_batches(seed),
      num_steps=num_steps,
      frozen=lambda batch: frozen,
      mask=mask,
      eval_fn=(lambda s: evaluate(s.params)) if inp.dev else None,
      step_offset=offset,
      prefetch=config.data.prefetch,
      batch_shape=(config.data.batch_size, inp.seq_len),
    )

  dense_mask = trainable_mask(inp.eligible, params0, config.sparse)

  def select(trained):
    mask = lt_sft.select_mask(config, cfg, params0, trained, inp.eligible, [])
    mask["lm_head"] = dense_mask["lm_head"]  # frozen parts stay frozen
    return mask

  return lt_sft.run(
    ctx,
    stage,
    params0,
    dense_mask=dense_mask,
    dense_steps=config.train.num_steps,
    sparse_steps=config.sparse.num_steps,
    select=select,
    seed=config.seed,
    label=PHASE,
  )


def _finish(ctx, inp: _Inputs, state, loss_cfg, dev, evaluate) -> str:
  """results.json (base, trained and base+diffs on the dev sets, global
  batches `dev`; `evaluate` is the stages' evaluator) and the SFT export;
  returns its dir, or "" when config.train.export is False."""
  config = ctx.config
  final = driver.host_params(state.params)
  mask = driver.host_params(state.mask)
  results = {"phase": PHASE, "corpus": config.data.corpus}
  with ctx.activate():
    if dev:
      p0 = ctx.shard(inp.params0, inp.cfg)
      results["base"] = evaluate(p0)
      results["trained"] = evaluate(state.params)
  del state
  sft = make_sft(config, inp.cfg, inp.base_params, inp.params0, final, mask)
  if dev:
    # As phase 1 applies it: the base (tied, its own head) + body diffs.
    teacher = sft_lib.apply_sft(inp.base_params, sft, with_dense=False)
    base_cfg = inp.base.config
    with ctx.activate():
      results["base+diffs"] = evaluator(Model(base_cfg), loss_cfg, dev)(
        ctx.shard(teacher, base_cfg)
      )
    for key in ("base", "trained", "base+diffs"):
      log.info("%s: %s", key, results[key])
  out = str(paths.path(ctx.workdir) / ckpt.EXPORT)
  if jax.process_index() == 0:
    results_path = paths.path(ctx.workdir) / RESULTS
    results_path.write_text(json.dumps(results, indent=2))
    if config.train.export:
      sft_lib.save_sft(out, sft, overwrite=True)
      log.info("wrote the language SFT to %s", out)
  return out if config.train.export else ""


def make_sft(config, cfg, base_params, params0, final, mask) -> sft_lib.SFT:
  """The language SFT: sparse body diffs + the trained head entries (the
  frozen decoder and LayerNorms are the base's, not stored)."""
  trained_head = {
    k
    for k, v in mask["lm_head"].items()
    if all(jax.tree.leaves(jax.tree.map(lambda m: bool(np.all(m)), v)))
  }

  def exportable(tree):
    head = {k: v for k, v in tree["lm_head"].items() if k in trained_head}
    return {**tree, "lm_head": head}

  as_f32 = functools.partial(jax.tree.map, lambda x: np.asarray(x, np.float32))
  return sft_lib.sft_from_params(
    exportable(final),
    exportable(as_f32(params0)),
    exportable(mask),
    kind="language",
    vocab_size=cfg.vocab_size,
    meta={
      "head": "mlm",
      "model_type": cfg.model_type,
      "corpus": config.data.corpus,
      "density": config.sparse.density,
      "base_model": configlib.expand(config.student.model),
      **lang_ckpt.base_identity(base_params, cfg.vocab_size),
    },
  )
