#!/usr/bin/env bash
# Train (or evaluate) ctx on a Cloud TPU pod slice: create the slice as a queued resource,
# install ctx on every worker, start the same command on all workers (JAX's multi-host
# runtime joins them), stream worker 0's log, and delete the slice. If the slice is
# preempted or the run stops (exit 143 after SIGTERM), it is recreated and the run resumes
# from the last checkpoint in the (gs://) workdir, up to --max_restarts times.
#
#   launch/tpu.sh --name=ct-pg19 --zone=us-east5-a --accelerator=v5p-256 --spot \
#       --workdir=gs://BUCKET/pg19-ct -- --config=experiments/pg19.py --config.data.path=gs://BUCKET/pg19
#   launch/tpu.sh ... --mode=evaluate -- --config=experiments/pg19.py --split=test --output=report.json
#   add --dry_run to print every command instead of running it.
set -euo pipefail

name="" zone="" project="" accelerator="v5p-8" runtime="v2-alpha-tpuv5" workdir="" mode="train"
spot=0 dry_run=0 max_restarts=3 keep=0
args=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --name=*) name="${1#*=}" ;;
    --zone=*) zone="${1#*=}" ;;
    --project=*) project="${1#*=}" ;;
    --accelerator=*) accelerator="${1#*=}" ;;
    --runtime=*) runtime="${1#*=}" ;;
    --workdir=*) workdir="${1#*=}" ;;
    --mode=*) mode="${1#*=}" ;;
    --max_restarts=*) max_restarts="${1#*=}" ;;
    --spot) spot=1 ;;
    --keep) keep=1 ;;
    --dry_run) dry_run=1 ;;
    --) shift; args=("$@"); break ;;
    *) echo "error: unknown option $1 (ctx flags go after --)" >&2; exit 2 ;;
  esac
  shift
done
[[ -n "$name" && -n "$zone" && -n "$workdir" ]] || { echo "error: --name, --zone and --workdir are required" >&2; exit 2; }
[[ "$mode" == train || "$mode" == evaluate ]] || { echo "error: --mode must be train or evaluate" >&2; exit 2; }
[[ "$workdir" == gs://* ]] || echo "warning: --workdir=$workdir is not on GCS; workers will not share it" >&2

run() {  # print the command (dry run) or run it
  if [[ $dry_run == 1 ]]; then local line; line="$(printf '%q ' "$@")"; printf '%s\n' "${line% }"; else "$@"; fi
}
where=(--zone="$zone")
[[ -n "$project" ]] && where+=(--project="$project")
spot_flag=()
[[ $spot == 1 ]] && spot_flag=(--spot)
tpu=(gcloud compute tpus tpu-vm)
ctx_args=""
(( ${#args[@]} )) && printf -v ctx_args '%q ' "${args[@]}"
remote="cd ctx && python3 -m ctx.$mode --workdir=$workdir ${ctx_args}> ~/ctx.log 2>&1; echo \$? > ~/ctx.exit"

create() {
  run gcloud compute tpus queued-resources create "$name" --node-id="$name" "${where[@]}" \
    --accelerator-type="$accelerator" --runtime-version="$runtime" "${spot_flag[@]}"
  if [[ $dry_run == 0 ]]; then
    until [[ "$(gcloud compute tpus queued-resources describe "$name" "${where[@]}" \
               --format='value(state.state)')" == ACTIVE ]]; do sleep 30; done
  fi
  run git archive --format=tar.gz -o /tmp/ctx-src.tar.gz HEAD
  run "${tpu[@]}" scp /tmp/ctx-src.tar.gz "$name": --worker=all "${where[@]}"
  run "${tpu[@]}" ssh "$name" --worker=all "${where[@]}" \
    --command='rm -f ~/ctx.exit && mkdir -p ctx && tar xzf ctx-src.tar.gz -C ctx && pip install -q "jax[tpu]" -e ./ctx'
}

attempt=0
while :; do
  create
  run "${tpu[@]}" ssh "$name" --worker=all "${where[@]}" --command="nohup bash -c '$remote' >/dev/null 2>&1 &"
  # Stream worker 0's log until its command ends.
  run "${tpu[@]}" ssh "$name" --worker=0 "${where[@]}" \
    --command='until [ -f ~/ctx.exit ]; do sleep 5; done & tail -F ~/ctx.log --pid=$!'
  status=0
  if [[ $dry_run == 0 ]]; then
    status="$("${tpu[@]}" ssh "$name" --worker=0 "${where[@]}" --command='cat ~/ctx.exit' || echo 255)"
  fi
  if [[ $keep == 0 || "$status" != 0 ]]; then
    run gcloud compute tpus queued-resources delete "$name" "${where[@]}" --force --quiet
  fi
  if [[ "$status" == 0 || $dry_run == 1 ]]; then break; fi
  attempt=$((attempt + 1))
  if (( attempt > max_restarts )); then echo "error: the run failed $attempt times (last status $status)" >&2; exit 1; fi
  echo "run ended with status $status (preempted?); resuming from the last checkpoint ($attempt/$max_restarts)" >&2
done
