"""Shared pieces of the benchmarks: shapes, JAX and PyTorch phase-1/2 steps,
FLOP counts, the measured CPU matmul peak, JSON-line + table output.

Every benchmark builds mBERT-base-shaped models (12 layers, width 768, 12
heads, FFN 3072) with random weights: speed does not depend on the values.
The PyTorch reference is transformers' PyTorch BERT with the same losses,
batch, optimiser (AdamW, grad-clip 1.0) and dropout as the JAX step.
"""

from __future__ import annotations

import functools
import json
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from bistil_jax import losses, measure
from bistil_jax.checkpoint import student_init
from bistil_jax.model import Model, init_params, preset
from bistil_jax.train import state as state_lib
from bistil_jax.train import steps

DTYPES = {"float32": "float32", "bfloat16": "bfloat16"}


def emit(row: dict[str, Any]) -> None:
  """One JSON line per measurement (machine-readable, greppable)."""
  print(json.dumps(row, sort_keys=True), flush=True)


def table(rows: list[dict[str, Any]], cols: list[str]) -> str:
  def fmt(v):
    if isinstance(v, float):
      return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
    return str(v)

  out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
  for r in rows:
    out.append("| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |")
  return "\n".join(out)


def spread(ts: list[float]) -> dict[str, float]:
  return {
    "median_s": statistics.median(ts),
    "min_s": min(ts),
    "max_s": max(ts),
    "n": len(ts),
  }


def sync(x):
  return jax.block_until_ready(x)


def cpu_threads() -> int:
  """Cores this process may run on: the size of XLA's CPU thread pool, and
  what the PyTorch references get (`torch.set_num_threads`)."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # not Linux
    return os.cpu_count() or 1


def emit_load(when: str) -> tuple[float, float, float]:
  """Emits (and returns) the 1/5/15-minute load average: on a shared
  machine every figure is read against it."""
  load = os.getloadavg()
  emit(
    {"what": "load_average", "when": when, "load": [round(x, 2) for x in load]}
  )
  return load


# ------------------------------------------------------------------ peak
def cpu_matmul_peak(n: int = 2048, repeats: int = 5, dtype="float32") -> float:
  """TFLOP/s of a jitted n x n matmul chain on the default device."""
  a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n)), dtype)
  f = jax.jit(lambda a: a @ a)
  sync(f(a))
  ts = []
  for _ in range(repeats):
    t = time.perf_counter()
    sync(f(a))
    ts.append(time.perf_counter() - t)
  return 2 * n**3 / min(ts) / 1e12


# ---------------------------------------------------------------- FLOPs
def train_flops_per_token(
  tcfg, scfg, b: int, l: int, logits_rows: int | None
) -> float:
  """Analytic training FLOPs per token: teacher fwd + student fwd/bwd.

  2 FLOPs per MAC; student backward = 2 x forward. Encoder matmuls and
  attention (analytic_macs), plus every logits projection the step
  computes: `logits_rows` rows per sequence of the head (None: no head).
  """
  macs_t = measure.analytic_macs(tcfg.replace(head="none"), b, l)["encoder"]
  macs_s = measure.analytic_macs(scfg.replace(head="none"), b, l)["encoder"]
  head = 0
  if logits_rows:
    d = tcfg.hidden_size
    if tcfg.head == "mlm":
      per_row = d * d + d * tcfg.padded_vocab_size
    else:
      per_row = d * tcfg.num_labels
    head = b * logits_rows * per_row
  return 2 * (macs_t + head + 3 * (macs_s + head)) / (b * l)


# ------------------------------------------------------------------ JAX
def configs(
  vocab: int,
  dtype: str = "float32",
  head: str = "mlm",
  num_labels: int = 9,
  dropout: float = 0.1,
):
  tcfg = preset(
    "mbert",
    vocab_size=vocab,
    head=head,
    num_labels=num_labels,
    dtype=dtype,
    hidden_dropout_prob=dropout,
    attention_probs_dropout_prob=dropout,
  )
  scfg = student_init.student_config(tcfg, 2)
  return tcfg, scfg


def synthetic_batch(b: int, l: int, vocab: int, seed: int = 0):
  rng = np.random.default_rng(seed)
  p = max(1, int(0.15 * l))
  return {
    "input_ids": rng.integers(5, vocab, (b, l)).astype(np.int32),
    "attention_mask": np.ones((b, l), np.int32),
    "token_type_ids": np.zeros((b, l), np.int32),
    "masked_lm_positions": np.sort(
      np.stack([rng.choice(l, p, replace=False) for _ in range(b)]), 1
    ).astype(np.int32),
    "masked_lm_ids": rng.integers(5, vocab, (b, p)).astype(np.int32),
    "masked_lm_weights": np.ones((b, p), np.float32),
    "labels": rng.integers(0, 9, (b, l)).astype(np.int32),
  }


# mDeBERTa-v3-base's layout (config.json of microsoft/mdeberta-v3-base):
# relative attention over 256 log buckets, max_relative_positions -1 (the
# 512 positions), shared position keys, p2c + c2p, LayerNormed relative
# table, no absolute positions, no token types; vocabulary 251,000 rows.
MDEBERTA_VOCAB = 251000


def deberta_config(
  vocab: int,
  layers: int = 12,
  hidden: int = 768,
  heads: int = 12,
  *,
  head: str = "mlm",
  dtype: str = "float32",
  dropout: float = 0.1,
):
  """An mDeBERTa-v3-shaped ModelConfig (defaults: the base size)."""
  return preset(
    "tiny-deberta",
    head=head,
    vocab_size=vocab,
    hidden_size=hidden,
    num_hidden_layers=layers,
    num_attention_heads=heads,
    intermediate_size=4 * hidden,
    max_position_embeddings=512,
    max_relative_positions=-1,
    position_buckets=256,
    dtype=dtype,
    hidden_dropout_prob=dropout,
    attention_probs_dropout_prob=dropout,
  )


def deberta_configs(vocab, layers, hidden, heads, dtype="float32", dropout=0.1):
  """(teacher, LRF-2 student) configs of an mDeBERTa-v3-shaped pair."""
  tcfg = deberta_config(
    vocab, layers, hidden, heads, dtype=dtype, dropout=dropout
  )
  return tcfg, student_init.student_config(tcfg, 2)


def jax_phase1(
  b, l, vocab, *, kl=False, dtype="float32", dropout=0.1, cfgs=None
):
  """The jitted, donating train_step with the phase-1 loss.

  cfgs: (teacher, student) configs; default the mBERT pair (`configs`).
  """
  tcfg, scfg = cfgs or configs(vocab, dtype, dropout=dropout)
  tparams = jax.tree.map(np.asarray, init_params(tcfg, jax.random.PRNGKey(0)))
  sparams = student_init.init_student(
    tparams, tcfg, scfg, "teacher_layers", jax.random.PRNGKey(1)
  )
  if kl:
    loss_cfg = steps.DistilLossConfig(hidden=1.0, attention=0.0, kl=1.0)
  else:
    loss_cfg = steps.DistilLossConfig()
  tx = state_lib.make_optimizer(state_lib.OptimConfig(total_steps=100000))
  state = jax.jit(state_lib.create_state, static_argnums=1)(sparams, tx)
  cdt = jnp.dtype(dtype)
  teacher = {
    "params": jax.device_put(jax.tree.map(lambda x: x.astype(cdt), tparams)),
    "projections": None,
  }
  batch = synthetic_batch(b, l, vocab)
  batch.pop("labels")
  batch = jax.device_put(batch)
  step = jax.jit(
    functools.partial(
      steps.train_step,
      loss_fn=functools.partial(
        steps.distil_losses,
        student_model=Model(scfg),
        teacher_model=Model(tcfg),
        loss_cfg=loss_cfg,
      ),
      tx=tx,
    ),
    donate_argnums=(0,),
  )
  return {
    "tcfg": tcfg,
    "scfg": scfg,
    "teacher_model": Model(tcfg),
    "student_model": Model(scfg),
    "state": state,
    "teacher": teacher,
    "batch": batch,
    "tx": tx,
    "loss_cfg": loss_cfg,
    "step": step,
    "tparams": tparams,
    "sparams": sparams,
    "logits_rows": batch["masked_lm_positions"].shape[1] if kl else None,
  }


def jax_runner(setup) -> Callable[[], Any]:
  holder = {"state": setup["state"]}
  key = jax.random.PRNGKey(0)

  def run():
    holder["state"], m = setup["step"](
      holder["state"], setup["teacher"], setup["batch"], key
    )
    return m["loss"]

  return run


# -------------------------------------------------------------- PyTorch
def _torch_matmul_setup(device: str) -> None:
  """On GPU with TORCH_ALLOW_TF32=1, TF32 matmuls like JAX's default."""
  import os

  import torch

  if device != "cpu" and os.environ.get("TORCH_ALLOW_TF32") == "1":
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True


def torch_phase1(
  b, l, vocab, *, kl=False, dropout=0.1, device="cpu", dtype="float32"
):
  """A PyTorch phase-1 step: transformers BERT, the same losses, AdamW.

  Released mix (hidden + attention MSE): BertModel with hidden states and
  eager attention probabilities. KL + hidden: BertForMaskedLM, full MLM
  logits as the released program computes them, KL(T=2) at the masked
  positions.
  """
  import torch
  import transformers

  _torch_matmul_setup(device)

  torch.manual_seed(0)
  tdt = getattr(torch, dtype)
  common_kw = dict(
    vocab_size=vocab,
    hidden_size=768,
    num_attention_heads=12,
    intermediate_size=3072,
    hidden_dropout_prob=dropout,
    attention_probs_dropout_prob=dropout,
    attn_implementation="eager",
  )
  cls = transformers.BertForMaskedLM if kl else transformers.BertModel
  extra = {} if kl else {"add_pooling_layer": False}
  teacher = (
    cls(transformers.BertConfig(num_hidden_layers=12, **common_kw), **extra)
    .to(device, tdt)
    .eval()
  )
  student = (
    cls(transformers.BertConfig(num_hidden_layers=6, **common_kw), **extra)
    .to(device)
    .train()
  )
  for p in teacher.parameters():
    p.requires_grad_(False)
  opt = torch.optim.AdamW(student.parameters(), lr=1e-4, weight_decay=0.0)
  data = synthetic_batch(b, l, vocab)
  batch = {k: torch.as_tensor(v).to(device) for k, v in data.items()}
  ids = batch["input_ids"].long()
  mask = batch["attention_mask"].long()
  real = mask.bool()
  pos = batch["masked_lm_positions"].long()
  hidden_pairs, attn_pairs = losses.layer_maps(12, 6)
  autocast = dtype != "float32"

  def step():
    with torch.no_grad(), torch.autocast(device, tdt, enabled=autocast):
      t_out = teacher(
        ids,
        attention_mask=mask,
        output_hidden_states=True,
        output_attentions=not kl,
      )
    with torch.autocast(device, tdt, enabled=autocast):
      s_out = student(
        ids,
        attention_mask=mask,
        output_hidden_states=True,
        output_attentions=not kl,
      )
    m = real[..., None].float()
    hid = sum(
      (
        ((s_out.hidden_states[s].float() - t_out.hidden_states[t].float()) * m)
        ** 2
      ).sum()
      for s, t in hidden_pairs
    ) / (len(hidden_pairs) * m.sum() * 768)
    loss = hid
    if kl:
      idx = pos[..., None].expand(-1, -1, vocab)
      zs = torch.gather(s_out.logits.float(), 1, idx) / 2.0
      zt = torch.gather(t_out.logits.float(), 1, idx) / 2.0
      lt = torch.log_softmax(zt, -1)
      kl_rows = (lt.exp() * (lt - torch.log_softmax(zs, -1))).sum(-1)
      loss = loss + kl_rows.mean()
    else:
      km = real[:, None, None, :].float()
      att = sum(
        (
          ((s_out.attentions[s].float() - t_out.attentions[t].float()) * km)
          ** 2
        ).sum()
        for s, t in attn_pairs
      ) / (len(attn_pairs) * km.sum() * 12 * l)
      loss = loss + att
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
    opt.step()
    if device != "cpu":
      torch.cuda.synchronize()
    return float(loss.detach())

  return {"step": step, "teacher": teacher, "student": student}


def torch_phase1_deberta(setup, b, l, *, device="cpu", dtype="float32"):
  """A PyTorch phase-1 step for a DeBERTa pair, released mix.

  transformers' DebertaV2Model (eager attention; hidden states and
  attention probabilities of every layer) loaded from the JAX setup's own
  teacher and teacher_layers-initialised student (`jax_phase1(cfgs=...)`,
  written by checkpoint.hf.save_hf), so the two steps start from the same
  weights and their first losses agree. The student's dropout is its
  config's (0: a student trains without dropout, as in the JAX step;
  config.json states the teacher's rates for later fine-tuning), the
  teacher runs in eval mode. Hidden + attention MSE over the same layer
  pairs and with the same reductions as steps.distil_losses, AdamW (lr
  1e-4, no weight decay) with clip_grad_norm_ 1.0.
  """
  import tempfile

  import torch
  import transformers

  from bistil_jax.checkpoint import hf

  _torch_matmul_setup(device)
  torch.manual_seed(0)
  tdt = getattr(torch, dtype)
  tcfg, scfg = setup["tcfg"], setup["scfg"]
  models = {}
  with tempfile.TemporaryDirectory() as d:
    for name, cfg, params in (
      ("teacher", tcfg, setup["tparams"]),
      ("student", scfg, setup["sparams"]),
    ):
      path = os.path.join(d, name)
      hf.save_hf(path, cfg, jax.tree.map(np.asarray, params), write_flax=False)
      models[name] = transformers.DebertaV2Model.from_pretrained(
        path,
        attn_implementation="eager",
        hidden_dropout_prob=cfg.hidden_dropout_prob,
        attention_probs_dropout_prob=cfg.attention_probs_dropout_prob,
      )
  teacher = models["teacher"].to(device, tdt).eval()
  student = models["student"].to(device).train()
  for p in teacher.parameters():
    p.requires_grad_(False)
  opt = torch.optim.AdamW(student.parameters(), lr=1e-4, weight_decay=0.0)
  data = setup["batch"]
  ids = torch.as_tensor(np.array(data["input_ids"])).long().to(device)
  mask = torch.as_tensor(np.array(data["attention_mask"])).long().to(device)
  real = mask.bool()
  hidden_pairs, attn_pairs = losses.layer_maps(
    tcfg.num_hidden_layers, scfg.num_hidden_layers
  )
  d_s, heads = scfg.hidden_size, scfg.num_attention_heads
  autocast = dtype != "float32"
  kw = dict(attention_mask=mask, output_hidden_states=True)

  def step():
    with torch.no_grad(), torch.autocast(device, tdt, enabled=autocast):
      t_out = teacher(ids, output_attentions=True, **kw)
    with torch.autocast(device, tdt, enabled=autocast):
      s_out = student(ids, output_attentions=True, **kw)
    m = real[..., None].float()
    hid = sum(
      (
        ((s_out.hidden_states[s].float() - t_out.hidden_states[t].float()) * m)
        ** 2
      ).sum()
      for s, t in hidden_pairs
    ) / (len(hidden_pairs) * m.sum() * d_s)
    km = real[:, None, None, :].float()
    att = sum(
      (
        ((s_out.attentions[s].float() - t_out.attentions[t].float()) * km) ** 2
      ).sum()
      for s, t in attn_pairs
    ) / (len(attn_pairs) * km.sum() * heads * l)
    loss = hid + att
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
    opt.step()
    if device != "cpu":
      torch.cuda.synchronize()
    return float(loss.detach())

  return {"step": step, "teacher": teacher, "student": student}


# -------------------------------------------------------------- phase 2
PHASE2_DENSITY = 0.1  # share of body entries the sparse stage trains


def _random_mask(tree, density, seed=0):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: rng.random(x.shape) < density, tree)


def jax_phase2(b, l, vocab, *, dtype="float32", dropout=0.1, labels=9):
  """train_step with task.task_losses, LT-SFT sparse stage (the mask in the
  state): soft CE + hidden + attention."""
  from bistil_jax.train import task

  tcfg, scfg = configs(
    vocab,
    dtype,
    head="token_classification",
    num_labels=labels,
    dropout=dropout,
  )
  tparams = jax.tree.map(np.asarray, init_params(tcfg, jax.random.PRNGKey(0)))
  sparams = jax.tree.map(np.asarray, init_params(scfg, jax.random.PRNGKey(1)))
  mask = jax.device_put(_random_mask(sparams, PHASE2_DENSITY))
  tx = state_lib.make_optimizer(state_lib.OptimConfig(total_steps=100000))
  state = jax.jit(state_lib.create_state, static_argnums=1)(sparams, tx, mask)
  cdt = jnp.dtype(dtype)
  teacher = jax.device_put(jax.tree.map(lambda x: x.astype(cdt), tparams))
  frozen = {"teacher": teacher, "origin": None}
  batch = synthetic_batch(b, l, vocab)
  batch = jax.device_put(
    {
      k: batch[k]
      for k in ("input_ids", "attention_mask", "token_type_ids", "labels")
    }
  )
  step = jax.jit(
    functools.partial(
      steps.train_step,
      loss_fn=functools.partial(
        task.task_losses,
        model=Model(scfg),
        teacher_model=Model(tcfg),
        loss_cfg=task.TaskLossConfig(kl=1.0, hidden=1.0, attention=1.0),
        kind="token",
      ),
      tx=tx,
    ),
    donate_argnums=(0,),
  )
  holder = {"state": state}
  key = jax.random.PRNGKey(0)

  def run():
    holder["state"], m = step(holder["state"], frozen, batch, key)
    return m["loss"]

  return {"tcfg": tcfg, "scfg": scfg, "run": run, "logits_rows": l}


def torch_phase2(
  b, l, vocab, *, dropout=0.1, device="cpu", dtype="float32", labels=9
):
  """PyTorch LT-SFT sparse-stage step: BertForTokenClassification pair,
  soft CE (T=2) at labelled tokens + hidden + attention MSE, gradients
  masked before clipping and AdamW (weight decay 0, so masked entries,
  whose moments stay 0, do not move)."""
  import torch
  import transformers

  _torch_matmul_setup(device)

  torch.manual_seed(0)
  tdt = getattr(torch, dtype)
  kw = dict(
    vocab_size=vocab,
    hidden_size=768,
    num_attention_heads=12,
    intermediate_size=3072,
    hidden_dropout_prob=dropout,
    attention_probs_dropout_prob=dropout,
    num_labels=labels,
    attn_implementation="eager",
  )
  cls = transformers.BertForTokenClassification
  teacher = (
    cls(transformers.BertConfig(num_hidden_layers=12, **kw))
    .to(device, tdt)
    .eval()
  )
  student = (
    cls(transformers.BertConfig(num_hidden_layers=6, **kw)).to(device).train()
  )
  for p in teacher.parameters():
    p.requires_grad_(False)
  gen = torch.Generator().manual_seed(0)
  masks = [
    (torch.rand(p.shape, generator=gen) < PHASE2_DENSITY).to(device)
    for p in student.parameters()
  ]
  params = list(student.parameters())
  opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)
  data = synthetic_batch(b, l, vocab)
  ids = torch.as_tensor(data["input_ids"]).long().to(device)
  mask = torch.as_tensor(data["attention_mask"]).long().to(device)
  sel = torch.ones_like(ids, dtype=torch.bool)  # every token labelled
  real = mask.bool()
  hidden_pairs, attn_pairs = losses.layer_maps(12, 6)
  autocast = dtype != "float32"

  def step():
    with torch.no_grad(), torch.autocast(device, tdt, enabled=autocast):
      t = teacher(
        ids,
        attention_mask=mask,
        output_hidden_states=True,
        output_attentions=True,
      )
    with torch.autocast(device, tdt, enabled=autocast):
      s = student(
        ids,
        attention_mask=mask,
        output_hidden_states=True,
        output_attentions=True,
      )
    pt = torch.softmax(t.logits.float()[sel] / 2.0, -1)
    kl = (
      -(pt * torch.log_softmax(s.logits.float()[sel] / 2.0, -1)).sum(-1).mean()
    )
    m = real[..., None].float()
    hid = sum(
      (
        ((s.hidden_states[i].float() - t.hidden_states[j].float()) * m) ** 2
      ).sum()
      for i, j in hidden_pairs
    ) / (len(hidden_pairs) * m.sum() * 768)
    km = real[:, None, None, :].float()
    att = sum(
      (((s.attentions[i].float() - t.attentions[j].float()) * km) ** 2).sum()
      for i, j in attn_pairs
    ) / (len(attn_pairs) * km.sum() * 12 * l)
    loss = kl + hid + att
    opt.zero_grad(set_to_none=True)
    loss.backward()
    for p, mk in zip(params, masks, strict=True):
      p.grad.mul_(mk)
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    if device != "cpu":
      torch.cuda.synchronize()
    return float(loss.detach())

  return {"step": step}
