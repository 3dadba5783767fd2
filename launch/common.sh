# shellcheck shell=bash
# Sourced by the launch scripts: `--dry-run` as the first argument (or
# DRY_RUN=1) prints every command instead of running it.
DRY_RUN="${DRY_RUN:-0}"
if [ "${1:-}" = "--dry-run" ]; then
  DRY_RUN=1
  shift
fi
export DRY_RUN
# shellcheck disable=SC2034 # used by the scripts that source this file
ARGS=("$@")

# run CMD...: run it, or print it (shell-quoted, one line) in a dry run.
run() {
  if [ "$DRY_RUN" = 1 ]; then
    printf '+'
    printf ' %q' "$@"
    printf '\n'
  else
    "$@"
  fi
}
