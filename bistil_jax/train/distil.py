"""Phase 1 (bilingual distillation) and MLM pre-training: their declarations.

`bistil distil` (docs/method.md section 2) trains a student with fewer layers
against the frozen (trimmed) teacher on monolingual source and target
batches, 50/50; each batch uses its language's teacher (the base plus that
language's SFTs). `bistil pretrain` MLM-trains `student.model` itself, no
teacher (the demo's teacher and the scratch baseline). Both run the driver
skeleton (driver.py) with one Stage and export an HF model dir; configs:
`configs/distil.py`, `configs/pretrain.py`.
"""

from __future__ import annotations

import functools
import json
import logging
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from bistil_jax import configlib, partitioning, paths
from bistil_jax.checkpoint import hf, student_init, surgery
from bistil_jax.checkpoint import manager as ckpt
from bistil_jax.data import corpus, pipeline, vocab
from bistil_jax.errors import BistilError
from bistil_jax.model.config import ModelConfig
from bistil_jax.model.encoder import Model
from bistil_jax.model.layers import vocab_logits_mask
from bistil_jax.train import driver, loop, steps

log = logging.getLogger(__name__)

STUDENT_CONFIG = "student_config.json"
# What a run writes besides the driver's outputs (removed on --overwrite).
OUTPUTS = (STUDENT_CONFIG, driver.BEST)
LANGS = surgery.LANGS


# ------------------------------------------------------------------ models
def sample_projections(
  teacher: Model,
  params: Any,
  stream: pipeline.LanguageStream,
  width: int,
  samples: int,
  seed: int,
) -> list[np.ndarray]:
  """Fixed P_l from one random real position per sequence (docs/method.md
  2.3)."""
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


def loss_config(config, pretrain: bool) -> steps.DistilLossConfig:
  if pretrain:  # no teacher: the student's own MLM loss only
    return steps.DistilLossConfig(
      hidden=0.0, attention=0.0, kl=0.0, mlm=config.loss.mlm
    )
  return steps.DistilLossConfig(**config.loss.to_dict())


def _models(config, pretrain: bool):
  """(student model, its host params, teacher model or None, [source,
  target] teacher host params or [None, None], tokenizer dir)."""
  if pretrain:
    path = configlib.expand(config.student.model)
    model, params = hf.load_hf(path)
    if model.config.head != "mlm":
      raise BistilError(
        f"pretrain needs an MLM model dir, {path} has a {model.config.head} "
        "head"
      )
    scfg = model.config.replace(
      dtype=config.student.dtype, param_dtype=config.student.param_dtype
    )
    tok = configlib.expand(config.data.tokenizer) or path
    return Model(scfg), params, None, [None, None], tok
  path = configlib.expand(config.teacher.model)
  teacher, t_params = surgery.load_teacher(path, config.teacher.dtype)
  tcfg = teacher.config
  s = config.student
  scfg = student_init.student_config(
    tcfg,
    layer_reduction=s.layer_reduction,
    hidden_reduction=s.hidden_reduction,
    dtype=s.dtype,
    param_dtype=s.param_dtype,
  )
  student = Model(scfg)
  steps.check_pair(student, teacher, loss_config(config, False))
  teachers = surgery.language_teachers(
    t_params, tcfg, path, surgery.language_sfts(config.teacher.sfts)
  )
  rng = jax.random.fold_in(jax.random.PRNGKey(config.seed), 1)
  s_params = student_init.init_student(t_params, tcfg, scfg, s.init, rng)
  log.info("%s", driver.parameter_overview(t_params, "teacher"))
  tok = configlib.expand(config.data.tokenizer) or path
  return student, s_params, teacher, teachers, tok


# -------------------------------------------------------------------- data
def _stream(tokenizer, spec: str, config, shard=0, shards=1, lines=None):
  return pipeline.LanguageStream.from_corpus(
    tokenizer,
    configlib.expand(spec),
    config.data.max_seq_len,
    max_lines=lines or config.data.max_lines or None,
    process_index=shard,
    num_processes=shards,
  )


def _data(config, tokenizer, model_cfg: ModelConfig, what: str):
  """(training batches of this host, {language: its fixed dev batches}).

  Each host reads only the data shards it owns (pipeline.ShardedBatches).
  """
  size, mask_id = pipeline.checked_mlm_ids(
    tokenizer,
    model_cfg.vocab_size,
    f"the {what}'s",
    "use the tokenizer the teacher was trimmed with",
  )
  d = config.data
  dev_specs = configlib.parse_named_list(config.eval.sets)
  # Every corpus checked (exists, not empty, UTF-8) before any is counted.
  corpus.check_corpora(
    configlib.expand(x) for x in (d.source, d.target, *dict(dev_specs).values())
  )
  num = d.shards or jax.process_count()  # splits the batch (validate)
  mine = pipeline.owned_shards(num, jax.process_index(), jax.process_count())
  mlm_kw = dict(
    vocab_size=size, mask_id=mask_id, mlm_probability=d.mlm_probability
  )
  parts = [
    pipeline.BilingualBatches(
      *[_stream(tokenizer, d[k], config, s, num) for k in LANGS],
      d.batch_size // num,
      config.seed,
      balance_block=d.balance_block,
      **mlm_kw,
    )
    for s in mine
  ]
  batches = pipeline.ShardedBatches(parts)
  dev = {}
  for name, spec in dev_specs:  # named source or target (validate)
    per_shard = [
      pipeline.eval_batches(
        _stream(tokenizer, spec, config, s, num),
        LANGS.index(name),
        d.batch_size // num,
        config.eval.batches,
        config.seed + 1,
        max_predictions=batches.max_predictions,
        **mlm_kw,
      )
      for s in mine
    ]
    # Shards may hold different numbers of dev batches: keep full ones.
    full = zip(*per_shard, strict=False)
    dev[name] = [pipeline.concat_batches(bs) for bs in full]
  return batches, dev


# -------------------------------------------------------------------- eval
def eval_sums(
  params, teacher, batch, *, student_model, teacher_model, loss_cfg
) -> dict[str, jax.Array]:
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
  # The weighted loss the step minimises, per batch (averaged over the
  # fixed dev batches): what `train.select_best=.../loss` selects on.
  out["loss/total"] = sum(
    getattr(loss_cfg, name) * term.mean for name, term in terms.items()
  )
  out["loss/count"] = jnp.float32(1.0)
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


# --------------------------------------------------------------------- run
def validate(config, pretrain: bool) -> steps.DistilLossConfig:
  """The phase's own config values, checked before anything is loaded."""
  required = ("student.model",) if pretrain else ("teacher.model",)
  configlib.check_keys_set(config, required + ("data.source", "data.target"))
  if not pretrain and config.student.init not in student_init.STRATEGIES:
    raise BistilError(
      f"student.init must be one of {student_init.STRATEGIES}, got "
      f"{config.student.init!r}"
    )
  d = config.data
  num = d.shards or jax.process_count()
  pipeline.owned_shards(num, jax.process_index(), jax.process_count())
  if d.batch_size % num:
    raise BistilError(
      f"data.batch_size {d.batch_size} does not split over {num} data shards"
    )
  names = []
  for name, spec in configlib.parse_named_list(config.eval.sets):
    if name not in LANGS:
      raise BistilError(
        f"eval.sets {name}={spec}: phase-1 dev sets are named source or target"
      )
    names.append(name)
  _check_select_best(config, names)
  return loss_config(config, pretrain)


def _check_select_best(config, names: list[str]) -> None:
  """train.select_best: "" or SETS/METRIC over the dev sets, evaluated
  during training (train.eval_every > 0)."""
  best = config.train.select_best
  if not best:
    return
  sets, _, metric = best.rpartition("/")
  if not metric or not sets or any(s not in names for s in sets.split("+")):
    raise BistilError(
      f"train.select_best={best!r} must be SET/METRIC or SET+SET/METRIC "
      f"with SET among eval.sets ({', '.join(names) or 'none given'}), "
      "e.g. source+target/loss"
    )
  if config.train.eval_every <= 0:
    raise BistilError(
      f"train.select_best={best!r} needs train.eval_every > 0 (the held-out "
      "sets are evaluated every eval_every steps)"
    )


def run(
  config: ml_collections.ConfigDict,
  workdir: str,
  *,
  overwrite: bool = False,
  phase: str = "distil",
) -> str:
  """Runs (or resumes) phase 1 ("distil") or MLM training ("pretrain").

  Returns:
    The exported model's HF dir (workdir/export), or "" when
    config.train.export is False.
  """
  pretrain = phase == "pretrain"
  loss_cfg = validate(config, pretrain)
  with driver.start(
    config, workdir, phase, overwrite=overwrite, outputs=OUTPUTS
  ) as claim:
    student, s_params, teacher, teachers, tok_dir = _models(config, pretrain)
    scfg = student.config
    ref = scfg if pretrain else teacher.config
    driver.check_seq_len(ref, config.data.max_seq_len, "model")
    tokenizer, _ = vocab.load_tokenizer_dir(tok_dir)
    batches, dev = _data(
      config, tokenizer, ref, "model" if pretrain else "teacher"
    )
    projections = None
    if not pretrain and scfg.hidden_size != ref.hidden_size and loss_cfg.hidden:
      # From the first lines of the source corpus, read the same on every
      # host, so every host computes the same projections.
      samples = config.student.projection_samples
      projections = sample_projections(
        teacher,
        teachers[0],
        _stream(tokenizer, config.data.source, config, lines=4 * samples),
        scfg.hidden_size,
        config.student.projection_samples,
        config.seed,
      )
    ctx = claim.open()
    if jax.process_index() == 0:
      (paths.path(workdir) / STUDENT_CONFIG).write_text(
        json.dumps(scfg.to_hf_dict(), indent=2, sort_keys=True)
      )
    frozen = _frozen_trees(ctx, teacher, teachers, projections)
    sums = functools.partial(
      eval_sums, student_model=student, teacher_model=teacher, loss_cfg=loss_cfg
    )
    stage = driver.Stage(
      name="train",
      model_config=scfg,
      params=driver.cast(s_params, scfg.param_dtype),
      loss_fn=functools.partial(
        steps.distil_losses,
        student_model=student,
        teacher_model=teacher,
        loss_cfg=loss_cfg,
      ),
      batches=batches,
      num_steps=config.train.num_steps,
      frozen=lambda batch: frozen[int(batch["lang"])],
      eval_fn=_eval_fn(ctx, jax.jit(sums), dev, frozen) if dev else None,
      select_best=config.train.select_best or None,
      prefetch=config.data.prefetch,
      batch_shape=(config.data.batch_size, batches.max_seq_len),
    )
    teacher_note = f" <- {ref.num_hidden_layers}-layer teacher"
    log.info(
      "%s: %d steps of %d x %d tokens, %d-layer model%s",
      phase,
      stage.num_steps,
      config.data.batch_size,
      batches.max_seq_len,
      scfg.num_hidden_layers,
      "" if pretrain else teacher_note,
    )
    del s_params, teachers
    state = driver.run_stage(ctx, stage)
    return export(ctx, scfg, state, tok_dir) if config.train.export else ""


def export(ctx, scfg: ModelConfig, state, tok_dir: str) -> str:
  """The trained model as an HF dir with the tokenizer (process 0 writes;
  every process takes part in gathering the shards)."""
  out = str(paths.path(ctx.workdir) / ckpt.EXPORT)
  params = driver.host_params(state.params)
  if jax.process_index() == 0:
    hf.save_hf(out, scfg.replace(param_dtype="float32"), params, tok_dir, True)
    log.info("exported the model to %s", out)
  return out


def _frozen_trees(ctx, teacher, teachers, projections) -> list[Any]:
  """Per-language frozen trees on the devices (one copy when both
  languages share the teacher)."""
  if teacher is None:
    return [None, None]
  proj = None
  if projections is not None:
    proj = [jax.device_put(p, ctx.replicated) for p in projections]
  tcfg = teacher.config
  out = []
  for i, tree in enumerate(teachers):
    if i and tree is teachers[0]:
      out.append(out[0])
      continue
    params = ctx.shard(driver.cast(tree, tcfg.dtype), tcfg)
    out.append({"params": params, "projections": proj})
  return out


def _eval_fn(ctx, jsums, dev, frozen):
  arrays = {  # fixed batches: moved to the devices once
    lang: [ctx.to_global(b) for b in bs] for lang, bs in dev.items()
  }

  def evaluate(state) -> dict[str, float]:
    out = {}
    for lang, batches in arrays.items():
      teacher = frozen[LANGS.index(lang)]
      host = partitioning.fetch_all(
        [functools.partial(jsums, state.params, teacher, b) for b in batches]
      )
      for k, v in loop.reduce_metrics(host).items():
        out[f"{lang}/{k}"] = v
    return out

  return evaluate


def model_from_workdir(
  workdir: str, run: dict[str, Any], step: int | None = None
) -> tuple[Model, dict[str, Any], str]:
  """(model, params, tokenizer dir) from a phase-1 / pretrain checkpoint."""
  path = paths.path(workdir) / STUDENT_CONFIG
  if not path.is_file():
    raise BistilError(f"{workdir} has no {STUDENT_CONFIG}")
  scfg = ModelConfig.from_hf_dict(json.loads(path.read_text()))
  step, state = ckpt.read_state(workdir, step)
  log.info("model from %s step %d", workdir, step)
  config = run["config"]
  model_key = "student" if run.get("phase") == "pretrain" else "teacher"
  tok = configlib.expand(
    config["data"].get("tokenizer") or config[model_key]["model"]
  )
  params = jax.tree.map(lambda x: np.asarray(x, np.float32), state["params"])
  return Model(scfg.replace(param_dtype="float32")), params, tok
