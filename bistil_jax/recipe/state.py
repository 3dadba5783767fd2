"""Stage fingerprints and records: what a rerun of `bistil run` does.

A stage's fingerprint is a hash of the settings that determine it (a plain
JSON tree) and of the fingerprints of the stages it reads. Two small JSON
records live in its sub-workdir DIR/<stage>/:

  stage.started.json   written before the stage runs (what it was started
                       with), so a later run knows whether the unfinished
                       work there is its own to resume;
  stage.json           written last, when every output is in place: a stage
                       without it is unfinished.

Both hold {"stage", "fingerprint", "settings", "inputs"}, so a changed
setting is reported by name.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping
from typing import Any

from bistil_jax import configlib, paths

DONE = "stage.json"
STARTED = "stage.started.json"

# What a rerun does with a stage.
SKIP, RESUME, RUN, RERUN = "skip", "resume", "run", "rerun"


def fingerprint(settings: Mapping[str, Any], inputs: Mapping[str, str]) -> str:
  """16 hex digits of sha256 over the canonical JSON of both trees."""
  text = json.dumps(
    {"settings": settings, "inputs": dict(inputs)},
    sort_keys=True,
    separators=(",", ":"),
  )
  return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


@dataclasses.dataclass(frozen=True)
class Plan:
  """What to do with one stage now, and why (one line for the user)."""

  stage: str
  action: str  # SKIP | RESUME | RUN | RERUN
  reason: str
  fingerprint: str
  settings: dict[str, Any]
  inputs: dict[str, str]

  def line(self) -> str:
    word = {SKIP: "skipped", RESUME: "resumed", RUN: "run", RERUN: "rerun"}
    return f"{self.stage}: {word[self.action]} ({self.reason})"

  def record(self) -> dict[str, Any]:
    return {
      "stage": self.stage,
      "fingerprint": self.fingerprint,
      "settings": self.settings,
      "inputs": self.inputs,
    }


def read_record(stage_dir: str, name: str) -> dict[str, Any] | None:
  """A stage's DONE or STARTED record, or None when absent or unreadable."""
  p = paths.path(stage_dir) / name
  if not p.is_file():
    return None
  try:
    rec = json.loads(paths.read_text(p))
  except (json.JSONDecodeError, UnicodeDecodeError):
    return None  # a torn write: as if absent
  return rec if isinstance(rec, dict) and "fingerprint" in rec else None


def changes(record: Mapping[str, Any], settings, inputs) -> str:
  """Why a record no longer matches: "X changed" for each changed setting
  (dotted keys) and "its input S changed" for each changed input stage."""
  keys = configlib.diff_keys(
    json.loads(json.dumps(record.get("settings", {}))),
    json.loads(json.dumps(settings)),
  )
  what = [f"{k} changed" for k in keys[:3]]
  if len(keys) > 3:
    what.append(f"{len(keys) - 3} more settings changed")
  old_inputs = record.get("inputs", {})
  what += [
    f"its input {s} changed"
    for s in sorted(set(old_inputs) | set(inputs))
    if old_inputs.get(s) != inputs.get(s)
  ]
  return ", ".join(what) or "its record differs"


def plan(stage: str, stage_dir: str, settings, inputs) -> Plan:
  """Compares the stage's records in `stage_dir` with what it is now."""
  settings = json.loads(json.dumps(settings))  # tuples -> lists, as stored
  fp = fingerprint(settings, inputs)

  def make(action: str, reason: str) -> Plan:
    return Plan(stage, action, reason, fp, settings, dict(inputs))

  done = read_record(stage_dir, DONE)
  if done is not None:
    if done["fingerprint"] == fp:
      return make(SKIP, "up to date")
    return make(RERUN, "because " + changes(done, settings, inputs))
  started = read_record(stage_dir, STARTED)
  if started is not None:
    if started["fingerprint"] == fp:
      return make(RESUME, "unfinished: continuing its work")
    return make(
      RERUN, "unfinished, and because " + changes(started, settings, inputs)
    )
  if paths.path(stage_dir).exists():
    return make(RERUN, "its directory holds no record of a run")
  return make(RUN, "new")


def done_fingerprint(stage_dir: str) -> str | None:
  rec = read_record(stage_dir, DONE)
  return None if rec is None else rec["fingerprint"]


def mark_started(stage_dir: str, p: Plan) -> None:
  paths.mkdirs(stage_dir)
  paths.write_text(
    paths.path(stage_dir) / STARTED, json.dumps(p.record(), indent=2)
  )


def mark_done(stage_dir: str, p: Plan, seconds: float | None = None) -> None:
  """The stage's last write: its outputs are complete (`seconds`: its wall
  time, kept beside the fingerprint, not part of it)."""
  rec = {**p.record(), "seconds": seconds}
  paths.write_text(paths.path(stage_dir) / DONE, json.dumps(rec, indent=2))
