"""For every paper config's attention layout, the kernel's skew as a TPU runs it (`pltpu.roll`
with stride 1, inside a Pallas kernel that Pallas interprets here) against the gather the
interpreted kernel uses instead; prints one JSON line {config: [band shape, shift, max difference]}
(configs whose tiles are alike share one check).
Run without the persistent compilation cache: an interpreted strided roll is one roll per row.
"""

import dataclasses
import importlib
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import jax  # noqa: E402 - after the repository root is on the path
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.experimental import pallas as pl  # noqa: E402

from ctx.nn.fused_attention import KeyLayout  # noqa: E402
from ctx.nn.pallas_tpu import Tiling, _skew  # noqa: E402

results, done = {}, {}
for task in ("pg19", "enwik8", "wt103"):
    for variant in ("ct", "txl"):
        m = importlib.import_module(f"experiments.{task}").get_config(variant).model
        C, M, N = m.compressed_length, m.memory_length, m.segment_length
        lay = Tiling.of(KeyLayout(C, M, N, dropout=0.0), C + M + N)
        tile = (lay.query_block, lay.key_block, lay.window)
        if tile in done:
            results[f"{task}:{variant}"] = results[done[tile]]
            continue
        done[tile] = f"{task}:{variant}"
        band = jax.random.normal(jax.random.key(0), (lay.query_block, lay.window), jnp.float32)

        def kernel(band_ref, out_ref, lay=lay):
            out_ref[...] = _skew(band_ref[...], lay)  # the TPU branch: pltpu.roll(stride=1)

        on_tpu = pl.pallas_call(
            kernel,
            out_shape=jax.ShapeDtypeStruct((lay.query_block, lay.key_block), jnp.float32),
            interpret=True,
        )(band)
        gathered = _skew(band, dataclasses.replace(lay, interpret=True))
        results[f"{task}:{variant}"] = [
            [lay.query_block, lay.window],
            lay.window - lay.query_block + 1,
            float(np.abs(np.asarray(on_tpu) - np.asarray(gathered)).max()),
        ]
print(json.dumps(results))
