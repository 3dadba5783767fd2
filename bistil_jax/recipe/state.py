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
setting is reported by name. A stage directory holding anything else (no
record of ours, or the record of another stage) is not this run's: it is
refused, never removed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping
from typing import Any

from bistil_jax import configlib, paths
from bistil_jax.errors import BistilError

DONE = "stage.json"
STARTED = "stage.started.json"

# What a rerun does with a stage.
SKIP, RESUME, RUN, RERUN = "skip", "resume", "run", "rerun"
# STARTED's fingerprint while a rerun removes the stage's old outputs: it
# matches no settings, so a rerun killed part-way is cleared again, never
# resumed.
REMOVING = "removing"


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


def _record_file(name: str) -> bool:
  """A record, or the temporary file of a record's interrupted write."""
  tmp = (f".{DONE}.", f".{STARTED}.")
  return name in (DONE, STARTED) or name.startswith(tmp)


def _ours(stage_dir: str, stage: str, records) -> None:
  """Refuses a stage dir that another stage or another program wrote.

  Raises:
    BistilError: a record names another stage, or the dir holds files but
      no record (readable or not, nor the temporary file of one), or it is
      a file.
  """
  for rec in records:
    if rec is not None and rec.get("stage") != stage:
      raise BistilError(
        f"{stage_dir} holds the record of stage {rec.get('stage')!r}, not "
        f"{stage}: it is not this run's; move it away or pick another "
        "--workdir"
      )
  p = paths.path(stage_dir)
  if not p.exists():
    return
  if not p.is_dir():
    raise BistilError(f"{stage_dir} is a file, not a stage's directory")
  names = [c.name for c in p.iterdir()]
  if DONE in names or STARTED in names or all(map(_record_file, names)):
    return
  raise BistilError(
    f"{stage_dir} holds files but no record of a `bistil run` stage: not "
    "removing them; move them away or pick another --workdir"
  )


def plan(stage: str, stage_dir: str, settings, inputs) -> Plan:
  """Compares the stage's records in `stage_dir` with what it is now.

  Raises:
    BistilError: the dir is not this run's (see `_ours`).
  """
  settings = json.loads(json.dumps(settings))  # tuples -> lists, as stored
  fp = fingerprint(settings, inputs)

  def make(action: str, reason: str) -> Plan:
    return Plan(stage, action, reason, fp, settings, dict(inputs))

  done = read_record(stage_dir, DONE)
  started = read_record(stage_dir, STARTED)
  _ours(stage_dir, stage, (done, started))
  if done is not None:
    if done["fingerprint"] == fp:
      return make(SKIP, "up to date")
    return make(RERUN, "because " + changes(done, settings, inputs))
  if started is not None:
    if started["fingerprint"] == fp:
      return make(RESUME, "unfinished: continuing its work")
    if started["fingerprint"] == REMOVING:
      return make(RERUN, "an earlier rerun stopped removing its old outputs")
    return make(
      RERUN, "unfinished, and because " + changes(started, settings, inputs)
    )
  if paths.path(stage_dir).exists():
    return make(
      RERUN, "its directory holds no record of a run, or an unreadable one"
    )
  return make(RUN, "new")


def clear(stage_dir: str, stage: str) -> None:
  """Removes a stage's old outputs before it runs again.

  STARTED first says REMOVING, then DONE goes, then everything else: a
  kill part-way leaves a stage that the next run clears again.
  """
  p = paths.path(stage_dir)
  if not p.exists():
    return
  rec = {"stage": stage, "fingerprint": REMOVING, "settings": {}, "inputs": {}}
  paths.write_text(p / STARTED, json.dumps(rec))
  paths.rmtree(p / DONE)
  for child in p.iterdir():
    if child.name != STARTED:
      paths.rmtree(child)


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
