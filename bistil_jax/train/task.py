"""Task-tuning and phase 2: their declarations (docs/method.md sections 4-5).

  bistil finetune: task-tunes `student.model` (the MMT) on gold labels;
    dense (exports an HF dir with the task head) or LT-SFT (an SFT dir).
  bistil sft: phase 2, LT-SFT of the phase-1 student against a task-tuned
    teacher (soft cross-entropy on its logits + hidden and attention MSE,
    optional gold loss), exported as a task SFT dir.

LT-SFT is two Stages of the driver skeleton: the dense stage; the mask =
global top-K |theta - theta0| over the eligible body; the sparse stage from
theta0 with a fresh optimiser whose update is gated by the mask (saved in
its checkpoints, so a resumed sparse stage never replays the dense one);
SFT = sparse body diff + dense head.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from bistil_jax import configlib, losses, paths, sparse, tasks
from bistil_jax.checkpoint import hf, surgery
from bistil_jax.checkpoint import manager as ckpt
from bistil_jax.checkpoint import sft as sft_lib
from bistil_jax.data import tasks as task_data
from bistil_jax.data import vocab
from bistil_jax.errors import BistilError
from bistil_jax.model.encoder import Model
from bistil_jax.train import driver, lt_sft, steps
from bistil_jax.train.lt_sft import eligible_entries, trainable_count

log = logging.getLogger(__name__)

RESULTS = "results.json"


# ------------------------------------------------------------------ losses
@dataclasses.dataclass(frozen=True)
class TaskLossConfig:
  """Weights of the task-training terms (docs/method.md 4.3, 7.4).

  Phase 2 as released: kl (soft cross-entropy, T=2, no T^2) + hidden +
  attention, weight 1 each, no gold loss. Fine-tuning: gold only.
  """

  gold: float = 0.0
  kl: float = 0.0
  hidden: float = 0.0
  attention: float = 0.0
  temperature: float = 2.0
  l1: float = 0.0  # L1 pull toward theta0 (the frozen "origin")

  @property
  def needs_teacher(self) -> bool:
    return self.kl > 0 or self.hidden > 0 or self.attention > 0


def task_losses(
  params,
  frozen,
  batch,
  key,
  *,
  model: Model,
  teacher_model: Model | None,
  loss_cfg: TaskLossConfig,
  task: tasks.Task,
  eligible=None,
):
  """Weighted task loss and its terms for one batch; the task's kind says
  the model inputs, the rows and the gold and soft losses on its logits.

  frozen = {"teacher": teacher params or None, "origin": theta0 or None}.
  L1 toward theta0 runs over the `eligible` entries (a static bool tree) in
  both stages, as released (docs/method.md 4.5).
  """
  mask = batch["attention_mask"]
  want_attn = teacher_model is not None and loss_cfg.attention > 0
  kw = dict(
    attention_mask=mask,
    token_type_ids=batch["token_type_ids"],
    output_attentions=want_attn,
    **task.model_inputs(batch),
  )
  out = steps.apply_training(model, params, batch["input_ids"], key, **kw)
  rows = task.loss_rows(batch)
  terms = {}
  if loss_cfg.gold > 0:
    terms["gold"] = task.gold_loss(out.logits, batch, rows)
  if teacher_model is not None and loss_cfg.needs_teacher:
    t = teacher_model.apply(
      {"params": frozen["teacher"]}, batch["input_ids"], **kw
    )
    hidden_pairs, attn_pairs = losses.layer_maps(
      teacher_model.config.num_hidden_layers, model.config.num_hidden_layers
    )
    if loss_cfg.kl > 0:
      terms["kl"] = task.soft_loss(
        out.logits, t.logits, batch, rows, loss_cfg.temperature
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
    penalty = sparse.l1_to_origin(
      params, frozen["origin"], eligible, loss_cfg.l1
    )
    terms["l1"] = losses.LossTerm(penalty, jnp.float32(1.0))
    total = total + penalty
  return total, terms


def predict(params, batch, *, model: Model, task: tasks.Task):
  """The task's device predictions of one batch (see each kind's
  `predict`: argmax label ids, dp's [b, l, 2], qa's span logits)."""
  out = model.apply(
    {"params": params},
    batch["input_ids"],
    attention_mask=batch["attention_mask"],
    token_type_ids=batch["token_type_ids"],
  )
  return task.predict(out.logits)


# -------------------------------------------------------------- evaluation
def encode_split(
  task: tasks.Task,
  spec,
  tokenizer,
  labels,
  max_seq_len,
  *,
  train=False,
  **options,
):
  """A split encoded for training (over-long sentences dropped, as
  released) or evaluation (windowed: every gold word is scored; dp: an
  over-long sentence's words count as wrong, see data/dp.py).
  `options`: the task's own encoding options (see `task_options`)."""
  examples = task.read(configlib.expand(spec))
  return task.encode(
    examples,
    tokenizer,
    task_data.label_ids(labels),
    max_seq_len,
    train=train,
    **options,
  )


def task_options(config, task: tasks.Task) -> dict[str, Any]:
  """The task's own encoding options (qa: windows and decoding), from
  `config.data`, else their defaults."""
  return {k: config.data.get(k, v) for k, v in task.options.items()}


def evaluate_data(
  jpredict, params, data: task_data.TaskData, batch_size: int, task, ctx=None
) -> dict[str, float]:
  """The task's metrics on one encoded split: every row once; the windows
  of an over-long sentence are joined back, so every gold word counts once.
  With a driver Context, every host feeds its slice of each batch (the
  predictions come back replicated)."""
  hosts = (jax.process_index(), jax.process_count()) if ctx else (0, 1)

  def host_predict(arrays):
    out = jpredict(params, ctx.to_global(arrays) if ctx else arrays)
    return np.asarray(jax.device_get(out))

  return task.evaluate(host_predict, data, batch_size, hosts)


# ------------------------------------------------------------------ models
def _task_teacher(config, task: tasks.Task):
  """(teacher model, host params) of phase 2, checked against the task."""
  t_dir = configlib.expand(config.teacher.model)
  tm, tp = surgery.merged_model(t_dir, surgery.split_list(config.teacher.sfts))
  if tm.config.head != task.head:
    raise BistilError(
      f"teacher {t_dir} has a {tm.config.head} head; task {task.name} needs "
      f"a task-tuned teacher with a {task.head} head"
    )
  return tm, tp, t_dir


def _labels(config, task: tasks.Task, examples, teacher) -> tuple[str, ...]:
  if task.fixed_labels is not None:
    return task.fixed_labels  # the head's outputs; nothing to match
  given = [x for x in config.data.labels.split(",") if x] or None
  if teacher is not None and given is None:
    given = list(teacher.config.label_names)
    try:
      return task.label_set(examples, given)
    except BistilError as e:
      raise BistilError(
        f"label sets differ: the data does not fit the teacher's head "
        f"{given} ({e})"
      ) from None
  labels = task.label_set(examples, given)
  if teacher is not None and tuple(teacher.config.label_names) != labels:
    raise BistilError(
      f"label sets differ: teacher has {list(teacher.config.label_names)}, "
      f"the data has {list(labels)}"
    )
  return labels


def loss_config(config) -> TaskLossConfig:
  return TaskLossConfig(**config.loss.to_dict())


def validate(config, phase: str) -> TaskLossConfig:
  configlib.check_keys_set(config, ("student.model", "data.train"))
  if config.task not in tasks.REGISTRY:
    raise BistilError(
      f"task must be one of {', '.join(tasks.NAMES)}, got {config.task!r}"
    )
  lc = loss_config(config)
  if phase == "sft":
    configlib.check_keys_set(config, ("teacher.model",))
    if not lc.needs_teacher and lc.gold <= 0:
      raise BistilError("every phase-2 loss weight is 0")
  elif lc.gold <= 0:
    raise BistilError("finetune needs loss.gold > 0")
  s = config.sparse
  if s.num_entries < 0:
    raise BistilError(f"sparse.num_entries must be >= 0, got {s.num_entries}")
  if s.enabled and not 0 < s.density <= 1:
    raise BistilError(f"sparse.density must be in (0, 1], got {s.density}")
  if config.train.epochs < 0:
    raise BistilError("train.epochs must be >= 0")
  if s.enabled and s.epochs <= 0:
    raise BistilError("sparse.epochs must be positive")
  best = config.train.select_best
  if best:
    names = [n for n, _ in configlib.parse_named_list(config.eval.sets)]
    name, _, metric = best.partition("/")
    if name not in names or not metric:
      raise BistilError(
        f"train.select_best={best!r} must be SET/METRIC with SET one of "
        f"eval.sets ({', '.join(names) or 'none given'})"
      )
  return lc


# --------------------------------------------------------------------- run
@dataclasses.dataclass
class Inputs:
  """What a task run reads, checked before the workdir is touched."""

  task: tasks.Task
  labels: tuple[str, ...]
  train: task_data.TaskData
  evals: list[tuple[str, task_data.TaskData]]
  model: Model  # the trained model (student + task head)
  params0: Any  # its host params at step 0 (theta0 of LT-SFT)
  fresh: list[str]  # top-level groups created here (head, pooler)
  per_epoch: int  # training batches per epoch
  teacher: Model | None
  teacher_params: Any
  tok_dir: str


def prepare(config, phase: str) -> Inputs:
  """Data and models of a task run: labels (the teacher's, the config's or
  the training split's), encoded splits, the model with its task head, and
  the teacher mapped onto the student's vocabulary."""
  task = tasks.get(config.task)
  model_dir = configlib.expand(config.student.model)
  tok_dir = configlib.expand(config.data.tokenizer) or model_dir
  tokenizer, _ = vocab.load_tokenizer_dir(tok_dir)
  examples = task.read(configlib.expand(config.data.train))
  teacher = tp = None
  if phase == "sft":
    teacher, tp, t_dir = _task_teacher(config, task)
  labels = _labels(config, task, examples, teacher)
  max_len = config.data.max_seq_len
  options = task_options(config, task)
  train = task.encode(
    examples,
    tokenizer,
    task_data.label_ids(labels),
    max_len,
    train=True,
    **options,
  )
  # Checks the split fills a batch; the stages' lengths are in epochs of it.
  per_epoch = task_data.TaskBatches(train, config.data.batch_size, 0).per_epoch
  evals = [
    (name, encode_split(task, spec, tokenizer, labels, max_len, **options))
    for name, spec in configlib.parse_named_list(config.eval.sets)
  ]
  log.info(
    "%s: %d training examples (%d dropped as too long), %d labels",
    task.name,
    train.num_examples,
    train.num_dropped,
    len(labels),
  )
  base, params0 = surgery.merged_model(
    model_dir, surgery.split_list(config.student.sfts)
  )
  rng = jax.random.fold_in(jax.random.PRNGKey(config.seed), 1)
  params0, cfg, fresh = surgery.with_task_head(
    params0, base.config, task.head, labels, rng
  )
  s = config.student
  cfg = cfg.replace(dtype=s.dtype, param_dtype=s.param_dtype)
  log.info("%s: new %s head (%s)", model_dir, cfg.head, ", ".join(fresh))
  if config.sparse.enabled:  # K fits the model: checked before any work
    trainable_count(config, eligible_entries(config, cfg, params0, fresh))
  driver.check_seq_len(cfg, max_len, "model")
  if teacher is not None:
    tp, tcfg = surgery.map_teacher_vocab(tp, teacher.config, t_dir, tok_dir)
    if tcfg.vocab_size != cfg.vocab_size:
      raise BistilError(
        f"teacher vocab {tcfg.vocab_size} != student vocab {cfg.vocab_size}"
      )
    losses.layer_maps(tcfg.num_hidden_layers, cfg.num_hidden_layers)
    driver.check_seq_len(tcfg, max_len, "teacher")
    teacher = Model(tcfg.replace(dtype=config.teacher.dtype))
    tp = driver.cast(tp, config.teacher.dtype)
  return Inputs(
    task,
    labels,
    train,
    evals,
    Model(cfg),
    params0,
    fresh,
    per_epoch,
    teacher,
    tp,
    tok_dir,
  )


def run(
  config: ml_collections.ConfigDict,
  workdir: str,
  *,
  phase: str,
  overwrite: bool = False,
) -> str:
  """Runs `bistil sft` (phase="sft") or `bistil finetune` and returns the
  export: an SFT dir (sparse) or an HF model dir (dense)."""
  loss_cfg = validate(config, phase)
  outputs = lt_sft.STAGES + (RESULTS,)
  with driver.start(
    config, workdir, phase, overwrite=overwrite, outputs=outputs
  ) as claim:
    inp = prepare(config, phase)
    ctx = claim.open()
    jpredict = jax.jit(
      functools.partial(predict, model=inp.model, task=inp.task),
      out_shardings=ctx.replicated,
    )
    state, mask = train_stages(ctx, inp, loss_cfg, jpredict)
    return finish(ctx, inp, state, mask, jpredict)


def train_stages(ctx, inp: Inputs, loss_cfg, jpredict):
  """The dense stage, or LT-SFT's dense stage, mask and sparse stage.
  Returns (final device state, host mask or None)."""
  config, cfg = ctx.config, inp.model.config
  frozen = {
    "teacher": None
    if inp.teacher is None
    else ctx.shard(inp.teacher_params, inp.teacher.config),
    "origin": ctx.shard(inp.params0, cfg) if loss_cfg.l1 > 0 else None,
  }
  inp.teacher_params = None  # on the devices now
  bs = config.data.batch_size
  hosts = dict(
    process_index=jax.process_index(), num_processes=jax.process_count()
  )
  eligible = eligible_entries(config, cfg, inp.params0, inp.fresh)

  def eval_fn(state):
    out = {}
    for name, data in inp.evals:
      m = evaluate_data(jpredict, state.params, data, bs, inp.task, ctx)
      out.update({f"{name}/{k}": v for k, v in m.items() if "num" not in k})
    return out

  def stage(name, mask, num_steps, offset, seed):
    return driver.Stage(
      name=name,
      model_config=cfg,
      params=inp.params0,
      loss_fn=functools.partial(
        task_losses,
        model=inp.model,
        teacher_model=inp.teacher,
        loss_cfg=loss_cfg,
        task=inp.task,
        eligible=eligible,
      ),
      batches=task_data.TaskBatches(inp.train, bs, seed, **hosts),
      num_steps=num_steps,
      frozen=lambda batch: frozen,
      mask=mask,
      eval_fn=eval_fn if inp.evals else None,
      step_offset=offset,
      prefetch=config.data.prefetch,
      batch_shape=(bs, inp.train.max_seq_len),
      # Best-epoch selection evaluates once per epoch by default.
      eval_every=(config.train.eval_every or inp.per_epoch)
      if config.train.select_best
      else None,
      select_best=config.train.select_best or None,
    )

  dense_steps = math.ceil(config.train.epochs * inp.per_epoch)
  if not config.sparse.enabled:
    dense = stage("dense", None, dense_steps, 0, config.seed)
    return driver.run_stage(ctx, dense), None
  state = lt_sft.run(
    ctx,
    stage,
    inp.params0,
    dense_mask=None,
    dense_steps=dense_steps,
    sparse_steps=math.ceil(config.sparse.epochs * inp.per_epoch),
    select=lambda trained: lt_sft.select_mask(
      config, cfg, inp.params0, trained, eligible, inp.fresh
    ),
    seed=config.seed,
  )
  return state, driver.host_params(state.mask)


def finish(ctx, inp: Inputs, state, mask, jpredict) -> str:
  """results.json (every eval set, every gold word) and the export."""
  config = ctx.config
  task = inp.task
  results = {"task": task.name, "labels": list(inp.labels), "phase": ctx.phase}
  head = task.headline
  with ctx.activate():
    for name, data in inp.evals:
      results[name] = evaluate_data(
        jpredict, state.params, data, config.data.batch_size, task, ctx
      )
      log.info("%s %s: %.4f", name, head, results[name][head])
  final = driver.host_params(state.params)
  out = str(paths.path(ctx.workdir) / ckpt.EXPORT)
  if jax.process_index() == 0:
    results_path = paths.path(ctx.workdir) / RESULTS
    results_path.write_text(json.dumps(results, indent=2))
    export(out, config, inp, final, mask)
  return out


def export(out, config, inp: Inputs, final, mask) -> None:
  """The SFT dir (LT-SFT) or HF model dir (dense) of a task run."""
  cfg = inp.model.config.replace(param_dtype="float32")
  # `bistil evaluate` reads these back (train/commands.py RECORDED), so that
  # evaluating the export reproduces results.json without flags.
  record = {
    "max_seq_len": config.data.max_seq_len,
    **task_options(config, inp.task),
  }
  if mask is None:
    hf.save_hf(out, cfg, final, inp.tok_dir, True, record=record)
    log.info("wrote the task model to %s", out)
    return
  sft = sft_lib.sft_from_params(
    final,
    jax.tree.map(lambda x: np.asarray(x, np.float32), inp.params0),
    mask,
    kind="task",
    vocab_size=cfg.vocab_size,
    # Body groups the base lacked (a pooler made for a pair task) have no
    # base values to diff against: stored whole, like the head.
    dense_keys=[k for k in inp.fresh if k not in sparse.HEAD_KEYS],
    meta={
      "task": config.task,
      "head": cfg.head,
      "label_names": list(inp.labels),
      "num_labels": len(inp.labels),
      "add_pooler": cfg.add_pooler,
      "density": config.sparse.density,
      "num_entries": config.sparse.num_entries,  # 0: K from density
      "base_model": configlib.expand(config.student.model),
      **record,
    },
  )
  sft_lib.save_sft(out, sft, overwrite=True)
  log.info("wrote the task SFT to %s", out)
