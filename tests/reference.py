"""A brute-force NumPy Compressive Transformer for one segment, written for clarity only.

Attention loops over every (query, key) pair and computes each relative distance explicitly
(docs/paper-notes.md §2), so the vectorised shift trick in ctx.nn.attention is checked against it.
"""

from __future__ import annotations

import numpy as np


def sinusoid(distance: float, d: int) -> np.ndarray:
    inv_freq = 1.0 / (10000.0 ** (np.arange(0, d, 2) / d))
    return np.concatenate([np.sin(distance * inv_freq), np.cos(distance * inv_freq)])


def layer_norm(x, p, eps=1e-5):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def attention(p, x, mem, cmem, mem_mask, cmem_mask):
    """One row: x [N,d], mem [M,d], cmem [C,d] -> output [N,d], probs [H,N,T]."""
    N, d = x.shape
    M, C = mem.shape[0], cmem.shape[0]
    H, K = p["query"].shape[1:]
    q = np.einsum("nd,dhk->nhk", x, p["query"]) * K**-0.5
    kv_in = np.concatenate([cmem, mem, x])
    k = np.einsum("td,dhk->thk", kv_in, p["key"])
    v = np.einsum("td,dhk->thk", kv_in, p["value"])
    T = C + M + N
    scores = np.full((H, N, T), -np.inf)
    for i in range(N):
        for j in range(T):
            if j < C:
                visible, distance = cmem_mask[j], C + i - j
                kernel, bias = p["cmem_pos_kernel"], p["cmem_v_bias"]
            else:
                jj = j - C  # index within [mem; segment]
                visible = mem_mask[jj] if jj < M else (jj - M) <= i
                distance = M + i - jj
                kernel, bias = p["pos_kernel"], p["v_bias"]
            if not visible:
                continue
            r = np.einsum("d,dhk->hk", sinusoid(distance, d), kernel)
            for h in range(H):
                scores[h, i, j] = (q[i, h] + p["u_bias"][h]) @ k[j, h] + (q[i, h] + bias[h]) @ r[h]
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    read = np.einsum("hnt,thk->nhk", probs, v)
    return np.einsum("nhk,hkd->nd", read, p["out"]["kernel"]) + p["out"]["bias"], probs


def compress(p, evicted, cfg):
    c = cfg.compression_rate
    groups = evicted.reshape(-1, c, evicted.shape[-1])
    if cfg.compression == "max":
        return groups.max(1)
    if cfg.compression == "mean":
        return groups.mean(1)
    assert cfg.compression == "conv"
    return np.einsum("gcd,cde->ge", groups, p["strided"])


def reconstruction_loss(p, attention_in, old, compressed):
    """The attention-reconstruction loss of one row: content-only attention of the segment's
    queries over the evicted memories vs over their compression, squared error summed."""
    K = p["query"].shape[2]
    q = np.einsum("nd,dhk->nhk", attention_in, p["query"]) * K**-0.5

    def read(memories):
        k, v = (
            np.einsum("td,dhk->thk", memories, p["key"]),
            np.einsum("td,dhk->thk", memories, p["value"]),
        )
        scores = np.einsum("nhk,thk->hnt", q, k)
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        return np.einsum("hnt,thk->nhk", probs / probs.sum(-1, keepdims=True), v)

    return np.sum((read(old) - read(compressed)) ** 2)


def forward(params, tokens, memory, cfg):
    """Returns (logits [B,N,V], mem [L,B,n_m,d], cmem [L,B,n_cm,d], attention-reconstruction
    loss [L]: mean squared error over rows, positions, heads and head dims) for one segment."""
    params = _to_numpy(params)
    mem, cmem = np.asarray(memory.mem, np.float64), np.asarray(memory.cmem, np.float64)
    mem_mask, cmem_mask = np.asarray(memory.mem_mask), np.asarray(memory.cmem_mask)
    B, N = tokens.shape
    L, n_cm = cfg.n_layers, cfg.compressed_length
    new_mem, new_cmem = np.zeros_like(mem), np.zeros_like(cmem)
    logits, squared_error = [], np.zeros(L)
    for b in range(B):
        x = params["embed"]["embedding"][np.asarray(tokens[b])]
        for layer in range(L):
            p = {k: _layer(v, layer) for k, v in params["layers"].items()}
            attention_in = layer_norm(x, p["ln_attention"]) if cfg.layer_norm == "pre" else x
            out, _ = attention(
                p["attention"],
                attention_in,
                mem[layer, b],
                cmem[layer, b],
                mem_mask[b],
                cmem_mask[b],
            )
            if cfg.layer_norm == "pre":
                x = x + out
                x = x + _mlp(p, layer_norm(x, p["ln_mlp"]))
            else:
                x = layer_norm(x + out, p["ln_attention"])
                x = layer_norm(x + _mlp(p, x), p["ln_mlp"])
            full = np.concatenate([mem[layer, b], attention_in])
            new_mem[layer, b] = full[N:]
            if n_cm:
                compressed = compress(p.get("compress"), full[:N], cfg)
                new_cmem[layer, b] = np.concatenate([cmem[layer, b], compressed])[-n_cm:]
                squared_error[layer] += reconstruction_loss(
                    p["attention"], attention_in, full[:N], compressed
                )
        if cfg.layer_norm == "pre":
            x = layer_norm(x, params["ln_final"])
        logits.append(x @ params["logits"]["kernel"] + params["logits"]["bias"])
    H, K = params["layers"]["attention"]["query"].shape[2:]  # stacked [L, d, H, K]
    return np.stack(logits), new_mem, new_cmem, squared_error / (B * N * H * K)


def _mlp(p, x):
    hidden = np.maximum(x @ p["mlp_in"]["kernel"] + p["mlp_in"]["bias"], 0.0)
    return hidden @ p["mlp_out"]["kernel"] + p["mlp_out"]["bias"]


def _layer(tree, i):
    if isinstance(tree, dict):
        return {k: _layer(v, i) for k, v in tree.items()}
    return tree[i]


def _to_numpy(tree):
    if isinstance(tree, dict) or hasattr(tree, "items"):
        return {k: _to_numpy(v) for k, v in tree.items()}
    return np.asarray(tree, np.float64)
