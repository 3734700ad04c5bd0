"""The interpreted Pallas kernel's gradient for a layout whose tiles use both position tables,
compiled through JAX's persistent compilation cache in CACHE_DIR; prints its sum.

    python tests/scripts/kernel_gradient_from_the_cache.py CACHE_DIR
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import jax  # noqa: E402 - after the repository root is on the path
import jax.numpy as jnp  # noqa: E402

jax.config.update("jax_compilation_cache_dir", sys.argv[1])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

from ctx.nn import pallas_tpu  # noqa: E402
from ctx.nn.attention_reference import draw_operands  # noqa: E402
from ctx.nn.fused_attention import AttentionOperands, flash_attention  # noqa: E402

n_cmem, n_mem, N = 192, 320, 512  # the compressed memory ends inside a 512-key block
operands = draw_operands(n_cmem, n_mem, N, 8, jnp.float32, seed=0)


def loss(*args):
    return jnp.sum(flash_attention(pallas_tpu.KERNELS, AttentionOperands(*args), n_cmem, n_mem)[0])


print("gradient sum", float(jnp.sum(jax.jit(jax.grad(loss))(*operands))))
