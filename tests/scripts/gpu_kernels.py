"""Compile ctx's four GPU attention kernels (forward, evicted keys' usage, both backward) for
an NVIDIA GPU from this CPU machine and print their resources as one JSON line.

    gpu_kernels.py GPU H,K,N,C,M [--stages_of_forward=S]

At the layout (heads, head dim, queries, compressed memory, memory), bf16, attention dropout
0.1, the usage that most_used compression asks for. `--stages_of_forward` plants a forward
pipelined S deep (a tile too large for shared memory). Needs jax's CUDA plugin on the path.
"""

import json
import sys

from ctx import aot, kernel_resources
from ctx.config import ModelConfig
from ctx.nn import pallas_gpu


def main(gpu: str, layout: str, *flags: str) -> None:
    H, K, N, C, M = (int(x) for x in layout.split(","))
    for flag in flags:
        if flag.startswith("--stages_of_forward="):
            pallas_gpu._KERNEL_PARAMS["forward"] = (4, int(flag.split("=")[1]))
    cfg = ModelConfig(
        n_heads=H,
        d_model=H * K,
        segment_length=N,
        compressed_length=C,
        memory_length=M,
        dtype="bfloat16",
        dropout=0.1,
        compression="most_used",
        attention_impl="pallas_gpu",
    )
    target = aot.Target.gpu_node(gpu)
    kernels = aot.attention_kernels(cfg, target)
    print(
        json.dumps(
            {"kernels": kernels, "problems": kernel_resources.problems(kernels, target.gpu.model)}
        )
    )


if __name__ == "__main__":
    main(*sys.argv[1:])
