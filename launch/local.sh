#!/usr/bin/env bash
# One machine: run a ctx command on N processes joined by jax.distributed on localhost (one
# per GPU, or CPU processes to rehearse a multi-host run); N=1 is a plain run.
#
#   launch/local.sh --processes=2 -- python3 -m ctx.train --config=experiments/demo.py --workdir=runs/demo
#   add --dry_run to print the commands.
set -euo pipefail

processes=1 port=12355 dry_run=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --processes=*) processes="${1#*=}" ;;
    --port=*) port="${1#*=}" ;;
    --dry_run) dry_run=1 ;;
    --) shift; break ;;
    *) echo "error: unknown option $1 (the command goes after --)" >&2; exit 2 ;;
  esac
  shift
done
[[ $# -gt 0 ]] || { echo "error: give the command after --" >&2; exit 2; }

pids=()
for ((i = 0; i < processes; i++)); do
  cmd=("$@")
  if ((processes > 1)); then
    cmd+=(--coordinator_address="127.0.0.1:$port" --num_processes="$processes" --process_id="$i")
  fi
  if [[ $dry_run == 1 ]]; then line="$(printf '%q ' "${cmd[@]}")"; printf '%s\n' "${line% }"; continue; fi
  "${cmd[@]}" &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit "$status"
