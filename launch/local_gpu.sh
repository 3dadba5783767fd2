#!/usr/bin/env bash
# Local GPUs. One process driving every visible GPU (the usual case):
#
#   launch/local_gpu.sh distil --config configs/distil.py:mbert,en,mt --workdir runs/x
#
# One process per GPU (NPROC>1), coordinated over localhost; each process
# sees one GPU and calls jax.distributed.initialize():
#
#   NPROC=2 launch/local_gpu.sh distil --config ... --workdir runs/x
#
# Several machines: run this on each with NNODES, NODE_RANK and
# COORDINATOR=host0:port set identically. `--dry-run` first prints the
# commands instead of running them.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=launch/common.sh
. launch/common.sh "$@"
NPROC="${NPROC:-1}"
NNODES="${NNODES:-1}"
NODE_RANK="${NODE_RANK:-0}"
COORDINATOR="${COORDINATOR:-127.0.0.1:12355}"
export EXTRA="${EXTRA-cuda}"
dry=()
[ "$DRY_RUN" = 1 ] && dry=(--dry-run)
if [ "$NPROC" -eq 1 ] && [ "$NNODES" -eq 1 ]; then
  exec bash launch/on_host.sh "${dry[@]}" "${ARGS[@]}"
fi
bash launch/on_host.sh "${dry[@]}" --help >/dev/null  # bootstrap the venv once
pids=()
for ((i = 0; i < NPROC; i++)); do
  cmd=(env CUDA_VISIBLE_DEVICES="$i" BISTIL_DISTRIBUTED=1
    BISTIL_COORDINATOR="$COORDINATOR"
    BISTIL_NUM_PROCESSES=$((NPROC * NNODES))
    BISTIL_PROCESS_ID=$((NODE_RANK * NPROC + i))
    bash launch/on_host.sh "${dry[@]}" "${ARGS[@]}")
  if [ "$DRY_RUN" = 1 ]; then  # printed in order, nothing started
    run "${cmd[@]}"
    continue
  fi
  "${cmd[@]}" &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit "$status"
