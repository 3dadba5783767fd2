#!/usr/bin/env bash
# Per-host bootstrap, identical on every host: make the venv once, then run
# `bistil ARGS...`. EXTRA selects the jax backend: tpu (default), cuda or "".
#
#   bash launch/on_host.sh distil --config configs/distil.py:mbert,en,mt --workdir DIR
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRA="${EXTRA-tpu}"
if [ ! -x .venv/bin/bistil ]; then
  python3 -m venv .venv
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -e ".${EXTRA:+[$EXTRA]}"
fi
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE="${HF_DATASETS_OFFLINE:-1}"
exec .venv/bin/bistil "$@"
