#!/usr/bin/env bash
# Cloud TPU VM lifecycle for bistil: create, copy, run on every worker, delete.
#
#   ZONE=us-central2-b TPU=bistil-v4 TYPE=v4-8 launch/tpu_vm.sh create
#   launch/tpu_vm.sh copy                 # this checkout -> ~/bistil_jax on all workers
#   launch/tpu_vm.sh run distil --config configs/distil.py:mbert,en,mt \
#       --workdir gs://BUCKET/runs/mbert-en-mt
#   launch/tpu_vm.sh delete
#   launch/tpu_vm.sh --dry-run run distil ...   # print the commands only
#
# Every worker runs launch/on_host.sh with the same arguments; multi-host
# slices set BISTIL_DISTRIBUTED=1 so each process calls
# jax.distributed.initialize() (the TPU runtime supplies the coordinator).
set -euo pipefail
# shellcheck source=launch/common.sh
. "$(dirname "$0")/common.sh" "$@"
set -- "${ARGS[@]}"

: "${ZONE:?set ZONE}" "${TPU:?set TPU (the TPU VM name)}"
TYPE="${TYPE:-v4-8}"
VERSION="${VERSION:-tpu-ubuntu2204-base}"
REMOTE_DIR="${REMOTE_DIR:-bistil_jax}"
gtpu() { run gcloud compute tpus tpu-vm "$@" --zone "$ZONE"; }

cmd="${1:?usage: tpu_vm.sh create|copy|run ARGS...|delete}"
shift
case "$cmd" in
  create)
    gtpu create "$TPU" --accelerator-type "$TYPE" --version "$VERSION"
    ;;
  copy)
    root="$(cd "$(dirname "$0")/.." && pwd)"
    run tar -C "$root" --exclude=.git --exclude=.venv -czf /tmp/bistil_jax.tgz .
    gtpu scp /tmp/bistil_jax.tgz "$TPU":/tmp/ --worker=all
    gtpu ssh "$TPU" --worker=all --command \
      "mkdir -p ~/$REMOTE_DIR && tar -C ~/$REMOTE_DIR -xzf /tmp/bistil_jax.tgz"
    ;;
  run)
    args="$(printf '%q ' "$@")"
    gtpu ssh "$TPU" --worker=all --command \
      "cd ~/$REMOTE_DIR && BISTIL_DISTRIBUTED=1 bash launch/on_host.sh $args"
    ;;
  delete)
    gtpu delete "$TPU" --quiet
    ;;
  *)
    echo "unknown command: $cmd" >&2
    exit 2
    ;;
esac
