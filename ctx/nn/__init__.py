"""The pure network: the Compressive Transformer, its attention (and fused kernels), memory,
compression and losses. Modules here import nothing from ctx but `ctx.nn`, `ctx.config` and
`ctx.errors`, and no I/O library (orbax, optax, TFDS, tensorboardX); tests/test_imports.py
enforces it."""
