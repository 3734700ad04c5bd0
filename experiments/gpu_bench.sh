#!/usr/bin/env bash
# The accelerator rows of the README's performance table (issue: performance), as one
# prepared run on a single GPU:
#
#   bash experiments/gpu_bench.sh OUT_DIR [PEAK_TFLOPS]     # e.g. 989 for H100/H200 dense bf16
#
# Each line below is one `python -m ctx.bench` (bf16 compute, fp32 master weights) writing
# OUT_DIR/<name>.json; a run that fails (out of memory, time limit) leaves its .err and the
# rest go on. PG-19 runs on demo-corpus bytes: throughput does not depend on the text.
set -u
out=${1:?usage: gpu_bench.sh OUT_DIR [PEAK_TFLOPS]}
peak=${2:-989}
python=${PYTHON:-python3}
mkdir -p "$out"
read -r -a extra <<<"${CTX_BENCH_EXTRA:-}"  # flags added to every run (the tests shrink the models)

bench() {  # name, seconds allowed, then ctx.bench flags
  local name=$1 limit=$2
  shift 2
  local start=$SECONDS
  timeout "$limit" "$python" -m ctx.bench --peak_tflops="$peak" "$@" "${extra[@]}" >"$out/$name.json" 2>"$out/$name.err"
  echo "== $name: exit $? after $((SECONDS - start)) s: $(cat "$out/$name.json")"
  tail -n 3 "$out/$name.err"
}

# First the fused attention's self-check on this GPU at the PG-19 layout (ctx.selfcheck: one JSON
# line, exit 1 if a check fails); the cuDNN rows below mean nothing if it fails.
start=$SECONDS
timeout 240 "$python" -m ctx.selfcheck --config=experiments/pg19.py --config.model.attention_impl=cudnn \
  --config.model.attention_dropout=0.0 "${extra[@]}" >"$out/selfcheck_cudnn.json" 2>"$out/selfcheck_cudnn.err"
echo "== selfcheck_cudnn: exit $? after $((SECONDS - start)) s: $(cat "$out/selfcheck_cudnn.json")"

bf16=(--config.model.dtype=bfloat16)
pg19=(--config=experiments/pg19.py --config.data.dataset=demo --config.data.tokenizer=bytes
      --config.train.segments_per_call=4 --chunks=5 "${bf16[@]}")
bench pg19_b32 180 "${pg19[@]}" --config.train.batch_size=32
# The fused attention (model.attention_impl=cudnn) against the XLA one, both without attention
# dropout (cuDNN's fused kernel drops no weights) and with the config's other dropout, on the same batch.
fused=(--config.model.attention_dropout=0.0 --config.model.attention_impl=cudnn)
bench pg19_b32_xla_no_attention_dropout 180 "${pg19[@]}" --config.train.batch_size=32 --config.model.attention_dropout=0.0
bench pg19_b32_cudnn 180 "${pg19[@]}" --config.train.batch_size=32 "${fused[@]}"
bench bench_bf16_b8_cudnn 60 --config=experiments/bench.py "${bf16[@]}" --chunks=5 "${fused[@]}"
bench bench_bf16_b8 60 --config=experiments/bench.py "${bf16[@]}" --chunks=5
bench bench_bf16_b8_scanned 60 --config=experiments/bench.py "${bf16[@]}" --chunks=5 --config.model.scan_unroll=1
bench bench_bf16_b64 60 --config=experiments/bench.py "${bf16[@]}" --chunks=5 --config.train.batch_size=64
bench bench_36_layers 100 --config=experiments/bench.py "${bf16[@]}" --chunks=2 --config.model.n_layers=36
bench pg19_b64 150 "${pg19[@]}" --config.train.batch_size=64
