"""What each GPU holds in each phase of a run, planned from the model configs before any weights load.

    p = memory.plan(policy=memory.shapes(config), world=8, card=80 * memory.GiB, reference=..., sampling=...)
    print(memory.format_plan(p)); memory.problems(p)     # [] when every phase fits, else what to change

The trainers build it from their flags (rlmt.preflight.memory_check): `--plan` prints it and exits, and a GPU
run checks it at start-up, before any weights load.

Every term is the size of a tensor the code allocates, with the shapes of the real models: parameter
counts come from the decoder built on the meta device (no weights, no memory), FSDP2 shards each
parameter on dim 0 (padded to a multiple of the world size), and the activation terms count what autograd
saves in rlmt/model.py's block (tests/test_memory.py measures them on the CPU with torch's MemTracker:
within 1%). c is the compute dtype's size (2 for bf16), n the tokens of one forward.

    saved by one block, per token (model.py's Block in training, flash/mem-efficient attention):
      two RMSNorms          2 · ((4 + 2c) · D + 4)   the fp32 upcast, 1/rms, the normalized copy, the output
      attention             4 · c · H·hd + 4 · H      q, repeated k and v, the output (o_proj reads it as a
                                                    view); SDPA's fp32 log-sum-exp. RoPE keeps nothing
      MLP                   4 · c · F                gate, silu(gate), up, their product
    The whole forward adds the final norm, (4 + 2c) · D + 4, the token ids (8) and cos/sin (2 · c · hd).
    With activation checkpointing each block keeps only its input (c · D) and one block is recomputed in
    the backward. A padded batch (a [B, 1, T, T] bool mask) adds the additive bias SDPA makes of it,
    c · B · T² per block that holds it (every block, or the recomputed one and the bool mask under
    checkpointing). The trainers run packed micro-batches (rlmt.batching: --micro-batch-tokens tokens
    end to end in one row, variable-length attention, no mask): n = the token budget, no T² term.

What the planner does not see: the CUDA context and NCCL's buffers (~1–3 GiB, outside torch's
allocator) and fragmentation. --gpu-memory-utilization (0.9, vLLM's default) leaves that share of the
card out of the budget, and the KV cache is sized to fill the budget at run time (kv_slots).
"""

import json
import math
import os
from dataclasses import dataclass, field

import torch

GiB = 1 << 30
LOGPROB_CHUNK = 1024  # rlmt.chunked.token_logprobs's chunk_size


@dataclass
class Shapes:
    """A decoder's sizes, read from the module built on the meta device."""
    cfg: object           # rlmt.model.Config
    params: int           # all parameters (tied: once)
    root: int             # outside the blocks: embeddings, final norm, head (FSDP2's root unit)
    block: int            # one block's
    param_shapes: list    # every parameter's shape

    def per_rank(self, world):
        """Parameters one rank holds under FSDP2: each sharded on dim 0, padded to a multiple of world."""
        return sum(math.ceil(s[0] / world) * math.prod(s[1:]) for s in self.param_shapes)


def shapes(hf_config, head=None):
    """Shapes of the model a config.json dict describes (head: "lm" / "score" to force one, as
    from_pretrained's head=...) -> Shapes. Built on the meta device: an 8B takes no memory."""
    from rlmt.model import Config, Transformer
    cfg = Config.from_hf(hf_config)
    if head is not None and head != cfg.head:
        cfg.head, cfg.tie_word_embeddings = head, cfg.tie_word_embeddings and head == "lm"
    with torch.device("meta"):
        m = Transformer(cfg, hf_config)
    params = dict(m.named_parameters())  # tied: one entry
    in_block = {n for n in params if n.startswith("model.layers.")}
    return Shapes(cfg, sum(p.numel() for p in params.values()),
                  sum(p.numel() for n, p in params.items() if n not in in_block),
                  sum(p.numel() for p in m.model.layers[0].parameters()), [tuple(p.shape) for p in params.values()])


def read_config(path_or_alias):
    """config.json of a model folder or alias, as a dict (no weights are read)."""
    from rlmt.hub import resolve_path
    folder = resolve_path(path_or_alias)
    path = os.path.join(folder, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path_or_alias!r}: no config.json in {folder}")
    with open(path) as f:
        return json.load(f)


# --- per-token and per-tensor sizes -------------------------------------------------------------------

def block_activation_bytes(cfg, c):
    """Bytes one block saves for backward per token (the table in the module docstring)."""
    D, F, H, hd = cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.head_dim
    return 2 * ((4 + 2 * c) * D + 4) + 4 * c * H * hd + 4 * H + 4 * c * F


def kv_bytes_per_token(cfg, c):
    """Keys and values of one token in every layer (the sampler's KVCache)."""
    return 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * c


def forward_workspace_bytes(cfg, n, c):
    """Peak of a no-grad forward over n tokens beyond its input: inside one MLP, gate, up and silu(gate)
    [n, F] live with the residual stream and the block's input [n, D] (attention reads O(n) more)."""
    return n * c * (3 * cfg.intermediate_size + 3 * cfg.hidden_size)


def sampling_reserve(cfg, c, prompt_tokens, slots, new_tokens):
    """What a rollout needs besides the weights and the KV cache: one prefill forward over at most
    sampler.PREFILL_TOKENS prompt tokens (their keys and values wait in a PromptKV until copied into
    slots) and a decode step's fp32 logits (the step's and the CUDA graphs' shared output), sampling
    buffers and draws [slots, new_tokens]."""
    from rlmt.sampler import PREFILL_TOKENS
    n = min(PREFILL_TOKENS, prompt_tokens)
    prefill = kv_bytes_per_token(cfg, c) * n + forward_workspace_bytes(cfg, n, c)
    return prefill + 7 * 4 * cfg.vocab_size * slots + 4 * slots * new_tokens


def logprob_bytes(cfg, n):
    """token_logprobs over n tokens: two fp32 [chunk, V] buffers in the forward, three in its backward."""
    return 3 * min(LOGPROB_CHUNK, n) * cfg.vocab_size * 4


def training_activations(cfg, rows, T, c, checkpointing, padded):
    """Bytes of one micro-batch (rows × T tokens) through forward and backward, beyond the weights ->
    {"activations saved for backward": …, "backward of one block": …, "log-prob chunks": …}."""
    n, L, D = rows * T, cfg.num_layers, cfg.hidden_size
    block = block_activation_bytes(cfg, c) * n
    bias = rows * T * T * c if padded else 0           # per block that holds the mask
    outside = ((4 + 2 * c) * D + 4 + 8 + 2 * c * cfg.head_dim) * n  # final norm, ids, cos/sin
    grads = 2 * c * (cfg.intermediate_size + D) * n    # a block's activation gradients in its backward
    if checkpointing:
        saved = L * c * D * n + outside + (rows * T * T if padded else 0)  # block inputs, the bool mask
        backward = block + bias + grads                                  # one block recomputed
    else:
        saved = L * (block + bias) + outside
        backward = grads
    return {"activations saved for backward": saved, "backward of one block": backward,
            "log-prob chunks (fp32)": logprob_bytes(cfg, n) if cfg.head == "lm" else 0}


# --- the plan -----------------------------------------------------------------------------------------

@dataclass
class Plan:
    """phases: {phase: {item: bytes per GPU}}; budget: bytes a GPU may fill; slots: KV-cache slots that
    fit (None without sampling); fixes: {phase: flags that shrink it}."""
    world: int
    card: int
    budget: int
    utilization: float
    models: list
    phases: dict = field(default_factory=dict)
    slots: int | None = None
    slots_wanted: int | None = None
    fixes: dict = field(default_factory=dict)

    def peak(self, phase):
        return sum(self.phases[phase].values())


def _trained(name, s, world):
    """A trained model's FSDP2 state on one rank: fp32 masters, fp32 gradients, two fp32 AdamW moments."""
    k = s.per_rank(world)
    return {f"{name} fp32 masters (sharded)": 4 * k, f"{name} fp32 gradients (sharded)": 4 * k,
            f"{name} AdamW moments fp32 (sharded)": 8 * k}


def _frozen(name, s, world, c):
    return {f"{name} (sharded)" if world > 1 else name: c * (s.per_rank(world) if world > 1 else s.params)}


def plan(*, policy, world, card, utilization=0.9, c=2, reference=None, critic=None, reward_model=None,
         sampling=None, scoring=None, training=None):
    """Bytes per GPU in each phase of a run.

    policy / reference / critic / reward_model: Shapes (or None). The policy and critic are trained
    (fp32 masters, gradients and AdamW moments, sharded); the reference and reward model are frozen in
    the compute dtype, sharded when world > 1. card: a GPU's bytes; the budget is `utilization` of it.
    sampling: dict(samples, slots, prompt_len, new_tokens, prompts): each rank decodes `samples` rows of
      at most prompt_len + new_tokens tokens in up to `slots` slots from a plain copy of the policy.
    scoring: dict(batch, length): reward-model forwards of batch × length tokens.
    training: dict(tokens, checkpointing): one packed micro-batch's forward/backward over `tokens` tokens;
      with a critic (PPO) both models' activations live until their joint backward.
    """
    budget = int(card * utilization)
    p = Plan(world, card, budget, utilization,
             [(n, s) for n, s in (("policy", policy), ("reference", reference), ("critic", critic),
                                  ("reward model", reward_model)) if s is not None])
    state = _trained("policy", policy, world)
    if critic is not None:
        state.update(_trained("critic", critic, world))
    frozen = {}
    if reference is not None:
        frozen.update(_frozen("reference bf16" if c == 2 else "reference", reference, world, c))
    if reward_model is not None:
        frozen.update(_frozen("reward model bf16" if c == 2 else "reward model", reward_model, world, c))
    between = {k: v for k, v in state.items() if "gradients" not in k}  # gradients are freed after a step

    if sampling is not None:
        cfg = policy.cfg
        S = sampling["prompt_len"] + sampling["new_tokens"]
        per_slot = kv_bytes_per_token(cfg, c) * S
        work = {"rollout copy of the policy (full)": c * policy.params,
                "prefill and decode work": sampling_reserve(cfg, c, sampling["prompts"] * sampling["prompt_len"],
                                                            sampling["slots"], sampling["new_tokens"])}
        held = sum(between.values()) + sum(frozen.values()) + sum(work.values())
        wanted = min(sampling["slots"], sampling["samples"])
        p.slots, p.slots_wanted = max(0, min(wanted, (budget - held) // per_slot)), wanted
        p.phases["sampling"] = {**between, **frozen, **work,
                                f"KV cache ({max(p.slots, 1)} slots x {S} tokens)": per_slot * max(p.slots, 1)}
        p.fixes["sampling"] = "--max-new-tokens, --max-prompt-len, --sample-batch-size, or more GPUs"
    if scoring is not None and reward_model is not None:
        cfg, n = reward_model.cfg, scoring["batch"] * scoring["length"]
        gathered = {"reward model: root + 2 blocks unsharded": c * (reward_model.root + 2 * reward_model.block)}
        p.phases["scoring"] = {**between, **frozen, **(gathered if world > 1 else {}),
                               "reward model forward": c * cfg.hidden_size * n + forward_workspace_bytes(cfg, n, c)}
        p.fixes["scoring"] = "the reward model's batch (rlmt.reward.RewardModel batch_size) or more GPUs"
    if training is not None:
        n, ckpt = training["tokens"], training["checkpointing"]
        models = [("policy", policy)] + ([("critic", critic)] if critic is not None else [])
        held, passing = {}, {}
        for name, s in models:  # PPO: one backward of actor + critic loss, so both graphs are alive together
            act = training_activations(s.cfg, 1, n, c, ckpt, padded=False)
            lead = "" if name == "policy" else "critic: "
            held.update({f"{lead}unsharded weights: root + 2 blocks": c * (s.root + 2 * s.block),
                         f"{lead}root gradients, unsharded (+ fp32 for reduce)": s.root * (c + (4 if c != 4 else 0)),
                         f"{lead}activations saved for backward": act.pop("activations saved for backward")})
            for k, v in act.items():  # transient: one model's backward at a time
                passing[k] = max(passing.get(k, 0), v)
        p.phases["training"] = {**state, **frozen, **held, **passing}
        flags = "--micro-batch-tokens" + (", --activation-checkpointing on" if not ckpt else "")
        p.fixes["training"] = f"{flags}, --max-new-tokens / --max-len, or more GPUs"
    return p


def problems(p):
    """The phases that do not fit, each with what to change -> list of strings (empty: it fits)."""
    out = []
    for phase in p.phases:
        over = p.peak(phase) - p.budget
        if phase == "sampling" and p.slots < 1:
            out.append(f"sampling: not even one KV-cache slot fits ({_gib(p.peak(phase))} GiB with one, budget "
                       f"{_gib(p.budget)} GiB); change {p.fixes[phase]}")
        elif over > 0:
            out.append(f"{phase}: {_gib(p.peak(phase))} GiB per GPU, budget {_gib(p.budget)} GiB "
                       f"({_gib(over)} GiB over); change {p.fixes[phase]}")
    return out


def _gib(b):
    return f"{b / GiB:.2f}"


def format_plan(p, title="memory plan"):
    """The plan as a table: one row per item, one column per phase, GiB per GPU."""
    phases = list(p.phases)
    items = list(dict.fromkeys(k for ph in phases for k in p.phases[ph]))
    w = max(len(k) for k in items + ["peak per GPU"]) + 2
    lines = [f"{title}: {p.world} GPU(s) of {p.card / GiB:.1f} GiB, budget {_gib(p.budget)} GiB each "
             f"(--gpu-memory-utilization {p.utilization})",
             "models: " + ", ".join(f"{n} {s.params / 1e9:.2f}B params" for n, s in p.models),
             "GiB per GPU".ljust(w) + "".join(f"{ph:>11}" for ph in phases)]
    for k in items:
        lines.append(k.ljust(w) + "".join(f"{p.phases[ph][k] / GiB:>11.2f}" if k in p.phases[ph] else f"{'-':>11}"
                                          for ph in phases))
    lines.append("peak per GPU".ljust(w) + "".join(f"{p.peak(ph) / GiB:>11.2f}" for ph in phases))
    if p.slots:
        lines.append(f"KV cache: {p.slots} of {p.slots_wanted} slots fit"
                     + ("" if p.slots >= p.slots_wanted else " (rows wait for a free slot: slower, not wrong)"))
    bad = problems(p)
    lines += [f"does not fit: {x}" for x in bad] or ["fits"]
    return "\n".join(lines)


# --- at run time --------------------------------------------------------------------------------------

def kv_slots(model, length, cap, utilization=0.9, reserve=0):
    """KV-cache slots of `length` tokens that fit in what this GPU has left, at most `cap` (like vLLM's
    gpu_memory_utilization: the run may fill that share of the card). `reserve`: bytes the rollout
    still needs besides the cache (prefill, logits). On the CPU: `cap`.

    Free = what the driver has free + what torch's allocator holds but does not use; the caller has
    released the previous phase's tensors (training's activations, the last rollout's cache)."""
    device = model.inv_freq.device
    if device.type != "cuda":
        return cap
    free, total = torch.cuda.mem_get_info(device)
    free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    room = free - (1 - utilization) * total - reserve
    per_slot = kv_bytes_per_token(model.config, model.model.embed_tokens.weight.element_size()) * length
    return max(1, min(cap, int(room // per_slot)))
