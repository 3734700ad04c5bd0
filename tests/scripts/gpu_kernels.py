"""Compile ctx's four GPU attention kernels (forward, evicted keys' usage, both backward) for
an NVIDIA GPU from this CPU machine and print their resources as one JSON line.

    gpu_kernels.py GPU H,K,N,C,M [--stages_of_forward=S]

At the layout (heads, head dim, queries, compressed memory, memory), bf16, attention dropout
0.1, the usage that most_used compression asks for. `--stages_of_forward` plants a forward
pipelined S deep (a tile too large for shared memory). Needs jax's CUDA plugin on the path.
"""
import json
import sys

import jax
import jax.numpy as jnp

from ctx import aot, kernel_resources
from ctx.nn import pallas_gpu


def main(gpu: str, layout: str, *flags: str) -> None:
    H, K, N, C, M = (int(x) for x in layout.split(","))
    for flag in flags:
        if flag.startswith("--stages_of_forward="):
            pallas_gpu._KERNEL_PARAMS["forward"] = (4, int(flag.split("=")[1]))
    target = aot.Target.gpu_node(gpu)
    mesh = jax.sharding.Mesh(target.devices[:1], ("x",))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    B, T, P = 2, C + M + N, C + M + 2 * N
    shapes = [(H, B, N, K), (H, K), (H, B, T, K), (H, B, T, K), (H, 2, K), (H, P, K)]
    abstract = [jax.ShapeDtypeStruct(s, jnp.bfloat16, sharding=replicated) for s in shapes]
    abstract.append(jax.ShapeDtypeStruct((B, T), jnp.bool_, sharding=replicated))

    def loss(*args):
        out, _, usage = pallas_gpu.flash_attention(*args, C, M, (C, C + N), 0.1, jnp.int32(7))
        return jnp.sum(out.astype(jnp.float32)), usage

    lowered = jax.jit(jax.value_and_grad(loss, argnums=tuple(range(6)), has_aux=True)).trace(*abstract).lower(
        lowering_platforms=("cuda",))
    _, kernels = target.compile_with_kernels(lowered)
    print(json.dumps({"kernels": kernels, "problems": kernel_resources.problems(kernels, target.gpu.model)}))


if __name__ == "__main__":
    main(*sys.argv[1:])
