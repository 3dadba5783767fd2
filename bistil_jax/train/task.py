"""Phase 2 and teacher task-tuning: task training, dense or LT-SFT.

One driver, two commands (METHOD.md sections 4-5):
  bistil finetune: task-tunes a model (the MMT) on gold labels; dense
    (exports an HF dir with the task head) or LT-SFT (exports an SFT dir).
  bistil sft: phase 2, LT-SFT of the phase-1 student against a task-tuned
    teacher (soft cross-entropy on its logits + hidden and attention MSE,
    optional gold loss), exported as a task SFT dir.

LT-SFT: dense phase -> mask = global top-K |theta - theta0| over the
eligible body -> body and head reset to their initial values -> sparse
phase with a fresh optimiser and schedule whose final update is gated by
the mask -> SFT = sparse body diff + dense head.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from bistil_jax import configlib, losses, metrics, partitioning, sparse
from bistil_jax.checkpoint import hf
from bistil_jax.checkpoint import manager as ckpt
from bistil_jax.data import pipeline, tasks, vocab
from bistil_jax.errors import BistilError
from bistil_jax.model.config import ModelConfig
from bistil_jax.model.encoder import Model, init_params
from bistil_jax.train import loop, runner, steps
from bistil_jax.train import state as state_lib

log = logging.getLogger(__name__)

RESUME_SAFE = (
  "train.log_every",
  "train.eval_every",
  "train.checkpoint_every",
  "train.keep_checkpoints",
  "train.async_checkpoints",
  "eval",
)
HEAD_OF_KIND = {
  "token": "token_classification",
  "pair": "sequence_classification",
}
RESULTS = "results.json"
STAGES = ("dense", "sparse")  # LT-SFT stages, each with its checkpoints


# ------------------------------------------------------------------ losses
@dataclasses.dataclass(frozen=True)
class TaskLossConfig:
  """Weights of the task-training terms (METHOD.md 4.3, 7.4).

  Phase 2 as released: kl (soft cross-entropy, T=2, no T^2) + hidden +
  attention, weight 1 each, no gold loss. Fine-tuning: gold only.
  """

  gold: float = 0.0
  kl: float = 1.0
  hidden: float = 1.0
  attention: float = 1.0
  temperature: float = 2.0
  l1: float = 0.0  # L1 pull toward theta0 over the trainable entries

  @property
  def needs_teacher(self) -> bool:
    return self.kl > 0 or self.hidden > 0 or self.attention > 0


def _selected(batch, kind: str) -> jax.Array:
  """Rows the logit losses average over: labelled first sub-words or
  real examples."""
  if kind == "token":
    return batch["labels"] != tasks.IGNORE_LABEL  # [b, l]
  return batch["example_mask"] > 0  # [b]


def task_losses(
  params,
  origin,
  teacher,
  batch,
  key,
  *,
  model: Model,
  teacher_model: Model | None,
  loss_cfg: TaskLossConfig,
  kind: str,
  trainable=None,
):
  """Weighted task loss and its terms for one batch."""
  mask = batch["attention_mask"]
  want_attn = teacher_model is not None and loss_cfg.attention > 0
  kw = dict(
    attention_mask=mask,
    token_type_ids=batch["token_type_ids"],
    output_attentions=want_attn,
  )
  out = model.apply(
    {"params": params},
    batch["input_ids"],
    deterministic=False,
    rngs={"dropout": key},
    **kw,
  )
  sel = _selected(batch, kind)
  terms = {}
  if loss_cfg.gold > 0:
    labels = jnp.where(sel, batch["labels"], tasks.IGNORE_LABEL)
    terms["gold"] = losses.token_cross_entropy(out.logits, labels)
  if teacher_model is not None and loss_cfg.needs_teacher:
    t = teacher_model.apply(
      {"params": jax.lax.stop_gradient(teacher)}, batch["input_ids"], **kw
    )
    hidden_pairs, attn_pairs = losses.layer_maps(
      teacher_model.config.num_hidden_layers, model.config.num_hidden_layers
    )
    if loss_cfg.kl > 0:
      terms["kl"] = losses.soft_cross_entropy(
        out.logits, t.logits, loss_cfg.temperature, mask=sel
      )
    if loss_cfg.hidden > 0:
      terms["hidden"] = losses.hidden_mse_layers(
        out.hidden_states, t.hidden_states, hidden_pairs, mask=mask > 0
      )
    if want_attn:
      terms["attention"] = losses.attention_mse_layers(
        out.attentions, t.attentions, attn_pairs, key_mask=mask > 0
      )
  total = sum(getattr(loss_cfg, n) * term.mean for n, term in terms.items())
  if loss_cfg.l1 > 0:
    penalty = sparse.l1_to_origin(params, origin, trainable, loss_cfg.l1)
    terms["l1"] = losses.LossTerm(penalty, jnp.float32(1.0))
    total = total + penalty
  return total, terms


def task_step(
  state: state_lib.TrainState,
  origin,
  teacher,
  update_mask,
  batch,
  key,
  *,
  model: Model,
  teacher_model: Model | None,
  tx: optax.GradientTransformation,
  loss_cfg: TaskLossConfig,
  kind: str,
  lr_schedule,
):
  """One update; `update_mask` (bool pytree or None) restricts it to the
  LT-SFT mask (see steps.apply_gradients)."""
  step_key = jax.random.fold_in(key, state.step)

  def loss_fn(params):
    return task_losses(
      params,
      origin,
      teacher,
      batch,
      step_key,
      model=model,
      teacher_model=teacher_model,
      loss_cfg=loss_cfg,
      kind=kind,
      trainable=update_mask,
    )

  (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  return steps.apply_gradients(
    state,
    grads,
    tx=tx,
    loss=loss,
    terms=terms,
    attention_mask=batch["attention_mask"],
    lr_schedule=lr_schedule,
    update_mask=update_mask,
  )


def predict(params, batch, *, model: Model):
  """Argmax label ids: [b, l] for token tasks, [b] for pair tasks."""
  out = model.apply(
    {"params": params},
    batch["input_ids"],
    attention_mask=batch["attention_mask"],
    token_type_ids=batch["token_type_ids"],
  )
  return jnp.argmax(out.logits, -1)


# ------------------------------------------------------------------ models
def _fill_missing(
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
  task: str,
  labels: Sequence[str],
  rng: jax.Array,
) -> tuple[dict[str, Any], ModelConfig, list[str]]:
  """Body of `params` + a fresh head for `task`. Returns (params, config,
  fresh top-level groups: the head, and a pooler where one is created)."""
  head = HEAD_OF_KIND[tasks.task_spec(task).kind]
  pooler = config.add_pooler or (
    head == "sequence_classification" and not config.is_roberta
  )
  cfg = config.replace(
    head=head,
    num_labels=len(labels),
    id2label=tuple(labels),
    add_pooler=pooler,
  )
  body = {k: v for k, v in params.items() if k not in sparse.HEAD_KEYS}
  out, new = _fill_missing(body, cfg, rng)
  return out, cfg, new


def load_task_model(
  path: str,
  task: str,
  labels: Sequence[str],
  rng: jax.Array,
  sft_paths: Sequence[str] = (),
) -> tuple[Model, dict[str, Any], list[str]]:
  """An HF dir (+ SFTs) with a fresh head for the task.

  Returns:
    (model, params, the fresh top-level groups).
  """
  model, params = merged_model(path, sft_paths)
  params, cfg, new = with_task_head(params, model.config, task, labels, rng)
  log.info("%s: new %s head (%s)", path, cfg.head, ", ".join(new))
  return Model(cfg), params, new


def config_for_sft(cfg: ModelConfig, sft: sparse.SFT) -> ModelConfig:
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
  model_dir: str, sft_paths: Sequence[str]
) -> tuple[Model, dict[str, Any]]:
  """Base HF dir + SFTs (composed in order), head from the last task SFT.

  A task SFT's head (and a pooler it stores whole) replaces what the base
  has; missing groups are filled first so the dense tensors have a place,
  and the base check leaves those groups out (see sparse.apply_sft).
  """
  model, params = hf.load_hf(model_dir)
  cfg = model.config
  for path in sft_paths:
    sft = sparse.load_sft(path, config=cfg)
    if sft.dense:
      cfg = config_for_sft(cfg, sft)
      params, _ = _fill_missing(params, cfg, jax.random.PRNGKey(0))
    params = sparse.apply_sft(params, sft)
  return Model(cfg), params


def map_teacher_vocab(
  params, tcfg: ModelConfig, teacher_dir: str, student_tok_dir: str
) -> tuple[dict[str, Any], ModelConfig]:
  """Slices the teacher's embeddings to the student's vocabulary by token
  string (METHOD.md 1.2), so the teacher reads student ids."""
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


# ------------------------------------------------------------------ data
class TaskBatches:
  """Endless shuffled training batches; batch k is a pure function of k."""

  def __init__(self, data: tasks.TaskData, batch_size: int, seed: int):
    self.data = data
    self.batch_size = batch_size
    self.seed = seed
    self.per_epoch = data.num_batches(batch_size)
    if self.per_epoch < 1:
      raise BistilError(
        f"training split has {data.num_examples} examples, fewer than one "
        f"batch of {batch_size}"
      )
    self._step = 0
    self._order = (-1, None)

  def batch(self, step: int) -> dict[str, np.ndarray]:
    epoch, i = divmod(step, self.per_epoch)
    if self._order[0] != epoch:
      self._order = (epoch, self.data.order(self.seed, epoch))
    rows = self._order[1][i * self.batch_size : (i + 1) * self.batch_size]
    d = self.data
    return {
      "input_ids": d.input_ids[rows],
      "attention_mask": d.attention_mask[rows],
      "token_type_ids": d.token_type_ids[rows],
      "labels": d.labels[rows],
      "example_mask": np.ones(len(rows), np.int32),
    }

  def __iter__(self):
    return self

  def __next__(self):
    out = self.batch(self._step)
    self._step += 1
    return out

  def state(self) -> dict[str, Any]:
    return {"step": self._step, "seed": self.seed, "batch": self.batch_size}

  def restore(self, state: Mapping[str, Any]) -> None:
    if state.get("seed") != self.seed or state.get("batch") != self.batch_size:
      raise BistilError(f"data state {dict(state)} is from another run")
    self._step = int(state["step"])


BATCH_KEYS = (
  "input_ids",
  "attention_mask",
  "token_type_ids",
  "labels",
  "example_mask",
)


def encode_split(task, spec, tokenizer, labels, max_seq_len, *, train=False):
  examples = tasks.read_task(task, configlib.expand(spec))
  if not train:  # evaluation data keeps every example (truncated if long)
    return tasks.encode_task(
      task,
      examples,
      tokenizer,
      tasks.label_ids(labels),
      max_seq_len,
      drop_long=False,
    )
  return tasks.encode_task(
    task, examples, tokenizer, tasks.label_ids(labels), max_seq_len
  )


def evaluate_data(
  model: Model,
  params,
  data: tasks.TaskData,
  batch_size: int,
  mesh=None,
  jpredict=None,
) -> dict[str, float]:
  """The task's metrics on one encoded split (every example once)."""
  if jpredict is None:
    jpredict = jax.jit(functools.partial(predict, model=model))
  preds, golds, masks = [], [], []
  for b in data.batches(batch_size, shuffle=False, drop_remainder=False):
    arrays = {
      k: b[k] for k in ("input_ids", "attention_mask", "token_type_ids")
    }
    if mesh is not None:
      arrays = pipeline.to_global(arrays, mesh)
    preds.append(np.asarray(jax.device_get(jpredict(params, arrays))))
    golds.append(b["labels"])
    masks.append(b["example_mask"])
  return metrics.task_metrics(
    data.task,
    np.concatenate(preds),
    np.concatenate(golds),
    data.label_names,
    example_mask=np.concatenate(masks),
  )


def parse_tests(spec: str) -> list[tuple[str, str]]:
  """ "tgt=path,src=path2" -> [(name, spec)]; a bare path is named by its
  position."""
  out = []
  for i, item in enumerate(x for x in spec.split(",") if x.strip()):
    name, sep, path = item.partition("=")
    out.append((name.strip(), path.strip()) if sep else (f"test{i}", name))
  return out


# ------------------------------------------------------------------ run
def loss_config(config) -> TaskLossConfig:
  return TaskLossConfig(**config.loss.to_dict())


def validate(config, phase: str) -> None:
  configlib.check_keys_set(config, ("model", "data.train"))
  if config.task not in tasks.TASKS:
    raise BistilError(f"task must be one of {tasks.TASKS}, got {config.task!r}")
  lc = loss_config(config)
  if phase == "sft":
    configlib.check_keys_set(config, ("teacher",))
    if not lc.needs_teacher and lc.gold <= 0:
      raise BistilError("every phase-2 loss weight is 0")
  elif lc.gold <= 0:
    raise BistilError("finetune needs loss.gold > 0")
  s = config.sparse
  if s.enabled and not 0 < s.density <= 1:
    raise BistilError(f"sparse.density must be in (0, 1], got {s.density}")
  if config.train.dense_epochs <= 0:
    raise BistilError("train.dense_epochs must be positive")
  if s.enabled and config.train.sparse_epochs <= 0:
    raise BistilError("train.sparse_epochs must be positive")


def run(
  config: ml_collections.ConfigDict,
  workdir: str,
  *,
  phase: str,
  overwrite: bool = False,
) -> str:
  """Runs `bistil sft` (phase="sft") or `bistil finetune` and returns the
  export: an SFT dir (sparse) or an HF model dir (dense)."""
  with ckpt.workdir_lock(workdir):  # one run per workdir (issue 11)
    return _run(config, workdir, phase=phase, overwrite=overwrite)


def _run(config, workdir, *, phase, overwrite) -> str:
  validate(config, phase)
  plain = configlib.to_dict(config)
  task = config.task
  rng = jax.random.PRNGKey(config.seed)

  # --- data: labels from the teacher (sft), config or training split
  model_dir = configlib.expand(config.model)
  tok_dir = configlib.expand(config.data.tokenizer) or model_dir
  tokenizer, _ = vocab.load_tokenizer_dir(tok_dir)
  train_examples = tasks.read_task(task, configlib.expand(config.data.train))
  given = [x for x in config.data.labels.split(",") if x] or None
  teacher_model = teacher_params = None
  if phase == "sft":
    t_dir = configlib.expand(config.teacher)
    t_sfts = [configlib.expand(p) for p in config.teacher_sfts.split(",") if p]
    tm, tp = merged_model(t_dir, t_sfts)
    want = HEAD_OF_KIND[tasks.task_spec(task).kind]
    if tm.config.head != want:
      raise BistilError(
        f"teacher {t_dir} has a {tm.config.head} head; task {task} needs a "
        f"task-tuned teacher with a {want} head"
      )
    if given is None:
      given = list(tm.config.label_names)
      try:
        tasks.label_set(task, train_examples, given)
      except BistilError as e:
        raise BistilError(
          f"label sets differ: the data does not fit the teacher's head "
          f"{given} ({e})"
        ) from None
  labels = tasks.label_set(task, train_examples, given)
  train = tasks.encode_task(
    task,
    train_examples,
    tokenizer,
    tasks.label_ids(labels),
    config.data.max_seq_len,
  )
  dev = None
  if config.data.dev:
    dev = encode_split(
      task, config.data.dev, tokenizer, labels, config.data.max_seq_len
    )
  log.info(
    "%s: %d training examples (%d dropped as too long), %d labels",
    task,
    train.num_examples,
    train.num_dropped,
    len(labels),
  )

  # --- models
  base_sfts = [configlib.expand(p) for p in config.model_sfts.split(",") if p]
  model, params0, fresh = load_task_model(
    model_dir, task, labels, jax.random.fold_in(rng, 1), base_sfts
  )
  cfg = model.config
  if phase == "sft":
    if tuple(tm.config.label_names) != tuple(labels):
      raise BistilError(
        f"label sets differ: teacher has {list(tm.config.label_names)}, "
        f"the data has {list(labels)}"
      )
    tp, tcfg = map_teacher_vocab(tp, tm.config, t_dir, tok_dir)
    if tcfg.vocab_size != cfg.vocab_size:
      raise BistilError(
        f"teacher vocab {tcfg.vocab_size} != student vocab {cfg.vocab_size}"
      )
    losses.layer_maps(tcfg.num_hidden_layers, cfg.num_hidden_layers)
    teacher_model = Model(tcfg.replace(dtype=config.teacher_dtype))
    teacher_params = runner.cast(tp, config.teacher_dtype)
  runner.check_seq_len(cfg, config.data.max_seq_len, "model")
  if teacher_model is not None:
    runner.check_seq_len(
      teacher_model.config, config.data.max_seq_len, "teacher"
    )
  loss_cfg = loss_config(config)
  kind = tasks.task_spec(task).kind

  mesh = runner.build_mesh(config.mesh.shape)
  runner.per_host_batch(config.data.batch_size, mesh)
  if jax.process_count() > 1:
    raise BistilError("task training runs on one host (multi-host: TODO)")
  per_epoch = TaskBatches(train, config.data.batch_size, config.seed).per_epoch

  # --- workdir
  ckpt.prepare_workdir(
    workdir,
    phase,
    plain,
    overwrite=overwrite,
    resume_safe=RESUME_SAFE,
    outputs=STAGES + (RESULTS,),
  )
  repl = partitioning.replicated(mesh)
  p_shard = partitioning.param_shardings(cfg, mesh)
  origin = partitioning.shard(params0, p_shard)
  teacher = None
  t_shard = None
  if teacher_model is not None:
    t_shard = partitioning.param_shardings(teacher_model.config, mesh)
    teacher = partitioning.shard(teacher_params, t_shard)
  data_sh = partitioning.data_sharding(mesh)
  batch_sh = {
    k: partitioning.data_sharding(mesh, ndim=1)
    if (k == "example_mask" or (k == "labels" and kind == "pair"))
    else data_sh
    for k in BATCH_KEYS
  }
  jpredict = jax.jit(
    functools.partial(predict, model=model),
    in_shardings=(p_shard, {k: data_sh for k in BATCH_KEYS[:3]}),
    out_shardings=repl,
  )
  eval_bs = config.data.batch_size

  def eval_fn(state):
    if dev is None:
      return {}
    m = evaluate_data(model, state.params, dev, eval_bs, mesh, jpredict)
    return {f"dev/{k}": v for k, v in m.items() if isinstance(v, float)}

  dense_steps = max(1, math.ceil(config.train.dense_epochs * per_epoch))
  sparse_steps = (
    max(1, math.ceil(config.train.sparse_epochs * per_epoch))
    if config.sparse.enabled
    else 0
  )
  key = jax.random.fold_in(rng, 2)

  def stage(name, params, update_mask, num_steps, step_offset, data_seed):
    optim = runner.optim_config(config.optim, num_steps)
    tx = state_lib.make_optimizer(optim)
    state, state_sh = runner.init_state(params, cfg, tx, mesh)
    mask_sh = None if update_mask is None else p_shard
    jstep = jax.jit(
      functools.partial(
        task_step,
        model=model,
        teacher_model=teacher_model,
        tx=tx,
        loss_cfg=loss_cfg,
        kind=kind,
        lr_schedule=state_lib.lr_at_step(optim),
      ),
      in_shardings=(state_sh, p_shard, t_shard, mask_sh, batch_sh, repl),
      out_shardings=(state_sh, repl),
      donate_argnums=(0,),
    )
    batches = TaskBatches(train, config.data.batch_size, data_seed)
    checkpointer = runner.make_checkpointer(
      os.path.join(workdir, name), config.train
    )
    state, start = runner.restore_latest(checkpointer, state, batches)

    def step_fn(state, b):
      arrays = pipeline.to_global({k: b[k] for k in BATCH_KEYS}, mesh)
      return jstep(state, origin, teacher, update_mask, arrays, key)

    writer = loop.MetricWriter(
      os.path.join(workdir, ckpt.METRICS), start_step=start + step_offset
    )
    try:
      with partitioning.activate(mesh):  # mesh + axis rules, every step
        state, _ = loop.run_loop(
          state,
          step_fn=step_fn,
          batches=batches,
          data_state=batches.state,
          start_step=start,
          settings=loop.LoopSettings(
            num_steps=num_steps,
            log_every=min(config.train.log_every, num_steps),
            eval_every=config.train.eval_every,
            prefix=name,
            step_offset=step_offset,
          ),
          checkpointer=checkpointer,
          writer=writer,
          eval_fn=eval_fn,
        )
    finally:
      writer.close()
      checkpointer.close()
    return state

  log.info(
    "%s %s: %d dense steps%s (%d batches/epoch of %d)",
    phase,
    task,
    dense_steps,
    f" + {sparse_steps} sparse steps" if sparse_steps else "",
    per_epoch,
    config.data.batch_size,
  )
  state = stage("dense", origin, None, dense_steps, 0, config.seed)
  final = state.params
  mask = None
  if config.sparse.enabled:
    # --- LT-SFT selection, reset, sparse phase
    eligible = sparse.eligible_mask(
      params0,
      embeddings=config.sparse.embeddings,
      layer_norm=config.sparse.layer_norm,
      vocab_size=cfg.vocab_size,
    )
    for key_ in fresh:  # no base values to select against: trained densely
      eligible[key_] = jax.tree.map(
        lambda x: np.zeros(np.shape(x), bool), eligible[key_]
      )
    n_eligible = sum(int(np.sum(x)) for x in jax.tree.leaves(eligible))
    k = sparse.k_from_density(eligible, config.sparse.density)
    delta = jax.tree.map(lambda a, b: jnp.abs(a - b), state.params, origin)
    body_mask = sparse.select_top_k(
      delta, eligible, k, vocab_size=cfg.vocab_size
    )
    # Head leaves, and body parts the base lacked (a fresh pooler), train
    # densely in the sparse phase and are stored whole.
    mask = {
      key_: (
        jax.tree.map(lambda x: jnp.ones(x.shape, bool), sub)
        if key_ in sparse.HEAD_KEYS or key_ in fresh
        else body_mask[key_]
      )
      for key_, sub in params0.items()
    }
    mask = partitioning.shard(jax.device_get(mask), p_shard)
    log.info(
      "LT-SFT: %d of %d eligible body entries trainable (density %.4f)",
      k,
      n_eligible,
      k / max(n_eligible, 1),
    )
    state = stage(
      "sparse", origin, mask, sparse_steps, dense_steps, config.seed + 1
    )
    final = state.params

  # --- evaluate and export
  host_final = jax.tree.map(
    lambda x: np.asarray(jax.device_get(x), np.float32), final
  )
  results = {"task": task, "labels": list(labels), "phase": phase}
  with partitioning.activate(mesh):
    if dev is not None:
      results["dev"] = evaluate_data(model, final, dev, eval_bs, mesh, jpredict)
    for name, spec in parse_tests(config.eval.tests):
      data = encode_split(
        task, spec, tokenizer, labels, config.data.max_seq_len
      )
      results[name] = evaluate_data(model, final, data, eval_bs, mesh, jpredict)
  for name, m in results.items():
    if isinstance(m, dict):
      log.info(
        "%s %s: %s", name, metrics.HEADLINE[task], m[metrics.HEADLINE[task]]
      )
  with open(os.path.join(workdir, RESULTS), "w") as f:
    json.dump(results, f, indent=2)
  out = runner.export_dir(workdir)
  if mask is not None:
    sft = sparse.sft_from_params(
      host_final,
      jax.tree.map(lambda x: np.asarray(x, np.float32), params0),
      jax.device_get(mask),
      kind="task",
      vocab_size=cfg.vocab_size,
      # Body groups the base lacked (a pooler made for a pair task) have no
      # base values to diff against: stored whole, like the head.
      dense_keys=[k for k in fresh if k not in sparse.HEAD_KEYS],
      meta={
        "task": task,
        "head": cfg.head,
        "label_names": list(labels),
        "num_labels": len(labels),
        "add_pooler": cfg.add_pooler,
        "density": config.sparse.density,
        "base_model": model_dir,
      },
    )
    sparse.save_sft(out, sft, overwrite=True)
    log.info("wrote task SFT to %s", out)
  else:
    hf.save_hf(
      out, cfg.replace(param_dtype="float32"), host_final, tok_dir, True
    )
  return out
