"""KV-cached batched sampling: prefill each prompt once, n samples per prompt, continuous batching.

The loop follows gpt-fast (`prefill` / `decode_one_token` / `sample`, a cache written at explicit
positions so shapes stay static) and nanochat's engine (prefill a prompt once, copy its cache to each
sample); the code is written anew:

  1. `batch_size` slots share one preallocated KV cache [layers, slots, K, S, hd], S = longest prompt +
     max_new_tokens; it lives for one `generate` call.
  2. A free slot takes the next pending sample (prompt-major order). Prompts not yet seen are prefilled
     together (left-padded, one forward); the prompt's keys and values are copied into the slot, and the
     first token is drawn from the prompt's last logits: the n samples of a prompt cost one prefill.
  3. Each decode step feeds every live row its last token at the row's own position; the new key and
     value are scattered into that column, so no shape depends on where a row is.
  4. A row that stops (a stop id, a stop string, or max_new_tokens) hands its slot to the next pending
     sample, so one 4,000-token thought does not idle the other rows. Once nothing is pending, the
     eager path packs the live rows to the front and decodes only those.
  5. The host reads the new tokens and books stops and refills once every `sync_every` steps (every step
     on the CPU, every 16 on a GPU, which would otherwise idle during each read).

Randomness: each sample draws its uniforms from its own torch.Generator, seeded by (seed, prompt,
sample), so a sample is the same whatever batch, slot or rank it runs in.

Log-probs: each token's log π_T = log_softmax(logits / T), in fp32, temperature applied and *before*
top-p / top-k truncation, so they equal what the trainer's chunked log-probs compute on the same tokens
(rlmt.logprobs). Greedy (T = 0) reports them at T = 1.
"""

import hashlib
import time
from collections import deque

import torch

from rlmt import data, dist


class KVCache:
    """Keys and values of `slots` rows: one k and one v [slots, K, S, hd] per layer, preallocated, zeroed.

    The model's attention calls `update(layer, k, v)` with the step's keys [b, K, 1, hd]; they are written
    at column `pos[i]` of row i (pos [b] long, set before the forward) and the first `width` columns of
    rows [0, b) come back. width = S keeps shapes static (the compiled step); the eager path sets it to
    the longest live row, rounded up to `bucket` columns. One tensor per layer, written in place through
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


class PromptKV:
    """The `cache` for a prefill of P left-padded prompts: hands the keys and values straight back to the
    attention and keeps them, k, v [layers, P, K, T, hd], for copying into slots."""

    def __init__(self, layers):
        self.layers, self.k, self.v = layers, None, None

    def update(self, layer, k, v):
        if self.k is None:
            self.k, self.v = k.new_empty((self.layers, *k.shape)), v.new_empty((self.layers, *v.shape))
        self.k[layer], self.v[layer] = k, v
        return k, v


# Prompt tokens per prefill forward: its keys and values wait in a PromptKV until copied into slots, so
# prefilling 256 prompts of 512 tokens at once ran an 8B model out of an H100's 80 GB (bench/gpu.py).
PREFILL_TOKENS = 32768


def decode_one_token(model, cache, tok, pos):
    """tok, pos [b] long: each row's last token and its position (= the cache column it is written to)
    -> logits [b, V] fp32. Each row attends to columns 0..pos of its own cache row."""
    cache.pos = pos
    cols = torch.arange(cache.width, device=pos.device)
    mask = (cols[None, :] <= pos[:, None])[:, None, None, :]  # [b, 1, 1, width], True = may attend
    logits = model(tok[:, None], position_ids=pos[:, None], cache=cache, attn_mask=mask, last_only=True)
    return logits[:, -1].float()


def sample(logits, u=None, temperature=1.0, top_p=1.0, top_k=0):
    """One token per row. logits [b, V], u [b] uniforms in [0, 1) -> (tokens [b] long, logprobs [b] fp32).

    temperature == 0: argmax, log-prob at T = 1. Otherwise a draw from softmax(logits / T) restricted to
    the `top_k` most likely tokens (0 = all), then to the nucleus: the most likely tokens, in order, while
    the mass before a token is below `top_p` of what top-k kept. The returned log-prob is always the
    untruncated log_softmax(logits / T) of the chosen token.

    The draw is an inverse CDF (row i takes the first token whose cumulative mass exceeds u[i] of the
    total): `torch.multinomial` with a generator was several times slower on the CPU (PITFALLS.md), and
    given uniforms make the draw a pure function, whatever batch the row is in."""
    z = logits.float() / (temperature if temperature > 0 else 1.0)
    top, tok = z.max(-1, keepdim=True)
    w = (z - top).exp()                       # probabilities up to a factor, in (0, 1]
    lse = top + w.sum(-1, keepdim=True).log()  # log-sum-exp, one pass less than torch.logsumexp
    if temperature > 0:
        order = None
        if top_k > 0 or top_p < 1.0:
            w, order = w.sort(-1, descending=True)
            if top_k > 0:
                w[:, top_k:] = 0
            if top_p < 1.0:
                before = w.cumsum(-1) - w
                w = w.masked_fill(before >= top_p * w.sum(-1, keepdim=True), 0)
        cdf = w.cumsum(-1)  # the draw needs no normalization: u is scaled by the total instead
        total = cdf[:, -1:]
        u = u.to(total.dtype)[:, None] * total
        # u < total even after rounding, so the search lands on a token of non-zero probability
        u = torch.minimum(u, torch.nextafter(total, torch.zeros_like(total)))
        tok = torch.searchsorted(cdf, u, right=True)
        if order is not None:
            tok = order.gather(-1, tok)
    return tok.squeeze(-1), (z.gather(-1, tok) - lse).squeeze(-1)


def _check(prompts, n, max_new_tokens, temperature, top_p, top_k, batch_size, sync_every, stop_strings, tokenizer,
           seed):
    problems = [
        (isinstance(seed, (list, tuple)) and len(seed) != len(prompts),
         f"seed: one per prompt, or one int; got {len(seed) if isinstance(seed, (list, tuple)) else 0} seeds for "
         f"{len(prompts)} prompts"),
        (n < 1, f"n must be at least 1, got {n}"),
        (max_new_tokens < 1, f"max_new_tokens must be at least 1, got {max_new_tokens}"),
        (temperature < 0, f"temperature must be >= 0 (0 = greedy), got {temperature}"),
        (not 0 < top_p <= 1, f"top_p must be in (0, 1], got {top_p}"),
        (top_k < 0, f"top_k must be >= 0 (0 = off), got {top_k}"),
        (batch_size < 1, f"batch_size must be at least 1, got {batch_size}"),
        (sync_every is not None and sync_every < 1, f"sync_every must be at least 1, got {sync_every}"),
        (bool(stop_strings) and tokenizer is None, "stop_strings need the tokenizer (tokenizer=...)"),
        (any(len(p) == 0 for p in prompts), "every prompt needs at least one token"),
    ]
    for bad, message in problems:
        if bad:
            raise ValueError(message)


def generate(model, prompts, n=1, *, max_new_tokens, temperature=0.7, top_p=1.0, top_k=0, stop_ids=(),
             stop_strings=None, tokenizer=None, seed=0, batch_size=64, ignore_eos=False, compile=False,
             cuda_graph=None, sync_every=None, progress=False):
    """Sample `n` responses to each prompt.

    prompts: P lists of token ids. stop_ids: ids that end a sample (EOS and end-of-turn tokens,
    rlmt.chat.stop_ids); stop_strings: texts that end it (checked on the decoded tail; need `tokenizer`).
    ignore_eos: no stop of either kind, every sample gets exactly max_new_tokens.
    seed: an int, or one int per prompt. Each sample draws its uniforms from its own torch.Generator,
    seeded by (seed, prompt index, sample index), or (seed[p], sample index): a sample does not depend
    on batch_size, on its slot, on the compiled path or on the other prompts in the call. Per-prompt
    seeds derived from a global prompt index make prompts split over ranks draw what one process draws.
    batch_size: slots decoded together. The cache holds 2 x layers x slots x K x (longest prompt +
    max_new_tokens) x hd values: Llama-3.1-8B in bf16, 64 slots x 5,120 tokens, takes 43 GB.
    compile: torch.compile the decode step with static shapes (every slot, the whole cache width rounded
    up to 256), for GPUs; the first call compiles (~30 s on a CPU).
    cuda_graph: capture the decode step (compiled or not) in a CUDA graph, once per call, and replay it
    each step: one launch instead of hundreds, which is what decode waits on (an H200 at 64 rows: 77 ->
    4.9 ms a step for a 1B model, 81 -> 14 ms for an 8B; bench/gpu.py). Static shapes as with compile.
    None: on whenever the device is a CUDA device.
    sync_every: decode steps between reads of the new tokens by the host. A read makes a GPU wait while
    the host books the step (stops, refills), so a GPU reads every 16 steps and a finished row idles
    at most 15 steps before its slot is refilled; the CPU reads every step (None picks these). The
    samples are the same whatever the value.
    model: a plain module; hand an FSDP2 model over as `rlmt.dist.full_copy(model)` (the rollout copy,
    in the compute dtype: bf16 weights decode at the speed of bf16).
    Every sampling field is an argument; a checkpoint's generation_config is never read.

    Returns N = P * n dicts in prompt-major order (the n samples of prompt 0, then of prompt 1, ...):
      prompt_index, sample_index  ints
      tokens        list[int], L <= max_new_tokens ids, ending with the stop token when finish is "stop"
      logprobs      FloatTensor [L] fp32: log_softmax(logits / T) of each token, before top-p / top-k
      finish_reason "stop" (a stop id or string) or "length" (max_new_tokens reached, no stop token)
    The mask of DESIGN.md is 1 on exactly these L tokens; to_batch builds it from the lengths."""
    prompts = [list(p) for p in prompts]
    _check(prompts, n, max_new_tokens, temperature, top_p, top_k, batch_size, sync_every, stop_strings, tokenizer,
           seed)
    per_prompt = isinstance(seed, (list, tuple))
    N = len(prompts) * n
    if N == 0:
        return []
    stops = set() if ignore_eos else set(stop_ids)
    strings = [] if ignore_eos else [s for s in stop_strings or () if s]
    window = max((len(s.encode()) for s in strings), default=0)  # a token holds >= 1 byte
    if dist.is_sharded(model):
        raise ValueError("generate() decodes a plain module; pass rlmt.dist.full_copy(model) for an FSDP2 model "
                         "(its hooks would gather weights and run collectives at every decode step)")
    with torch.no_grad():
        cfg, device = model.config, model.inv_freq.device
        slots = min(batch_size, N)
        S = max(map(len, prompts)) + max_new_tokens
        if compile:  # each cache length is a new graph: round it up so rollouts reuse a few
            S = -(-S // 256) * 256
        cache = KVCache(cfg.num_layers, slots, cfg.num_kv_heads, S, cfg.head_dim,
                        model.model.embed_tokens.weight.dtype, device)
        keys = [(int(x),) for x in seed] if per_prompt else [(int(seed), p) for p in range(len(prompts))]
        draws = torch.zeros(slots, max_new_tokens, device=device)  # each slot's sample's uniforms
        step = torch.compile(decode_one_token, dynamic=False) if compile else decode_one_token
        if cuda_graph is None:
            cuda_graph = device.type == "cuda"
        static = compile or cuda_graph  # every slot decoded each step, over the whole cache width
        bucket = 256 if device.type == "cuda" else 1
        if sync_every is None:
            sync_every = 16 if device.type == "cuda" else 1
        if cuda_graph:
            step = _GraphedStep(step, model, cache, slots, device)

        pending = deque(range(N))   # sample j belongs to prompt j // n
        ready = {}                  # prompt -> (PromptKV, row, last logits [V]) until its n samples start
        owner = [-1] * slots        # sample held by each slot, -1 = free
        cur, pos = [0] * slots, [0] * slots  # each slot's last token and the column it goes to
        tokens, logprobs, reasons = [[] for _ in range(N)], [[] for _ in range(N)], [None] * N
        live = slots                # decode rows [0, live): all slots, or the packed tail (eager path)
        bar = _progress(N) if progress else None

        def prefill(ps):
            ids, am = data.left_pad([prompts[p] for p in ps], 0)  # the pad id is masked out
            kv = PromptKV(cfg.num_layers)
            last = model(ids.to(device), am.to(device), cache=kv, last_only=True)[:, -1].float()
            for row, p in enumerate(ps):
                ready[p] = (kv, row, last[row])

        def record(rows, tok, lp):
            """Append each row's new token (lists of ints / floats); free the rows whose sample just ended."""
            added = ended = 0
            for s, t, l in zip(rows, tok, lp):
                j = owner[s]
                if j < 0:
                    continue
                tokens[j].append(t)
                logprobs[j].append(l)
                cur[s], pos[s], added = t, pos[s] + 1, added + 1
                hit = t in stops or (window and any(x in tokenizer.decode(tokens[j][-window:]) for x in strings))
                if hit or len(tokens[j]) == max_new_tokens:
                    reasons[j], owner[s], pos[s], ended = "stop" if hit else "length", -1, 0, ended + 1
            if bar is not None:
                bar.update(added, ended)

        def admit():
            """Give free slots to pending samples: copy in the prompt's cache, draw the first token."""
            free = [s for s in range(slots) if owner[s] < 0][:len(pending)]
            take = [pending.popleft() for _ in free]
            new = sorted({j // n for j in take} - ready.keys())
            rows = max(1, PREFILL_TOKENS // max((len(prompts[p]) for p in new), default=1))
            first = []
            for s, j in zip(free, take):
                p = j // n
                if p not in ready:  # the next `rows` new prompts in one forward; earlier ones are copied by now
                    i = new.index(p)
                    prefill(new[i:i + rows])
                kv, row, last = ready[p]
                L = len(prompts[p])
                cache.copy_rows(s, row, L, kv.k, kv.v)
                owner[s], pos[s] = j, L - 1  # record() moves it to L, the first token's column
                if temperature > 0:  # the sample's own uniforms, one for each token it may draw
                    g = _generator(keys[p] + (j % n,), device)
                    draws[s] = torch.rand(max_new_tokens, generator=g, device=device)
                first.append(last)
                if j % n == n - 1:  # the prompt's last sample has a slot: free its prefill
                    ready.pop(p)
            first = torch.stack(first)
            tok, lp = sample(first, draws[free, 0], temperature, top_p, top_k)
            record(free, tok.tolist(), lp.tolist())

        def pack():
            """Nothing pending (eager path): move live rows into the free slots below them, so the
            decode batch [0, live) holds only live rows."""
            nonlocal live
            while True:
                while live and owner[live - 1] < 0:
                    live -= 1
                hole = next((s for s in range(live) if owner[s] < 0), None)
                if hole is None:
                    return
                src, cols = live - 1, pos[live - 1]  # the columns that row has written
                cache.copy_rows(hole, src, cols)
                draws[hole] = draws[src]
                owner[hole], cur[hole], pos[hole], owner[src] = owner[src], cur[src], pos[src], -1

        while True:
            while pending and -1 in owner:
                admit()
            if not static and not pending:
                pack()
            if not any(o >= 0 for o in owner[:live]):
                break
            # k decode steps before the host reads the tokens back: a GPU idles at every read while the host
            # books the step, so it reads once per window, books the k steps in order and drops whatever a
            # row drew after its sample ended (positions and draw counts are clamped for such rows)
            k = min(sync_every, max(max_new_tokens - len(tokens[j]) for j in owner[:live] if j >= 0))
            # eager: attend up to the longest live row, in steps of `bucket` columns on a GPU, where each
            # new width costs a fresh attention set-up (~70 ms a step on an H200 when it changed every step)
            cache.width = S if static else min(S, -(-(max(pos[:live]) + k) // bucket) * bucket)
            counts = [len(tokens[j]) if j >= 0 else 0 for j in owner[:live]]  # uniforms used so far
            tok, at, drawn = torch.tensor([cur[:live], pos[:live], counts], device=device)
            drew = []
            for _ in range(k):
                u = draws[:live].gather(1, drawn[:, None]).squeeze(1)  # each row's next uniform
                tok, lp = sample(step(model, cache, tok, at), u, temperature, top_p, top_k)
                drew.append((tok, lp))
                at, drawn = (at + 1).clamp_(max=S - 1), (drawn + 1).clamp_(max=max_new_tokens - 1)
            toks, lps = (torch.stack(x, 1).tolist() for x in zip(*drew))  # [live, k] each
            for i in range(k):
                record(range(live), [t[i] for t in toks], [x[i] for x in lps])
        if bar is not None:
            bar.close()
    return [{"prompt_index": j // n, "sample_index": j % n, "tokens": tokens[j],
             "logprobs": torch.tensor(logprobs[j], dtype=torch.float32), "finish_reason": reasons[j]}
            for j in range(N)]


class _GraphedStep:
    """decode_one_token for every slot of `cache`, captured once in a CUDA graph and replayed: the
    inputs are copied into the graph's own tensors, the logits come back in its output tensor (valid
    until the next replay). gpt-fast gets the same from torch.compile(mode="reduce-overhead"); capturing
    by hand keeps the graph tied to this call's cache, so no recompile follows a new cache."""

    def __init__(self, step, model, cache, slots, device):
        if device.type != "cuda":
            raise ValueError("cuda_graph needs a CUDA device")
        self.tok = torch.zeros(slots, dtype=torch.long, device=device)
        self.pos = torch.zeros(slots, dtype=torch.long, device=device)
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):  # warm-up runs (and compiles) outside the capture
            for _ in range(2):
                step(model, cache, self.tok, self.pos)
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = step(model, cache, self.tok, self.pos)
        for t in cache.k + cache.v:  # the warm-up wrote column 0 of every slot
            t.zero_()

    def __call__(self, model, cache, tok, pos):
        self.tok.copy_(tok)
        self.pos.copy_(pos)
        self.graph.replay()
        return self.logits


def _generator(key, device):
    """A generator seeded from a tuple of ints (a stable hash: Python's own hash() is for dicts)."""
    digest = hashlib.blake2b(repr(key).encode(), digest_size=8).digest()
    return torch.Generator(device=device).manual_seed(int.from_bytes(digest, "little"))


class _progress:
    """A tqdm bar of finished samples, with the tokens generated per second so far."""

    def __init__(self, total):
        from tqdm import tqdm
        self.bar, self.tokens = tqdm(total=total, unit="sample", dynamic_ncols=True), 0
        self.start = self.shown = time.perf_counter()

    def update(self, tokens, samples):
        self.tokens += tokens
        now = time.perf_counter()
        if samples or now - self.shown > 0.5:  # redraw on a finished sample, else twice a second
            self.bar.set_postfix_str(f"{self.tokens / max(now - self.start, 1e-9):,.0f} tok/s", refresh=False)
            self.bar.update(samples)
            self.bar.refresh()
            self.shown = now

    def close(self):
        self.bar.close()


def to_batch(prompts, samples, pad_id):
    """Samples from `generate` -> a training batch (rlmt.data.join), each sample after its prompt.

    prompts: the P prompt id lists given to generate; samples: its output (or a subset, any order).
    Returns LongTensors [B, P' + R] input_ids, attention_mask, position_ids, response_mask (1 on each
    sample's tokens, from lengths, so pad == EOS is harmless), prompt_len = P' (int), and
    old_logprobs FloatTensor [B, P' + R]: old_logprobs[b, t] is the sampler's log-prob of input_ids[b, t]
    (0 outside the response), the alignment of rlmt.logprobs.sequence_logprobs."""
    batch = data.join([prompts[s["prompt_index"]] for s in samples], [s["tokens"] for s in samples], pad_id)
    P = batch["prompt_len"]
    old = torch.zeros(batch["input_ids"].shape, dtype=torch.float32)
    for b, s in enumerate(samples):
        old[b, P:P + len(s["tokens"])] = s["logprobs"]
    batch["old_logprobs"] = old
    return batch
