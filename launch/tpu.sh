#!/usr/bin/env bash
# Train (or evaluate) ctx on a Cloud TPU pod slice: create the slice as a queued resource,
# install ctx on every worker, start the same command on all workers (JAX's multi-host
# runtime joins them), stream worker 0's log, and delete the slice. If the slice is
# preempted or the run stops (exit 143 after SIGTERM), it is recreated and the run resumes
# from the last checkpoint in the (gs://) workdir, up to --max_restarts times.
#
# Before anything is created, the training step is compiled here for the slice (XLA's TPU
# compiler via libtpu: pip install -e '.[tpu]' on this machine) and a job that does not fit
# the chips' HBM is refused with the numbers (--skip_compile_check skips it). The TPU VM image
# follows the generation (ctx.topology); its Python is 3.10, so each worker gets a Python 3.11
# environment from uv (PyPI) with ctx[tpu] at this machine's jax version.
#
#   launch/tpu.sh --name=ct-pg19 --zone=us-east5-a --accelerator=v5p-256 --spot \
#       --workdir=gs://BUCKET/pg19-ct -- --config=experiments/pg19.py --config.data.path=gs://BUCKET/pg19
#   launch/tpu.sh ... --mode=evaluate -- --config=experiments/pg19.py --split=test --output=report.json
#   add --dry_run to print every command instead of running it.
set -euo pipefail

name="" zone="" project="" accelerator="v5p-8" runtime="" workdir="" mode="train"
spot=0 dry_run=0 max_restarts=3 keep=0 compile_check=1 python="${CTX_PYTHON:-python3}"
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
    --skip_compile_check) compile_check=0 ;;
    --) shift; args=("$@"); break ;;
    *) echo "error: unknown option $1 (ctx flags go after --)" >&2; exit 2 ;;
  esac
  shift
done
[[ -n "$name" && -n "$zone" && -n "$workdir" ]] || { echo "error: --name, --zone and --workdir are required" >&2; exit 2; }
[[ "$mode" == train || "$mode" == evaluate ]] || { echo "error: --mode must be train or evaluate" >&2; exit 2; }
[[ "$workdir" == gs://* ]] || echo "warning: --workdir=$workdir is not on GCS; workers will not share it" >&2
[[ "$max_restarts" =~ ^[0-9]+$ ]] || { echo "error: --max_restarts must be a non-negative integer" >&2; exit 2; }

# The slice's facts (chips, TPU VM image) from ctx's one table; an unknown name stops here.
"$python" -c 'import ctx.topology' 2>/dev/null || {
  echo "error: $python cannot import ctx; activate the environment ctx is installed in" \
       "(pip install -e '.[tpu]') or set CTX_PYTHON to its python" >&2; exit 2; }
slice_json="$("$python" -m ctx.topology "$accelerator" --accelerator)" || exit 2
field() { "$python" -c 'import json, sys; print(json.loads(sys.argv[1])[sys.argv[2]])' "$slice_json" "$1"; }
accelerator="$(field accelerator_type)"
[[ -n "$runtime" ]] || runtime="$(field runtime_version)"
jax_version="$("$python" -c 'import importlib.metadata as m; print(m.version("jax"))' 2>/dev/null || echo 0.10.2)"

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
remote="cd ctx && ~/ctx-venv/bin/python -m ctx.$mode --workdir=$workdir ${ctx_args}> ~/ctx.log 2>&1; echo \$? > ~/ctx.exit"
# Every worker: unpack, Python 3.11 from uv (the image has 3.10), ctx[tpu] at this jax version.
install="rm -f ~/ctx.exit && mkdir -p ctx && tar xzf ctx-src.tar.gz -C ctx"
install+=" && python3 -m pip install -q --user uv && ~/.local/bin/uv venv -q --allow-existing --python 3.11 ~/ctx-venv"
install+=" && ~/.local/bin/uv pip install -q --python ~/ctx-venv/bin/python -r ctx/requirements.txt -e './ctx[tpu]'"
install+=" 'jax[tpu]==$jax_version'"

check_fit() {  # compile the training step for the slice here; refuse a job that does not fit
  local report
  if [[ $dry_run == 1 ]]; then
    run "$python" -m ctx.train --compile_only --topology="$accelerator" "${args[@]}"
    return
  fi
  echo "checking that the training step fits $accelerator (--skip_compile_check skips this)..." >&2
  report="$("$python" -m ctx.train --compile_only --topology="$accelerator" "${args[@]}" | tail -n 1)" || {
    echo "error: the compile check failed (above); fix the config, or --skip_compile_check" >&2; exit 2; }
  if [[ "$("$python" -c 'import json, sys; print(json.loads(sys.argv[1])["fits"])' "$report")" != True ]]; then
    echo "error: the job does not fit $accelerator (numbers above); lower the per-chip batch" \
         "(--config.train.per_device_batch_size), add --config.model.remat=full, or pick a larger slice" >&2
    exit 3
  fi
}

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
    --command="$install"
}

if [[ $compile_check == 1 && $mode == train ]]; then check_fit; fi
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
  if [[ "$status" == 2 ]]; then echo "error: the run rejected its input (exit 2); not restarted" >&2; exit 2; fi
  attempt=$((attempt + 1))
  if (( attempt > max_restarts )); then echo "error: the run failed $attempt times (last status $status)" >&2; exit 1; fi
  echo "run ended with status $status (preempted?); resuming from the last checkpoint ($attempt/$max_restarts)" >&2
done
