"""Phase 1: general bilingual distillation (METHOD.md section 2).

`run(config, workdir)` trains a student with fewer layers against a frozen
(trimmed) teacher on monolingual source and target batches, 50/50, and
exports it as an HF model dir with the teacher's tokenizer. Each batch uses
its language's teacher: the base teacher plus that language's SFT diff,
when one is configured. The config is `configs/distil.py`.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from bistil_jax import configlib, partitioning
from bistil_jax.checkpoint import hf, student_init
from bistil_jax.checkpoint import manager as ckpt
from bistil_jax.data import corpus, pipeline, vocab
from bistil_jax.errors import BistilError
from bistil_jax.model.config import ModelConfig
from bistil_jax.model.encoder import Model, vocab_logits_mask
from bistil_jax.train import loop, runner, steps
from bistil_jax.train import state as state_lib

log = logging.getLogger(__name__)

PHASE = "distil"
STUDENT_CONFIG = "student_config.json"
# Config keys that may change when a run is resumed.
RESUME_SAFE = (
  "train.log_every",
  "train.eval_every",
  "train.eval_batches",
  "train.checkpoint_every",
  "train.keep_checkpoints",
  "train.async_checkpoints",
  "train.export",
  "data.prefetch",
)
LANGS = ("source", "target")


# ------------------------------------------------------------ teachers
def language_teachers(
  base: dict[str, Any],
  tcfg: ModelConfig,
  teacher_dir: str,
  sft_paths: tuple[str, str],
) -> list[dict[str, Any]]:
  """[source teacher, target teacher] host params (METHOD.md 2.1).

  Each is base + that language's SFT diff (only the diffs: a language
  SFT's dense MLM-head values are not applied). The same object is reused
  when neither language has an SFT, so no memory is duplicated.
  """
  if not any(sft_paths):
    return [base, base]
  from bistil_jax import sparse

  keep_ids = None
  vmap = os.path.join(teacher_dir, vocab.VOCAB_MAP)
  if os.path.isfile(vmap):
    keep_ids = vocab.keep_ids_from_vocab_map(vocab.read_vocab_map(vmap))
  out = []
  for lang, path in zip(LANGS, sft_paths, strict=True):
    if not path:
      out.append(base)
      continue
    sft = sparse.load_sft(path, config=tcfg, keep_ids=keep_ids)
    out.append(sparse.apply_sft(base, sft, with_dense=False))
    log.info("%s teacher: base + SFT %s", lang, path)
  return out


def load_teacher(path: str, dtype: str) -> tuple[Model, dict[str, Any]]:
  """The teacher model dir; task heads are dropped (MLM head kept)."""
  model, params = hf.load_hf(path, dtype=dtype)
  cfg = model.config
  if cfg.head not in ("mlm", "none"):
    params = {k: v for k, v in params.items() if k != "classifier"}
    cfg = cfg.replace(head="none", num_labels=2, id2label=None)
    model = Model(cfg)
  return model, params


# --------------------------------------------------------------- data
def _stream(tokenizer, spec, config) -> pipeline.LanguageStream:
  return pipeline.LanguageStream.from_corpus(
    tokenizer,
    configlib.expand(spec),
    config.data.max_seq_len,
    max_lines=config.data.max_lines or None,
  )


def _check_tokenizer(tokenizer, tcfg: ModelConfig) -> tuple[int, int]:
  size, mask_id = pipeline.mlm_token_ids(tokenizer)
  if size > tcfg.vocab_size:
    raise BistilError(
      f"the tokenizer has {size} tokens but the teacher's vocab_size is "
      f"{tcfg.vocab_size}: use the tokenizer the teacher was trimmed with"
    )
  return size, mask_id


def sample_projections(
  teacher: Model,
  params: Any,
  stream: pipeline.LanguageStream,
  width: int,
  samples: int,
  seed: int,
) -> list[np.ndarray]:
  """Fixed P_l from one random real position per sequence (METHOD 2.3)."""
  rng = np.random.default_rng(seed)
  n = min(samples, stream.num_rows)
  ids, _ = stream.take(0, n, seed, 0)  # [n, l]
  fwd = jax.jit(lambda p, x: teacher.apply({"params": p}, x).hidden_states)
  per_layer: list[list[np.ndarray]] = []
  for start in range(0, n, 64):
    chunk = ids[start : start + 64]
    states = jax.device_get(fwd(params, chunk))  # L+1 x [c, l, D]
    pos = rng.integers(0, chunk.shape[1], size=len(chunk))
    for i, h in enumerate(states):
      if len(per_layer) <= i:
        per_layer.append([])
      per_layer[i].append(np.asarray(h)[np.arange(len(chunk)), pos])
  return student_init.hidden_projections(
    [np.concatenate(v) for v in per_layer], width
  )


# --------------------------------------------------------------- eval
def eval_step(
  params,
  teacher,
  batch,
  *,
  student_model: Model,
  teacher_model: Model | None,
  loss_cfg: steps.DistilLossConfig,
):
  """Per-language eval sums: the loss terms, masked-token accuracy and
  (with a teacher) student/teacher agreement at masked positions."""
  _, terms = steps.distil_losses(
    params,
    teacher,
    batch,
    jax.random.PRNGKey(0),
    student_model=student_model,
    teacher_model=teacher_model,
    loss_cfg=loss_cfg,
  )
  out = {}
  for name, term in terms.items():
    out[f"{name}/total"] = term.total
    out[f"{name}/count"] = term.count
  scfg = student_model.config
  if scfg.head != "mlm":
    return out
  kw = dict(
    attention_mask=batch["attention_mask"],
    logits_positions=batch["masked_lm_positions"],
  )
  vmask = vocab_logits_mask(scfg)
  s = student_model.apply({"params": params}, batch["input_ids"], **kw)
  s_pred = jnp.argmax(jnp.where(vmask, s.logits, -jnp.inf), -1)  # [b, p]
  w = batch["masked_lm_weights"]
  if teacher_model is not None and teacher_model.config.head == "mlm":
    t = teacher_model.apply(
      {"params": teacher["params"]}, batch["input_ids"], **kw
    )
    t_pred = jnp.argmax(jnp.where(vmask, t.logits, -jnp.inf), -1)
    out["agreement/total"] = jnp.sum((s_pred == t_pred) * w)
    out["agreement/count"] = jnp.sum(w)
  out["mlm_acc/total"] = jnp.sum((s_pred == batch["masked_lm_ids"]) * w)
  out["mlm_acc/count"] = jnp.sum(w)
  return out


# ---------------------------------------------------------------- run
def student_model_config(
  config: ml_collections.ConfigDict, tcfg: ModelConfig
) -> ModelConfig:
  s = config.student
  return student_init.student_config(
    tcfg,
    layer_reduction=s.layer_reduction,
    hidden_reduction=s.hidden_reduction,
    dtype=s.dtype,
    param_dtype=s.param_dtype,
  )


def loss_config(config: ml_collections.ConfigDict) -> steps.DistilLossConfig:
  return steps.DistilLossConfig(**config.loss.to_dict())


def optim_config(config: ml_collections.ConfigDict) -> state_lib.OptimConfig:
  return runner.optim_config(config.optim, config.train.num_steps)


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks that need no files: required keys and value ranges."""
  configlib.check_keys_set(
    config, ("teacher.model", "data.source", "data.target")
  )
  if config.student.init not in student_init.STRATEGIES:
    raise BistilError(
      f"student.init must be one of {student_init.STRATEGIES}, got "
      f"{config.student.init!r}"
    )
  loss_config(config)
  optim_config(config)
  loop.LoopSettings(
    num_steps=config.train.num_steps,
    log_every=config.train.log_every,
    eval_every=config.train.eval_every,
  )


def run(
  config: ml_collections.ConfigDict,
  workdir: str,
  *,
  overwrite: bool = False,
  phase: str = PHASE,
) -> str:
  """Runs (or resumes) phase 1 and returns the export dir.

  Args:
    config: a `configs/distil.py` config.
    workdir: the run's directory (created, resumed or refused).
    overwrite: replace a different run in `workdir`.
    phase: "distil", or "pretrain": MLM training of the model in
      config.teacher.model itself, no teacher (the demo's teacher and the
      scratch baseline); same data, loop, checkpoints and export.

  Returns:
    The exported student's HF model dir (workdir/export), or "" when
    config.train.export is False.
  """
  with ckpt.workdir_lock(workdir):  # one run per workdir (issue 11)
    return _run(config, workdir, overwrite=overwrite, phase=phase)


def _run(config, workdir, *, overwrite, phase) -> str:
  validate(config)
  plain = configlib.to_dict(config)

  # --- models: teacher, student config; checked before touching the workdir
  teacher_dir = configlib.expand(config.teacher.model)
  teacher_model, t_params = load_teacher(teacher_dir, config.teacher.dtype)
  tcfg = teacher_model.config
  loss_cfg = loss_config(config)
  pretrain = phase == "pretrain"
  if pretrain:
    if tcfg.head != "mlm":
      raise BistilError(
        f"pretrain needs an MLM model dir, {teacher_dir} has a {tcfg.head} head"
      )
    scfg = tcfg.replace(
      dtype=config.student.dtype, param_dtype=config.student.param_dtype
    )
    student_model = Model(scfg)
  else:
    scfg = student_model_config(config, tcfg)
    student_model = Model(scfg)
    steps.check_pair(student_model, teacher_model, loss_cfg)
  runner.check_seq_len(tcfg, config.data.max_seq_len, "teacher")
  tokenizer_dir = configlib.expand(config.data.tokenizer) or teacher_dir
  tokenizer, _ = vocab.load_tokenizer_dir(tokenizer_dir)
  vocab_size, mask_id = _check_tokenizer(tokenizer, tcfg)
  teachers_host = (
    [None, None]
    if pretrain
    else language_teachers(
      t_params,
      tcfg,
      teacher_dir,
      (
        configlib.expand(config.teacher.source_sft),
        configlib.expand(config.teacher.target_sft),
      ),
    )
  )

  # --- data
  mesh = runner.build_mesh(config.mesh.shape)
  host_batch = runner.per_host_batch(config.data.batch_size, mesh)
  corpus.check_corpora(  # every corpus checked before any is counted
    configlib.expand(config.data[k])
    for k in (*LANGS, *(f"{lang}_dev" for lang in LANGS))
  )
  streams = [_stream(tokenizer, config.data[k], config) for k in LANGS]
  batches = pipeline.BilingualBatches(
    streams[0],
    streams[1],
    host_batch,
    config.seed,
    vocab_size=vocab_size,
    mask_id=mask_id,
    mlm_probability=config.data.mlm_probability,
    balance_block=config.data.balance_block,
  )
  dev = {}
  for i, lang in enumerate(LANGS):
    spec = config.data[f"{lang}_dev"]
    if spec:
      dev[lang] = pipeline.eval_batches(
        _stream(tokenizer, spec, config),
        i,
        host_batch,
        config.train.eval_batches,
        config.seed + 1,
        vocab_size=vocab_size,
        mask_id=mask_id,
        mlm_probability=config.data.mlm_probability,
        max_predictions=batches.max_predictions,
      )

  # --- workdir (only now: bad input above leaves no trace)
  ckpt.prepare_workdir(
    workdir,
    phase,
    plain,
    overwrite=overwrite,
    resume_safe=RESUME_SAFE,
    outputs=(STUDENT_CONFIG,),
  )
  if jax.process_index() == 0:
    with open(os.path.join(workdir, STUDENT_CONFIG), "w") as f:
      json.dump(scfg.to_hf_dict(), f, indent=2, sort_keys=True)

  # --- student params and projections (deterministic from the seed)
  rng = jax.random.PRNGKey(config.seed)
  if pretrain:
    s_params = t_params
  else:
    s_params = student_init.init_student(
      t_params, tcfg, scfg, config.student.init, jax.random.fold_in(rng, 1)
    )
  s_params = runner.cast(s_params, scfg.param_dtype)
  log.info("%s", runner.parameter_overview(t_params, "teacher"))
  log.info("%s", runner.parameter_overview(s_params, "student"))
  projections = None
  if scfg.hidden_size != tcfg.hidden_size and loss_cfg.hidden > 0:
    projections = sample_projections(
      teacher_model,
      t_params,
      streams[0],
      scfg.hidden_size,
      config.student.projection_samples,
      config.seed,
    )

  # --- shard
  t_dtype = tcfg.dtype
  t_shard = partitioning.param_shardings(tcfg, mesh)
  teachers = []
  for tree in teachers_host:
    if tree is None:
      teachers.append(None)
      continue
    if teachers and tree is teachers_host[0]:
      teachers.append(teachers[0])
      continue
    teachers.append(partitioning.shard(runner.cast(tree, t_dtype), t_shard))
  repl = partitioning.replicated(mesh)
  proj = None
  if projections is not None:
    proj = [jax.device_put(p, repl) for p in projections]
  teacher_trees = [
    None if t is None else {"params": t, "projections": proj} for t in teachers
  ]
  optim = optim_config(config)
  tx = state_lib.make_optimizer(optim)
  state, state_sh = runner.init_state(s_params, scfg, tx, mesh)
  del s_params, t_params, teachers_host

  # --- step
  teacher_sh = {
    "params": t_shard,
    "projections": None if proj is None else [repl] * len(proj),
  }
  if pretrain:
    teacher_sh, teacher_model = None, None
  step_fn = functools.partial(
    steps.distil_step,
    student_model=student_model,
    teacher_model=teacher_model,
    tx=tx,
    loss_cfg=loss_cfg,
    lr_schedule=state_lib.lr_at_step(optim),
  )
  dshard = partitioning.data_sharding(mesh)
  batch_keys = (
    "input_ids",
    "attention_mask",
    "token_type_ids",
    "masked_lm_positions",
    "masked_lm_ids",
    "masked_lm_weights",
  )
  batch_sh = {k: dshard for k in batch_keys}
  jstep = jax.jit(
    step_fn,
    in_shardings=(state_sh, teacher_sh, batch_sh, repl),
    out_shardings=(state_sh, repl),
    donate_argnums=(0,),
  )
  key = jax.random.fold_in(rng, 2)

  def train_step(state, host_batch):
    lang = int(host_batch["lang"])
    arrays = pipeline.to_global({k: host_batch[k] for k in batch_keys}, mesh)
    return jstep(state, teacher_trees[lang], arrays, key)

  jeval = jax.jit(
    functools.partial(
      eval_step,
      student_model=student_model,
      teacher_model=teacher_model,
      loss_cfg=loss_cfg,
    ),
    in_shardings=(state_sh.params, teacher_sh, batch_sh),
    out_shardings=repl,
  )

  dev_arrays = {  # fixed batches: moved to the devices once
    lang: [pipeline.to_global({k: b[k] for k in batch_keys}, mesh) for b in bs]
    for lang, bs in dev.items()
  }

  def evaluate(state) -> dict[str, float]:
    out = {}
    for lang, arrays in dev_arrays.items():
      teacher = teacher_trees[LANGS.index(lang)]
      sums = [jeval(state.params, teacher, a) for a in arrays]
      for k, v in loop.reduce_metrics(jax.device_get(sums)).items():
        out[f"{lang}/{k}"] = v
    return out

  # --- restore
  checkpointer = runner.make_checkpointer(workdir, config.train)
  state, start = runner.restore_latest(checkpointer, state, batches)

  # --- loop
  writer = loop.MetricWriter(
    os.path.join(workdir, ckpt.METRICS), start_step=start
  )
  if start == 0:
    writer.text(0, "config", "```\n" + json.dumps(plain, indent=2) + "\n```")
  settings = loop.LoopSettings(
    num_steps=config.train.num_steps,
    log_every=config.train.log_every,
    eval_every=config.train.eval_every,
  )
  log.info(
    "%s: %d steps of %d x %d tokens, %d-layer model%s",
    "MLM pre-training" if pretrain else "phase 1",
    settings.num_steps,
    config.data.batch_size,
    batches.max_seq_len,
    scfg.num_hidden_layers,
    "" if pretrain else f" <- {tcfg.num_hidden_layers}-layer teacher",
  )
  prefetched = pipeline.prefetch(batches, size=config.data.prefetch)
  try:
    with partitioning.activate(mesh):  # mesh + axis rules for every step
      state, _ = loop.run_loop(
        state,
        step_fn=train_step,
        batches=prefetched,
        data_state=prefetched.state,
        start_step=start,
        settings=settings,
        checkpointer=checkpointer,
        writer=writer,
        eval_fn=evaluate if dev else None,
      )
  finally:
    prefetched.close()
    writer.close()
    checkpointer.close()

  # --- export
  if not config.train.export:
    return ""
  out = runner.export_dir(workdir)
  export_student(out, scfg, state.params, tokenizer_dir)
  return out


def export_student(
  out: str, scfg: ModelConfig, params: Any, tokenizer_dir: str
) -> None:
  """Writes the student as an HF model dir (process 0), replacing `out`."""
  params = jax.tree.map(
    lambda x: np.asarray(jax.device_get(x)).astype(np.float32), params
  )
  if jax.process_index() == 0:
    hf.save_hf(
      out, scfg.replace(param_dtype="float32"), params, tokenizer_dir, True
    )
    log.info("exported the model to %s", out)


def model_from_workdir(
  workdir: str, run: dict[str, Any], step: int | None = None
) -> tuple[Model, dict[str, Any], str]:
  """(student model, params, tokenizer dir) from a phase-1 checkpoint."""
  path = os.path.join(workdir, STUDENT_CONFIG)
  if not os.path.isfile(path):
    raise BistilError(f"{workdir} has no {STUDENT_CONFIG}")
  with open(path) as f:
    scfg = ModelConfig.from_hf_dict(json.load(f))
  step, state = ckpt.read_state(workdir, step)
  log.info("student from %s step %d", workdir, step)
  data = run["config"]["data"]
  tok = configlib.expand(
    data.get("tokenizer") or run["config"]["teacher"]["model"]
  )
  params = jax.tree.map(lambda x: np.asarray(x, np.float32), state["params"])
  return Model(scfg.replace(param_dtype="float32")), params, tok
