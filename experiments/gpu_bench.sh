#!/usr/bin/env bash
# The GPU rows of docs/performance.md, as one prepared run of at most ~8 minutes on one GPU:
#
#   bash experiments/gpu_bench.sh OUT_DIR [PEAK_TFLOPS]     # 989: H100/H200 dense bf16
#
# 1. the fused attentions' self-checks on this GPU at the PG-19 layout (ctx.selfcheck: one JSON
#    line, exit 1 if a check fails): pallas_gpu with the config's attention dropout, and cudnn
#    without (it has none); a kernel's rows below mean nothing if its check failed;
# 2. the PG-19 config (bf16, its dropout) and the bench config with xla, cudnn (attention dropout
#    0) and pallas_gpu: train and eval tokens/s, MFU against PEAK_TFLOPS and against the matmul
#    rate measured in the same run, peak memory (python -m ctx.bench, one JSON per run);
# 3. the PyTorch peer at the bench config on the same GPU (experiments/peer_gpu.py), alternated
#    with ctx's pallas_gpu run so that both see the same clocks.
# Each run writes OUT_DIR/<name>.json and .err and has its own time limit; one that fails (out
# of memory, time limit, a Triton error) leaves its .err and the rest go on. PG-19 runs on
# demo-corpus bytes: throughput does not depend on the text.
set -u
out=${1:?usage: gpu_bench.sh OUT_DIR [PEAK_TFLOPS]}
peak=${2:-989}
python=${PYTHON:-python3}
mkdir -p "$out"
read -r -a extra <<<"${CTX_BENCH_EXTRA:-}"  # flags added to every ctx run (the tests shrink the models)

run() {  # name, seconds allowed, then the command
  local name=$1 limit=$2
  shift 2
  local start=$SECONDS
  timeout "$limit" "$@" >"$out/$name.json" 2>"$out/$name.err"
  echo "== $name: exit $? after $((SECONDS - start)) s: $(tail -n 1 "$out/$name.json")"
  tail -n 3 "$out/$name.err"
}
bench() {  # name, seconds allowed, then ctx.bench flags
  local name=$1 limit=$2
  shift 2
  run "$name" "$limit" "$python" -m ctx.bench --peak_tflops="$peak" "$@" "${extra[@]}"
}

pg19=(--config=experiments/pg19.py --config.data.dataset=demo --config.data.tokenizer=bytes
      --config.model.dtype=bfloat16)
run selfcheck_pallas_gpu 90 "$python" -m ctx.selfcheck "${pg19[@]}" --config.model.attention_impl=pallas_gpu \
  "${extra[@]}"
run selfcheck_cudnn 45 "$python" -m ctx.selfcheck "${pg19[@]}" --config.model.attention_impl=cudnn \
  --config.model.attention_dropout=0.0 "${extra[@]}"

cudnn=(--config.model.attention_impl=cudnn --config.model.attention_dropout=0.0)
pg19_run=("${pg19[@]}" --config.train.segments_per_call=2 --chunks=3 --config.train.batch_size=16)
bench pg19_pallas_gpu 80 "${pg19_run[@]}" --config.model.attention_impl=pallas_gpu
bench pg19_xla 80 "${pg19_run[@]}" --config.model.attention_impl=xla
bench pg19_cudnn 80 "${pg19_run[@]}" "${cudnn[@]}"

small=(--config=experiments/bench.py --config.model.dtype=bfloat16 --chunks=5)
run peer_1 40 "$python" experiments/peer_gpu.py --dtype=bfloat16
bench bench_pallas_gpu 30 "${small[@]}" --config.model.attention_impl=pallas_gpu
run peer_2 40 "$python" experiments/peer_gpu.py --dtype=bfloat16
bench bench_xla 30 "${small[@]}" --config.model.attention_impl=xla
bench bench_cudnn 30 "${small[@]}" "${cudnn[@]}"
