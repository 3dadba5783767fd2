#!/usr/bin/env bash
# Per-host bootstrap, identical on every host: make the venv once, then run
# `bistil ARGS...`. EXTRA selects the jax backend: tpu (default), cuda or "".
#
#   bash launch/on_host.sh distil --config configs/distil.py:mbert,en,mt --workdir DIR
#   bash launch/on_host.sh --dry-run distil ...   # print the commands only
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=launch/common.sh
. launch/common.sh "$@"
EXTRA="${EXTRA-tpu}"
if [ "$DRY_RUN" = 1 ] || [ ! -x .venv/bin/bistil ]; then
  run python3 -m venv .venv
  run .venv/bin/pip install -q --upgrade pip
  run .venv/bin/pip install -q ".${EXTRA:+[$EXTRA]}"
fi
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE="${HF_DATASETS_OFFLINE:-1}"
if [ "$DRY_RUN" = 1 ]; then
  run .venv/bin/bistil "${ARGS[@]}"
else
  exec .venv/bin/bistil "${ARGS[@]}"
fi
