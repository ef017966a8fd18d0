"""The decode step of rlmt.sampler: the KV cache of the slots, one token per row, and that step run at a
shape (rows [0, rows) of the cache, columns [0, width)) eager, compiled, or as a CUDA graph per shape.

The sampler's host side (which sample holds which slot, draws, stops, refills) is in rlmt.sampler; this
module is what runs on the device each step, and what bench/gpu.py times on its own.
"""

import contextlib

import torch


class KVCache:
    """Keys and values of `slots` rows: one k and one v [slots, K, S, hd] per layer, preallocated, zeroed.

    The model's attention calls `update(layer, k, v)` with the step's keys [b, K, 1, hd]; they are written
    at column `pos[i]` of row i (pos [b] long, set before the forward) and the first `width` columns of
    rows [0, b) come back: the step's shape, set by `Decoder` (the longest live row rounded up to a
    bucket, or S for the full-width path). One tensor per layer, written in place through
    index_put_: torch.compile then updates it in place, where a write into a slice of one
    [layers, ...] tensor made it copy the whole cache every step (seen on an H200: 8B decode 8× slower)."""

    def __init__(self, layers, slots, kv_heads, length, head_dim, dtype, device):
        shape = (slots, kv_heads, length, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.pos, self.width = None, length

    def update(self, layer, k, v):
        b = k.shape[0]
        rows = torch.arange(b, device=k.device)
        kc, vc = self.k[layer], self.v[layer]
        kc[rows, :, self.pos] = k[:, :, 0]  # [b, K, hd] into (row i, column pos[i])
        vc[rows, :, self.pos] = v[:, :, 0]
        return kc[:b, :, :self.width], vc[:b, :, :self.width]

    def copy_rows(self, dst, src, cols, from_k=None, from_v=None):
        """Columns [0, cols) of row `dst` <- row `src` of this cache, or of the per-layer tensors from_k /
        from_v (a prefill's, whose last `cols` columns are taken)."""
        for layer in range(len(self.k)):
            if from_k is None:
                self.k[layer][dst, :, :cols] = self.k[layer][src, :, :cols]
                self.v[layer][dst, :, :cols] = self.v[layer][src, :, :cols]
            else:
                self.k[layer][dst, :, :cols] = from_k[layer][src, :, -cols:]
                self.v[layer][dst, :, :cols] = from_v[layer][src, :, -cols:]


def decode_one_token(model, cache, tok, pos):
    """tok, pos [b] long: each row's last token and its position (= the cache column it is written to)
    -> logits [b, V] fp32. Each row attends to columns 0..pos of its own cache row."""
    cache.pos = pos
    cols = torch.arange(cache.width, device=pos.device)
    mask = (cols[None, :] <= pos[:, None])[:, None, None, :]  # [b, 1, 1, width], True = may attend
    logits = model(tok[:, None], position_ids=pos[:, None], cache=cache, attn_mask=mask, last_only=True)
    return logits[:, -1].float()


def round_rows(live):
    """The row bucket of `live` rows on a GPU: 1, 2, 3, 4, 6, 8, 12, 16, 24, ... (under a third of the rows
    idle), so a rollout meets ~2 log2(slots) row counts, each a CUDA graph."""
    b = 1
    while b < live:
        b = 2 if b == 1 else b * 3 // 2 if b & (b - 1) == 0 else b * 4 // 3
    return b


class Decoder:
    """decode_one_token at a shape (rows [0, rows) of `cache`, columns [0, width)): eager, compiled
    (torch.compile with dynamic shapes: four compiles a process, for many rows or 1 and a width short of
    the cache's or equal to it), or replaying the CUDA graph captured for that shape. Counts what it
    decodes: steps, rows, columns (rows x width, the KV columns read) and the distinct shapes.

    Graphs are captured on first use, inside this call, and share one memory pool: each writes its logits
    into one [slots, V] fp32 buffer, so the graphs of a rollout hold ~one step's scratch, not one each.
    gpt-fast gets graphs from torch.compile(mode="reduce-overhead"); capturing by hand keeps them tied
    to this call's cache, so no recompile follows a new cache."""

    def __init__(self, model, cache, slots, compile=False, cuda_graph=False):
        self.model, self.cache = model, cache
        self.fn = torch.compile(decode_one_token, dynamic=True) if compile else decode_one_token
        # no "duck sizing" in the compiled step: a width that happens to equal another size (4,096 = the 8B's
        # hidden size, or the cache's S) would otherwise be tied to it by a guard, and recompile when it moves
        self.shape_config = torch.fx.experimental._config.patch(use_duck_shape=False) if compile \
            else contextlib.nullcontext()
        self.graphs = None
        if cuda_graph:
            device = model.inv_freq.device
            if device.type != "cuda":
                raise ValueError("cuda_graph needs a CUDA device")
            self.graphs, self.pool = {}, torch.cuda.graph_pool_handle()
            self.tok = torch.zeros(slots, dtype=torch.long, device=device)
            self.pos = torch.zeros(slots, dtype=torch.long, device=device)
            self.logits = torch.zeros(slots, model.config.vocab_size, device=device)
        self.shapes, self.steps, self.rows, self.columns = set(), 0, 0, 0

    def __call__(self, tok, pos, width):
        """tok, pos [rows] long -> logits [rows, V] fp32 (a graph's: valid until the next step)."""
        rows = tok.shape[0]
        self.shapes.add((rows, width))
        self.steps, self.rows, self.columns = self.steps + 1, self.rows + rows, self.columns + rows * width
        self.cache.width = width
        if self.graphs is None:
            with self.shape_config:
                return self.fn(self.model, self.cache, tok, pos)
        self.tok[:rows].copy_(tok)
        self.pos[:rows].copy_(pos)
        if (rows, width) not in self.graphs:
            self.graphs[rows, width] = self._capture(rows)
        self.graphs[rows, width].replay()
        return self.logits[:rows]

    def _capture(self, rows):
        # The warm-up (which also compiles) runs the real step on the real inputs: it writes each row's key
        # and value at the column the replay then writes again, so capturing mid-rollout changes nothing.
        args = (self.model, self.cache, self.tok[:rows], self.pos[:rows])
        device = self.tok.device
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(2):
                with self.shape_config:
                    self.fn(*args)
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool), self.shape_config:
            self.logits[:rows].copy_(self.fn(*args))
        return graph
