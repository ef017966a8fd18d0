"""A from-scratch decoder for the Llama and Qwen2 families, and HF checkpoint load / save.

One trunk (embeddings, blocks of RMSNorm → attention → RMSNorm → SwiGLU MLP, final norm), and one of
two heads on top:
  - "lm":    `lm_head` [V, D] → next-token logits (the policy), tied to the embeddings when the config
             says so (Qwen2.5 small models);
  - "score": `score` [1, D] → one scalar per token: a reward model saved as …ForSequenceClassification
             reads it at the last valid token, a PPO critic uses every position as a value.
Parameter names are the HF names, so a state dict maps one to one to the safetensors files (rlmt.hub
finds, reads and writes them; the LM head's log-probs are rlmt.chunked's).

Attention comes in three layouts: plain causal (no padding, or right padding: a real token never sees the
padding after it, so no mask is needed and SDPA keeps its flash kernel); a bool mask (left-padded prompts,
the sampler's cache); and packed rows (`Segments`: several sequences end to end in one row, positions
restarting at each, no attention across them) — variable-length flash attention on a GPU, SDPA per
sequence elsewhere. No layout builds a dense [T, T] mask for packed rows.
"""

import inspect
import itertools
import math
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from rlmt import hub
from rlmt.chunked import token_logprobs

# architecture name in config.json -> (family, head)
ARCHITECTURES = {
    "LlamaForCausalLM": ("llama", "lm"), "MistralForCausalLM": ("llama", "lm"),
    "Qwen2ForCausalLM": ("qwen2", "lm"),
    "LlamaForSequenceClassification": ("llama", "score"),
    "MistralForSequenceClassification": ("llama", "score"),
    "Qwen2ForSequenceClassification": ("qwen2", "score"),
}
SUPPORTED_ROPE = ("default", "llama3", "linear")

try:  # variable-length flash attention (CUDA only; torch >= 2.10)
    from torch.nn.attention.varlen import varlen_attn as _varlen_attn
    _VARLEN_ARGS = inspect.signature(_varlen_attn).parameters
    # torch 2.10 took is_causal=True; later versions take a (left, right) window, (-1, 0) being causal
    _VARLEN_CAUSAL = {"window_size": (-1, 0)} if "window_size" in _VARLEN_ARGS else {"is_causal": True}
    _VARLEN_GQA = "enable_gqa" in _VARLEN_ARGS  # K/V heads shared by several query heads, read in place
except ImportError:
    _varlen_attn, _VARLEN_CAUSAL, _VARLEN_GQA = None, {}, False


@dataclass
class Config:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None  # {"rope_type": "llama3", "factor": …} or None
    attention_bias: bool        # Qwen2: q/k/v projections carry a bias
    tie_word_embeddings: bool
    head: str                   # "lm" or "score"

    @staticmethod
    def from_hf(cfg: dict, where="config.json"):
        """Read a transformers config dict; accepts 4.x (`rope_theta`, `rope_scaling`) and 5.x
        (`rope_parameters`) layouts."""
        arch = (cfg.get("architectures") or [None])[0]
        if arch not in ARCHITECTURES:
            raise ValueError(f"{where}: architecture {arch!r} (model_type {cfg.get('model_type')!r}) is not "
                             f"supported; rlmt runs {', '.join(ARCHITECTURES)}")
        family, head = ARCHITECTURES[arch]
        if head == "score" and cfg.get("num_labels", len(cfg.get("id2label") or {0: 0})) != 1:
            raise ValueError(f"{where}: a reward model must have one label (num_labels=1)")
        rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
        theta = rope.pop("rope_theta", None) or cfg.get("rope_theta", 10000.0)
        kind = rope.pop("rope_type", None) or rope.pop("type", None) or "default"
        rope.pop("type", None)
        if kind not in SUPPORTED_ROPE:
            raise ValueError(f"{where}: rope type {kind!r} is not supported ({', '.join(SUPPORTED_ROPE)})")
        if cfg.get("sliding_window") and cfg.get("use_sliding_window", family == "llama"):
            raise ValueError(f"{where}: sliding-window attention is not supported")
        heads = cfg["num_attention_heads"]
        return Config(
            vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"], num_layers=cfg["num_hidden_layers"],
            num_heads=heads, num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6), rope_theta=float(theta),
            rope_scaling=None if kind == "default" else {**rope, "rope_type": kind},
            attention_bias=family == "qwen2" or bool(cfg.get("attention_bias", False)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)), head=head)


@dataclass(frozen=True)
class Segments:
    """The sequences of a packed row: input_ids [1, n] holds S sequences end to end, n = sum(lengths);
    each attends causally to itself alone (its positions restart at 0: position_ids are the caller's).
    lengths: S host ints (the per-sequence path slices by them); cu_seqlens: int32 [S + 1] cumulative
    offsets on the model's device (what varlen_attn reads); max_len: the longest sequence."""
    lengths: tuple
    cu_seqlens: torch.Tensor
    max_len: int

    @staticmethod
    def of(lengths, device=None):
        """Segments of sequences with these lengths (positive ints), laid end to end in this order."""
        lengths = tuple(int(n) for n in lengths)
        if not lengths or min(lengths) < 1:
            raise ValueError(f"a packed row needs one or more non-empty sequences, got lengths {lengths}")
        cu = torch.tensor((0, *lengths), dtype=torch.int64).cumsum(0).to(torch.int32)
        return Segments(lengths, cu.to(device) if device is not None else cu, max(lengths))

    def spans(self):
        """[(start, end)] of each sequence along the row (host ints: no device read)."""
        ends = [0, *itertools.accumulate(self.lengths)]
        return list(zip(ends[:-1], ends[1:]))


def _use_varlen(x):
    """varlen_attn runs here: flash attention needs CUDA and a 16-bit dtype (fp32 takes the SDPA loop)."""
    return _varlen_attn is not None and x.is_cuda and x.dtype in (torch.float16, torch.bfloat16)


def rope_inv_freq(cfg: Config) -> torch.Tensor:
    """[head_dim/2] rotary frequencies θ^(-2i/d), rescaled for `llama3` (Llama 3.1's long-context
    scaling: low frequencies divided by `factor`, high ones kept, a smooth ramp between) or `linear`."""
    d = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    s = cfg.rope_scaling
    if s is None:
        return inv.float()
    if s["rope_type"] == "linear":
        return (inv / s["factor"]).float()
    factor, lo, hi = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > old / lo, inv / factor, inv)
    smooth = (old / wavelen - lo) / (hi - lo)
    ramp = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old / hi) & (wavelen <= old / lo)
    return torch.where(medium, ramp, scaled).float()


def apply_rope(x, cos, sin):
    """x [B, H, T, hd]; cos, sin [B, 1, T, hd]. Rotates the two halves of each head (HF's layout)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        h = x.float()  # the variance in fp32 even for bf16 weights, as the reference does
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: Config, layer_idx: int):
        super().__init__()
        D, H, K, hd = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(D, H * hd, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(D, K * hd, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(D, K * hd, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(H * hd, D, bias=False)
        self.H, self.K, self.hd, self.layer_idx = H, K, hd, layer_idx

    def forward(self, x, cos, sin, mask, cache=None, segments=None):
        """x [B, T, D]; mask bool [B, 1, T, S] (True = may attend) or None for plain causal;
        cache: an object with `update(layer_idx, k, v) -> (k_all, v_all)` (the sampler's KV cache);
        segments: a packed row (B = 1, Segments), causal within each sequence, nothing across them."""
        B, T, _ = x.shape
        if segments is not None and _use_varlen(x):
            return self._varlen(x, cos, sin, segments)
        q = self.q_proj(x).view(B, T, self.H, self.hd).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.K, self.hd).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.K, self.hd).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)
        if T == 1 and self.K != self.H and mask is not None:
            # Decoding one token: the H/K query heads sharing a KV head become H/K query rows against it,
            # so the cached K/V are read in place (expanding them copied the whole cache every step).
            y = F.scaled_dot_product_attention(q.reshape(B, self.K, self.H // self.K, self.hd), k, v,
                                               attn_mask=mask)
            return self.o_proj(y.reshape(B, T, self.H * self.hd))
        if self.K != self.H:  # GQA: expanding K/V keeps every SDPA backend (and masks) available
            k = k.repeat_interleave(self.H // self.K, dim=1)
            v = v.repeat_interleave(self.H // self.K, dim=1)
        if segments is not None:
            # Packed on the CPU (or in fp32): one causal SDPA per sequence, exact, O(sum L^2) work and no
            # [T, T] mask (FlexAttention has no CPU backward). o_proj per sequence reads each output as a
            # view, as it does one SDPA's over the row; joining the outputs first would keep a copy.
            return torch.cat([self.o_proj(F.scaled_dot_product_attention(
                q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], is_causal=True).transpose(1, 2).reshape(B, b - a, -1))
                for a, b in segments.spans()], dim=1)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.H * self.hd))

    def _varlen(self, x, cos, sin, seg):
        """The packed row through varlen_attn: x [1, n, D] -> [1, n, D]. Tokens are laid out [n, heads, hd]
        (varlen's layout, the projections' own: no transpose, no copy); GQA's K/V are read in place where
        this torch's varlen_attn takes enable_gqa. Untested on a GPU in this repository's CI (CPU only):
        tests/test_model.py runs this code with a stand-in for the kernel, on the CPU."""
        n = x.shape[1]
        q = self.q_proj(x).view(n, self.H, self.hd)
        k = self.k_proj(x).view(n, self.K, self.hd)
        v = self.v_proj(x).view(n, self.K, self.hd)
        c, s = cos[0].transpose(0, 1), sin[0].transpose(0, 1)  # [1, n, hd] -> [n, 1, hd]
        q, k = apply_rope(q, c, s), apply_rope(k, c, s)
        gqa = {}
        if self.K != self.H:
            if _VARLEN_GQA:
                gqa = {"enable_gqa": True}
            else:
                k = k.repeat_interleave(self.H // self.K, dim=1)
                v = v.repeat_interleave(self.H // self.K, dim=1)
        y = _varlen_attn(q, k, v, seg.cu_seqlens, seg.cu_seqlens, seg.max_len, seg.max_len, **_VARLEN_CAUSAL, **gqa)
        return self.o_proj(y.reshape(1, n, self.H * self.hd))


class MLP(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: Config, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask, cache=None, segments=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, segments)
        return x + self.mlp(self.post_attention_layernorm(x))


class Trunk(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


def right_padded(attention_mask):
    """True when every row of attention_mask [B, T] is its tokens then padding (or no padding): plain causal
    attention then never lets a real token see a pad (they all come after it), so no mask is needed. A pad
    query attends to the tokens before it: finite, and never read (every loss masks it)."""
    am = attention_mask.bool()
    return bool(am[:, 0].all() & (am[:, :-1] >= am[:, 1:]).all())


def attention_mask_4d(attention_mask):
    """[B, T] padding mask (1 = token) -> bool [B, 1, T, T]: causal, no attention to padding. A padded
    query position may attend to itself, so no row of the softmax is empty (that would give NaN)."""
    T = attention_mask.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=attention_mask.device).tril()
    m = causal[None] & attention_mask.bool()[:, None, :]
    m = m | torch.eye(T, dtype=torch.bool, device=attention_mask.device)[None]
    return m[:, None]


class Transformer(nn.Module):
    def __init__(self, cfg: Config, hf_config: dict | None = None):
        super().__init__()
        self.config, self.hf_config = cfg, dict(hf_config or {})
        self.model = Trunk(cfg)
        if cfg.head == "lm":
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
            if cfg.tie_word_embeddings:
                self.lm_head.weight = self.model.embed_tokens.weight
        else:
            self.score = nn.Linear(cfg.hidden_size, 1, bias=False)
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)
        self.gradient_checkpointing = False  # recompute each block in backward (long CoT training)

    def forward(self, input_ids, attention_mask=None, position_ids=None, *, cache=None, attn_mask=None,
                last_only=False, targets=None, temperature=1.0, with_entropy=False, logits_from=0,
                segments=None, logits_at=None):
        """input_ids [B, T]; attention_mask [B, T] (1 = token, left or right padding); position_ids [B, T]
        (default cumsum(attention_mask) - 1, so left-padded rows start at 0).
        cache / attn_mask: the sampler's KV cache and its bool [B, 1, T, S] mask.
        segments: a packed row (Segments; input_ids and position_ids [1, n], no attention_mask): the
        sequences end to end, each attending to itself alone (rlmt.logprobs.packed_logprobs).

        Returns, for the LM head: logits [B, T, V] (or [B, 1, V] with last_only); with `targets` [B, T]
        the chunked fp32 log-probs (chunked.token_logprobs) of those targets at `temperature`:
        (logp [B, T], entropy [B, T] or None) — computed here so FSDP's hooks see the lm_head use.
        logits_from: with `targets`, the trunk runs over all T tokens but the LM head only over positions
        ≥ logits_from; the ones before are returned as 0 (an RL loss never reads the prompt's log-probs,
        and the head + softmax over V cost more than the trunk on small models).
        logits_at: with `targets` [B, k], the head runs only at these k positions (LongTensor [k] along the
        row, B = 1: a packed row's loss tokens) -> (logp [1, k], entropy [1, k] or None).
        For the score head: one scalar per token [B, T]."""
        B, T = input_ids.shape
        if segments is not None and (B != 1 or attention_mask is not None or position_ids is None):
            raise ValueError("a packed row (segments) is one row [1, n] with its position_ids and no attention_mask")
        if position_ids is None:
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0) if attention_mask is not None \
                else torch.arange(T, device=input_ids.device).expand(B, T)
        mask = attn_mask
        if mask is None and attention_mask is not None and not right_padded(attention_mask):
            mask = attention_mask_4d(attention_mask)
        freqs = position_ids[:, None, :].float() * self.inv_freq.float()[None, :, None]  # [B, hd/2, T]
        emb = torch.cat((freqs, freqs), dim=1).transpose(1, 2)[:, None]                 # [B, 1, T, hd]
        x = self.model.embed_tokens(input_ids)
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        for layer in self.model.layers:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, mask, cache, segments, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, cache, segments)
        h = self.model.norm(x)
        if self.config.head == "score":
            return F.linear(h, self.score.weight[0])  # [B, T]; not a view, which FSDP2 warns about
        if last_only:
            h = h[:, -1:]
        if targets is not None and logits_at is not None:
            logp, ent = token_logprobs(h[:, logits_at], self.lm_head.weight, targets, temperature, with_entropy)
            return logp.clone(), ent.clone() if ent is not None else None  # not views (FSDP2 warns about those)
        if targets is not None:
            logp, ent = token_logprobs(h[:, logits_from:], self.lm_head.weight, targets[:, logits_from:],
                                       temperature, with_entropy)
            # back to [B, T], zeros first, so every caller keeps one alignment; also when logits_from is 0:
            # a fresh tensor, since FSDP2 warns about a view returned from a forward (token_logprobs's are)
            pad = logp.new_zeros(B, logits_from)
            return torch.cat([pad, logp], dim=1), torch.cat([pad, ent], dim=1) if ent is not None else None
        return self.lm_head(h)

    def init_new_weights(self, std=None):
        """Initialize a head that the checkpoint did not hold (a critic's value head)."""
        if self.config.head == "score":
            nn.init.normal_(self.score.weight, std=std or 1.0 / (self.config.hidden_size + 1))


# --- loading -------------------------------------------------------------------------------------------

def from_pretrained(path_or_alias, dtype=None, device=None, head=None):
    """Load a Llama / Qwen2 checkpoint (config.json + safetensors) into rlmt's Transformer.

    dtype: torch dtype or None (keep the checkpoint's); device: where the weights go (loaded to CPU
    first, built on the meta device so memory holds one copy). head: force "lm" or "score"; a "score"
    model built from a causal LM (a PPO critic initialized from the policy) gets a fresh value head."""
    folder = hub.resolve_path(path_or_alias)
    hf = hub.read_config(folder)
    cfg = Config.from_hf(hf, os.path.join(folder, "config.json"))
    if head is not None and head != cfg.head:
        cfg.head, cfg.tie_word_embeddings = head, cfg.tie_word_embeddings and head == "lm"
    with torch.device("meta"):
        wanted = dict(Transformer(cfg, hf).named_parameters())  # tied: one entry, model.embed_tokens.weight
    state = {}
    for name, t in hub.read_weights(folder):
        if name in wanted:
            state[name] = t.to(dtype) if dtype is not None else t
    missing = [n for n in wanted if n not in state]
    if missing and missing != ["score.weight"]:
        raise ValueError(f"{folder}: checkpoint lacks {len(missing)} weights, e.g. {missing[:3]}")
    model = assemble(cfg, hf, state)
    if missing:
        any_w = next(iter(state.values()))
        model.score.weight = nn.Parameter(torch.empty(1, cfg.hidden_size, dtype=any_w.dtype))
        model.init_new_weights()
    return model.to(device).eval() if device is not None else model.eval()


def assemble(cfg: Config, hf_config: dict, state: dict, device=None):
    """A Transformer whose parameters are the tensors of `state` (HF names, no copy), built on the meta
    device so memory holds one copy; tied embeddings stay tied. A missing `score.weight` is left on meta
    for the caller to create (a fresh value head)."""
    with torch.device("meta"):
        model = Transformer(cfg, hf_config)
    model.load_state_dict(state, strict=False, assign=True)
    if cfg.head == "lm" and cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight  # assign=True replaced the shared Parameter
    model.inv_freq = rope_inv_freq(cfg) if device is None else rope_inv_freq(cfg).to(device)
    return model


def checkpoint_dtype(model):
    """The dtype the model's checkpoint was saved in (config.json's `dtype`, or 4.x's `torch_dtype`):
    bf16 for the paper's models; fp32 when the config names none."""
    name = model.hf_config.get("dtype") or model.hf_config.get("torch_dtype") or "float32"
    return getattr(torch, name) if isinstance(name, str) else name


# --- saving --------------------------------------------------------------------------------------------

def save_pretrained(model, out_dir, tokenizer=None, state_dict=None, max_shard_bytes=4 << 30):
    """Write a folder that transformers' Auto…from_pretrained loads: config.json and safetensors
    (sharded with an index above `max_shard_bytes`), plus the tokenizer. Written to a temporary folder
    and renamed, so a crash never leaves a half-written checkpoint. `state_dict`: the full weights when
    the model is sharded (rlmt.dist gathers them); by default the model's own."""
    cfg = model.config
    state = state_dict if state_dict is not None else model.state_dict()
    if cfg.head == "lm" and cfg.tie_word_embeddings:
        state = {k: v for k, v in state.items() if k != "lm_head.weight"}
    state = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    family = "Qwen2" if model.hf_config.get("model_type") == "qwen2" else "Llama"
    hf = dict(model.hf_config)
    hf["architectures"] = [family + ("ForCausalLM" if cfg.head == "lm" else "ForSequenceClassification")]
    hf["tie_word_embeddings"] = cfg.tie_word_embeddings
    hf["dtype"] = str(next(iter(state.values())).dtype).removeprefix("torch.")
    hf.pop("torch_dtype", None)
    if cfg.head == "score":
        hf["num_labels"], hf["id2label"], hf["label2id"] = 1, {"0": "LABEL_0"}, {"LABEL_0": 0}
    return hub.write_folder(out_dir, hf, state, tokenizer, max_shard_bytes)
