"""KV-cached batched sampling: prefill each prompt once, n samples per prompt, continuous batching.

The pieces follow gpt-fast (`prefill` / `decode_one_token` / `sample`, a cache written at explicit
positions so shapes stay static) and nanochat's engine (prefill a prompt once, copy its cache to each
sample); the code is written anew. The device step (KV cache, decode_one_token, one CUDA graph per
shape) is rlmt.decode; `generate` here is the driver:

  1. `batch_size` slots share one preallocated KV cache [layers, slots, K, S, hd], S = longest prompt +
     max_new_tokens; it lives for one `generate` call.
  2. `Slots` books which sample holds which slot. A free slot takes the next pending sample
     (prompt-major order). Prompts not yet seen are prefilled together (left-padded, one forward); the
     prompt's keys and values are copied into the slot, and the first token is drawn from the prompt's
     last logits: the n samples of a prompt cost one prefill.
  3. Each decode step feeds every row its last token at the row's own position; the new key and value
     are scattered into that column, so no shape depends on where a row is.
  4. A row that stops (a stop id, a stop string, or its max_new_tokens) hands its slot to the next
     pending sample, so one 4,000-token thought does not idle the other rows. Once nothing is pending,
     the live rows are packed to the front of the cache.
  5. Live shapes: a step decodes rows [0, rows) over columns [0, width) only: rows = the live rows,
     width = the longest live row's position after the window. On a GPU both are rounded up to buckets
     (rows to 1, 2, 3, 4, 6, 8, 12, 16, 24, ..., width to a multiple of 256) and rlmt.decode captures one
     CUDA graph per shape it meets, so as rows finish, a step costs what its live rows read, not the
     whole [slots, S] cache (an 8B at 64 rows x 5,120 columns reads 43 GB of KV a step).
  6. The host reads the new tokens and books stops and refills once every `sync_every` steps (every step
     on the CPU, every 16 on a GPU, which would otherwise idle during each read).

Randomness: each sample draws its uniforms from its own torch.Generator, seeded by (seed, prompt,
sample), so a sample is the same whatever batch, slot, shape or rank it runs in.

Log-probs: each token's log π_T = log_softmax(logits / T), in fp32, temperature applied and *before*
top-p / top-k truncation, so they equal what the trainer's chunked log-probs compute on the same tokens
(rlmt.logprobs). Greedy (T = 0) reports them at T = 1.

The sampler decodes a plain module. A trained FSDP2 model is handed over as its rollout copy,
`rlmt.dist.full_copy(model)` (plain bf16 weights that CUDA graphs and torch.compile can take); this
module imports nothing of rlmt.dist.
"""

import hashlib
import time
from collections import deque

import torch

from rlmt import data
from rlmt.decode import Decoder, KVCache, round_rows


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


def _check(prompts, n, limits, temperature, top_p, top_k, batch_size, sync_every, stop_strings, tokenizer,
           seed, bucket):
    problems = [
        (isinstance(seed, (list, tuple)) and len(seed) != len(prompts),
         f"seed: one per prompt, or one int; got {len(seed) if isinstance(seed, (list, tuple)) else 0} seeds for "
         f"{len(prompts)} prompts"),
        (n < 1, f"n must be at least 1, got {n}"),
        (len(limits) != len(prompts) * n,
         f"max_new_tokens: one int, or one per sample; got {len(limits)} for {len(prompts) * n} samples"),
        (any(m < 1 for m in limits), f"max_new_tokens must be at least 1, got {min(limits, default=1)}"),
        (temperature < 0, f"temperature must be >= 0 (0 = greedy), got {temperature}"),
        (not 0 < top_p <= 1, f"top_p must be in (0, 1], got {top_p}"),
        (top_k < 0, f"top_k must be >= 0 (0 = off), got {top_k}"),
        (batch_size < 1, f"batch_size must be at least 1, got {batch_size}"),
        (sync_every is not None and sync_every < 1, f"sync_every must be at least 1, got {sync_every}"),
        (bucket is not None and bucket < 1, f"bucket must be at least 1, got {bucket}"),
        (bool(stop_strings) and tokenizer is None, "stop_strings need the tokenizer (tokenizer=...)"),
        (any(len(p) == 0 for p in prompts), "every prompt needs at least one token"),
    ]
    for bad, message in problems:
        if bad:
            raise ValueError(message)


def _is_fsdp(model):
    from torch.distributed.fsdp import FSDPModule
    return any(isinstance(m, FSDPModule) for m in model.modules())


def prefill(model, prompts):
    """prompts: P lists of ids -> (PromptKV holding their keys and values, last logits [P, V] fp32).
    Left-padded into one forward; the pad id is masked out."""
    ids, am = data.left_pad(prompts, 0)
    device = model.inv_freq.device
    kv = PromptKV(model.config.num_layers)
    last = model(ids.to(device), am.to(device), cache=kv, last_only=True)[:, -1].float()
    return kv, last


class Slots:
    """The host's bookkeeping of `generate`: which sample holds which cache slot, and where it is.

    Sample j (prompt j // n, sample j % n) waits in `pending` until a slot is free. A slot holds its
    sample (`owner`, -1 = free), the sample's last token (`cur`), the column that token goes to (`pos`)
    and, on the device, the sample's uniforms (`draws` [slots, max_new]). `admit` starts pending samples
    in free slots, `record` books new tokens and frees the slots whose sample ended, `pack` moves live
    rows down into freed slots; rows [0, live) then hold every live sample."""

    def __init__(self, prompts, n, slots, limits, keys, temperature, ended, device, bar=None, on_tokens=None):
        self.prompts, self.n, self.limits, self.keys, self.on_tokens = prompts, n, limits, keys, on_tokens
        self.temperature, self.ended, self.device, self.bar = temperature, ended, device, bar
        N = len(prompts) * n
        self.pending = deque(range(N))
        self.ready = {}  # prompt -> (PromptKV, its row, last logits [V]) until its n samples have slots
        self.owner, self.cur, self.pos = [-1] * slots, [0] * slots, [0] * slots
        self.tokens, self.logprobs, self.reasons = [[] for _ in range(N)], [[] for _ in range(N)], [None] * N
        self.draws = torch.zeros(slots, max(limits), device=device)

    @property
    def live(self):
        """Rows to decode: up to the last slot that holds a sample (0 when none does)."""
        return next((s + 1 for s in range(len(self.owner) - 1, -1, -1) if self.owner[s] >= 0), 0)

    def has_free(self):
        return -1 in self.owner

    def admit(self, cache, prefill_fn, prefill_tokens):
        """Give free slots to pending samples: copy in the prompt's keys and values (prefilling the prompts
        not seen yet, `prefill_tokens` prompt tokens a forward, through prefill_fn(prompt indices) ->
        (PromptKV, last logits)) and draw the sample's uniforms. -> (slots [s], first-token logits [s, V])."""
        free = [s for s in range(len(self.owner)) if self.owner[s] < 0][:len(self.pending)]
        take = [self.pending.popleft() for _ in free]
        new = sorted({j // self.n for j in take} - self.ready.keys())
        rows = max(1, prefill_tokens // max((len(self.prompts[p]) for p in new), default=1))
        first = []
        for s, j in zip(free, take):
            p = j // self.n
            if p not in self.ready:  # the next `rows` new prompts in one forward; earlier ones are copied by now
                chunk = new[new.index(p):new.index(p) + rows]
                kv, last = prefill_fn(chunk)
                self.ready.update({q: (kv, row, last[row]) for row, q in enumerate(chunk)})
            kv, row, last = self.ready[p]
            L = len(self.prompts[p])
            cache.copy_rows(s, row, L, kv.k, kv.v)
            self.owner[s], self.pos[s] = j, L - 1  # record() moves it to L, the first token's column
            if self.temperature > 0:  # the sample's own uniforms, one for each token it may draw
                g = _generator(self.keys[p] + (j % self.n,), self.device)
                self.draws[s] = torch.rand(self.draws.shape[1], generator=g, device=self.device)
            first.append(last)
            if j % self.n == self.n - 1:  # the prompt's last sample has a slot: free its prefill
                self.ready.pop(p)
        return free, torch.stack(first)

    def record(self, rows, tok, lp):
        """Append each row's new token (lists of ints / floats); free the rows whose sample just ended."""
        added = ended = 0
        for s, t, l in zip(rows, tok, lp):
            j = self.owner[s]
            if j < 0:
                continue
            self.tokens[j].append(t)
            self.logprobs[j].append(l)
            self.cur[s], self.pos[s], added = t, self.pos[s] + 1, added + 1
            hit = self.ended(t, self.tokens[j])
            if hit or len(self.tokens[j]) == self.limits[j]:
                self.reasons[j], self.owner[s], self.pos[s], ended = "stop" if hit else "length", -1, 0, ended + 1
            if self.on_tokens is not None:  # a server streaming the sample as it grows
                self.on_tokens(j, self.tokens[j])
        if self.bar is not None:
            self.bar.update(added, ended)

    def pack(self, cache):
        """Move live rows into the free slots below them (their written columns and their uniforms), so
        rows [0, live) hold only live samples."""
        while True:
            live = self.live
            hole = next((s for s in range(live) if self.owner[s] < 0), None)
            if hole is None:
                return
            src = live - 1
            cache.copy_rows(hole, src, self.pos[src])  # the columns that row has written
            self.draws[hole] = self.draws[src]
            for field in (self.owner, self.cur, self.pos):
                field[hole] = field[src]
            self.owner[src] = -1

    def window(self, sync_every):
        """Decode steps before the next read: sync_every, or fewer when every live sample ends sooner."""
        return min(sync_every, max(self.limits[j] - len(self.tokens[j]) for j in self.owner if j >= 0))

    def results(self):
        return [{"prompt_index": j // self.n, "sample_index": j % self.n, "tokens": self.tokens[j],
                 "logprobs": torch.tensor(self.logprobs[j], dtype=torch.float32), "finish_reason": self.reasons[j]}
                for j in range(len(self.tokens))]


def generate(model, prompts, n=1, *, max_new_tokens, temperature=0.7, top_p=1.0, top_k=0, stop_ids=(),
             stop_strings=None, tokenizer=None, seed=0, batch_size=64, ignore_eos=False, compile=False,
             cuda_graph=None, sync_every=None, bucket=None, full_width=False, progress=False, stats=None,
             on_tokens=None):
    """Sample `n` responses to each prompt.

    prompts: P lists of token ids. max_new_tokens: the response budget, one int or one per sample
    (prompt-major order). stop_ids: ids that end a sample (EOS and end-of-turn tokens,
    rlmt.chat.stop_ids); stop_strings: texts that end it (checked on the decoded tail; need `tokenizer`).
    ignore_eos: no stop of either kind, every sample gets exactly its max_new_tokens.
    seed: an int, or one int per prompt. Each sample draws its uniforms from its own torch.Generator,
    seeded by (seed, prompt index, sample index), or (seed[p], sample index): a sample does not depend
    on batch_size, on its slot, on the decode path or on the other prompts in the call. Per-prompt
    seeds derived from a global prompt index make prompts split over ranks draw what one process draws.
    batch_size: slots decoded together. The cache holds 2 x layers x slots x K x (longest prompt +
    max_new_tokens) x hd values: Llama-3.1-8B in bf16, 64 slots x 5,120 tokens, takes 43 GB.
    compile: torch.compile the decode step, for GPUs; the first call compiles (~30 s on a CPU, 40-65 s
    for an 8B on a GPU), a second shape recompiles once with dynamic shapes.
    cuda_graph: capture the decode step (compiled or not) in a CUDA graph per shape and replay it each
    step: one launch instead of hundreds, which is what decode waits on (an H200 at 64 rows: 77 -> 4.9 ms
    a step for a 1B model, 81 -> 14 ms for an 8B; bench/gpu.py). None: on whenever the device is CUDA.
    bucket: shapes are rounded up to it, width to a multiple of `bucket` columns and, when bucket > 1,
    rows to 1, 2, 3, 4, 6, 8, 12, ...: each shape is one graph to capture and one eager attention
    set-up (~70 ms a step on an H200 when the width changed every step). None: 256 on a GPU, 1 (exact
    shapes) on the CPU.
    full_width: decode every slot over the whole cache width at every step (the static shape of the
    path before live shapes; kept to measure against).
    sync_every: decode steps between reads of the new tokens by the host. A read makes a GPU wait while
    the host books the step (stops, refills), so a GPU reads every 16 steps and a finished row idles
    at most 15 steps before its slot is refilled; the CPU reads every step (None picks these). The
    samples are the same whatever the value.
    model: a plain module; hand an FSDP2 model over as `rlmt.dist.full_copy(model)` (the rollout copy,
    in the compute dtype: bf16 weights decode at the speed of bf16).
    stats: a dict, filled with steps (decode forwards), rows (their summed rows), columns (summed
    rows x width: the KV columns read) and shapes (the distinct (rows, width) decoded, sorted: on a
    GPU, the graphs captured).
    on_tokens: called as on_tokens(j, tokens) each time sample j (prompt-major index) gets a token, with
    its token list so far (the live list: copy it to keep it); for streaming servers.
    Every sampling field is an argument; a checkpoint's generation_config is never read.

    Returns N = P * n dicts in prompt-major order (the n samples of prompt 0, then of prompt 1, ...):
      prompt_index, sample_index  ints
      tokens        list[int], L <= max_new_tokens ids, ending with the stop token when finish is "stop"
      logprobs      FloatTensor [L] fp32: log_softmax(logits / T) of each token, before top-p / top-k
      finish_reason "stop" (a stop id or string) or "length" (max_new_tokens reached, no stop token)
    The mask of DESIGN.md is 1 on exactly these L tokens; to_batch builds it from the lengths."""
    prompts = [list(p) for p in prompts]
    N = len(prompts) * n
    limits = [int(m) for m in max_new_tokens] if isinstance(max_new_tokens, (list, tuple)) else [max_new_tokens] * N
    _check(prompts, n, limits, temperature, top_p, top_k, batch_size, sync_every, stop_strings, tokenizer, seed,
           bucket)
    if N == 0:
        return []
    if _is_fsdp(model):
        raise ValueError("generate() decodes a plain module; pass rlmt.dist.full_copy(model) for an FSDP2 model "
                         "(its hooks would gather weights and run collectives at every decode step)")
    stops = set() if ignore_eos else set(stop_ids)
    strings = [] if ignore_eos else [s for s in stop_strings or () if s]
    window = max((len(s.encode()) for s in strings), default=0)  # a token holds >= 1 byte

    def ended(t, tokens):
        return t in stops or bool(window and any(x in tokenizer.decode(tokens[-window:]) for x in strings))

    with torch.no_grad():
        cfg, device = model.config, model.inv_freq.device
        cuda = device.type == "cuda"
        slots, longest = min(batch_size, N), max(limits)
        bucket = bucket or (256 if cuda else 1)
        S = -(-(max(map(len, prompts)) + longest) // bucket) * bucket  # every bucketed width fits
        sync_every = sync_every or (16 if cuda else 1)
        cache = KVCache(cfg.num_layers, slots, cfg.num_kv_heads, S, cfg.head_dim,
                        model.model.embed_tokens.weight.dtype, device)
        keys = [(int(x),) for x in seed] if isinstance(seed, (list, tuple)) else \
            [(int(seed), p) for p in range(len(prompts))]
        book = Slots(prompts, n, slots, limits, keys, temperature, ended, device, _progress(N) if progress else None,
                     on_tokens)
        step = Decoder(model, cache, slots, compile, cuda if cuda_graph is None else cuda_graph)
        while True:
            while book.pending and book.has_free():
                free, first = book.admit(cache, lambda ps: prefill(model, [prompts[p] for p in ps]), PREFILL_TOKENS)
                tok, lp = sample(first, book.draws[free, 0], temperature, top_p, top_k)
                book.record(free, tok.tolist(), lp.tolist())
            if not book.pending:
                book.pack(cache)
            live = book.live
            if live == 0:
                break
            # k decode steps before the host reads the tokens back: a GPU idles at every read while the host
            # books the step, so it reads once per window, books the k steps in order and drops whatever a
            # row drew after its sample ended (positions and draw counts are clamped for such rows)
            k = book.window(sync_every)
            if full_width:
                rows, width = slots, S
            else:
                rows = min(slots, round_rows(live) if bucket > 1 else live)
                width = min(S, -(-(max(book.pos[:live]) + k) // bucket) * bucket)
            drawn = [len(book.tokens[j]) if j >= 0 else 0 for j in book.owner[:rows]]  # uniforms used so far
            # three tensors, not views of one: a compiled step would guard on a view's offset and recompile
            tok, at, drawn = (torch.tensor(x, device=device) for x in (book.cur[:rows], book.pos[:rows], drawn))
            drew = []
            for _ in range(k):
                u = book.draws[:rows].gather(1, drawn[:, None]).squeeze(1)  # each row's next uniform
                tok, lp = sample(step(tok, at, width), u, temperature, top_p, top_k)
                drew.append((tok, lp))
                at, drawn = (at + 1).clamp_(max=S - 1), (drawn + 1).clamp_(max=longest - 1)
            toks, lps = (torch.stack(x, 1).tolist() for x in zip(*drew))  # [rows, k] each
            for i in range(k):
                book.record(range(rows), [t[i] for t in toks], [x[i] for x in lps])
        if book.bar is not None:
            book.bar.close()
    if stats is not None:
        stats.update(steps=step.steps, rows=step.rows, columns=step.columns, shapes=sorted(step.shapes))
    return book.results()


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
    sampler_logp FloatTensor [B, P' + R]: sampler_logp[b, t] is the sampler's log-prob of input_ids[b, t]
    (0 outside the response), the alignment of rlmt.logprobs.sequence_logprobs (named apart from the
    trainer's own `old_logp`, which it recomputes under its weights)."""
    batch = data.join([prompts[s["prompt_index"]] for s in samples], [s["tokens"] for s in samples], pad_id)
    P = batch["prompt_len"]
    logp = torch.zeros(batch["input_ids"].shape, dtype=torch.float32)
    for b, s in enumerate(samples):
        logp[b, P:P + len(s["tokens"])] = s["logprobs"]
    batch["sampler_logp"] = logp
    return batch
