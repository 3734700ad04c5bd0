"""The PyTorch peer, compressive-transformer-pytorch 0.4.0 (lucidrains), at ctx's bench config on
a GPU: train and eval tokens/s and peak memory, as one JSON line, for the side-by-side rows of
experiments/gpu_bench.sh. Only the installed package is used (no code of it is copied).

    python experiments/peer_gpu.py [--dtype=bfloat16] [--steps=60]

The bench config (experiments/bench.py): bytes, 4 layers, d_model 256, 4 heads, d_ff 1024,
n_s = n_m = n_cm = 128, c = 4, batch 8, no dropout; the paper's plain residuals and memory of
layer l feeding layer l. One training step is one 8 x 128 segment: the wrapper's forward,
backward of LM + reconstruction loss, Adam. Sequences of 16 segments start with empty memory;
the timing is the median over steady-state segments (full memory and compressed memory).
Evaluation: the same sequences under no_grad. bfloat16 runs under torch.autocast (float32
master weights, as ctx's bf16 configs). The device machine has no network: the package and
its two pure-Python dependencies travel as wheels (docs/performance.md says how).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from compressive_transformer_pytorch import AutoregressiveWrapper, CompressiveTransformer

BENCH = dict(
    num_tokens=256, dim=256, depth=4, heads=4, seq_len=128, mem_len=128, cmem_len=128, cmem_ratio=4
)
BATCH, SEGMENTS = 8, 16
STEADY = 1 + BENCH["cmem_len"] // (
    BENCH["mem_len"] // BENCH["cmem_ratio"]
)  # first full-memory segment


def peer() -> torch.nn.Module:
    net = CompressiveTransformer(
        **BENCH,
        memory_layers=list(range(1, BENCH["depth"] + 1)),
        enhanced_recurrence=False,
        gru_gated_residual=False,
        mogrify_gru=False,
        attn_dropout=0.0,
        ff_glu=False,
        ff_dropout=0.0,
        attn_layer_dropout=0.0,
        reconstruction_attn_dropout=0.0,
        reconstruction_loss_weight=1.0,
    )
    return AutoregressiveWrapper(net)


def segment_times(model, sequences, step=None) -> list[float]:
    """Seconds per steady-state segment over `sequences` (each [BATCH, SEGMENTS*128 + 1])."""
    times = []
    for sequence in sequences:
        segments = model(sequence, return_loss=True)
        for index in range(SEGMENTS):
            torch.cuda.synchronize()
            start = time.perf_counter()
            lm_loss, aux_loss, _ = next(segments)
            if step is not None:
                step(lm_loss + aux_loss)
            torch.cuda.synchronize()
            if index >= STEADY:
                times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="bfloat16")
    parser.add_argument(
        "--sequences", type=int, default=4, help="timed training sequences of 16 segments"
    )
    args = parser.parse_args()
    device = torch.device("cuda")
    model = peer().to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-4)
    generator = torch.Generator().manual_seed(0)

    def sequences(n):
        return [
            torch.randint(0, 256, (BATCH, SEGMENTS * 128 + 1), generator=generator).to(device)
            for _ in range(n)
        ]

    def train_step(loss):
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=args.dtype == "bfloat16")
    with autocast:
        model.train()
        segment_times(model, sequences(1), train_step)  # warm-up
        torch.cuda.reset_peak_memory_stats()
        train = segment_times(model, sequences(args.sequences), train_step)
        model.eval()
        with torch.no_grad():
            segment_times(model, sequences(1))
            evaluation = segment_times(model, sequences(args.sequences))
    tokens = BATCH * BENCH["seq_len"]
    print(
        json.dumps(
            {
                "peer": "compressive-transformer-pytorch",
                "dtype": args.dtype,
                "device": torch.cuda.get_device_name(),
                "train_tokens_per_sec": tokens / statistics.median(train),
                "eval_tokens_per_sec": tokens / statistics.median(evaluation),
                "peak_device_memory_mib": torch.cuda.max_memory_allocated() / 2**20,
                "torch": torch.__version__,
                "segments_timed": len(train),
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
