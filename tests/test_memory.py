"""The memory plan (rlmt.memory, --plan): the paper's 8B run on 8×80 GB from the real configs, what is
refused and what it says, and the plan's terms against what a tiny model actually allocates on the CPU
(torch's MemTracker counts every live tensor, by kind)."""

import argparse
import json
import types

import pytest
import torch
from torch.distributed._tools.mem_tracker import MemTracker

from conftest import run_script
from rlmt import cli, decode, dist, memory, preflight
from rlmt.logprobs import sequence_logprobs
from rlmt.model import Config, Transformer

# config.json of meta-llama/Llama-3.1-8B-Instruct and Skywork/Skywork-Reward-Llama-3.1-8B-v0.2 (the fields
# a loader reads; no weights)
LLAMA_8B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
            "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
            "vocab_size": 128256, "rms_norm_eps": 1e-05, "rope_theta": 500000.0, "max_position_embeddings": 131072,
            "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                             "original_max_position_embeddings": 8192, "rope_type": "llama3"},
            "attention_bias": False, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
            "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009]}
SKYWORK_8B = {**LLAMA_8B, "architectures": ["LlamaForSequenceClassification"], "num_labels": 1,
              "eos_token_id": 128009}
TINY = {"architectures": ["LlamaForCausalLM"], "hidden_size": 128, "intermediate_size": 384, "num_hidden_layers": 3,
        "num_attention_heads": 8, "num_key_value_heads": 2, "vocab_size": 512, "rms_norm_eps": 1e-5,
        "rope_theta": 1e4, "tie_word_embeddings": False}


@pytest.fixture(scope="module")
def configs(tmp_path_factory):
    root = tmp_path_factory.mktemp("configs")
    out = {}
    for name, cfg in (("llama", LLAMA_8B), ("skywork", SKYWORK_8B)):
        (root / name).mkdir()
        (root / name / "config.json").write_text(json.dumps(cfg))
        out[name] = str(root / name)
    return out


def headline(configs, *extra):
    """The README's headline command with --plan, for 8 GPUs of --gpu-memory-gb."""
    return ["--model", configs["llama"], "--template", "think", "--strict", "--reward-model", configs["skywork"],
            "--data", "prompts.jsonl", "--lr", "3e-7", "--plan", "--world-size", "8", *extra]


def test_headline_command_fits_8_h100(configs):
    r = run_script("train_grpo.py", *headline(configs, "--gpu-memory-gb", "80"))
    out = r.stdout
    assert "activation checkpointing on, micro-batches of 32,768 tokens" in out and "fits" in out.splitlines()[-1], out
    assert "does not fit" not in out
    # the paper's shapes: 8.03B policy and reference, a 7.50B reward model; 16 bytes a trained parameter
    assert "policy 8.03B params" in out and "reward model 7.50B params" in out
    assert "KV cache: 64 of 64 slots fit" in out, out  # 8 prompts × 8 samples a rank, all decoded at once


def test_headline_numbers(configs):
    """The plan's big terms, by hand: Llama-3.1-8B has 8,030,261,248 parameters."""
    policy = memory.shapes(LLAMA_8B)
    assert policy.params == 8_030_261_248
    p = memory.plan(policy=policy, world=8, card=80 * memory.GiB, reference=policy,
                    reward_model=memory.shapes(SKYWORK_8B),
                    sampling=dict(samples=64, slots=64, prompts=8, prompt_len=1024, new_tokens=4096),
                    scoring=dict(batch=8, length=5120),
                    training=dict(tokens=4 * 5120, checkpointing=True))
    s, t = p.phases["sampling"], p.phases["training"]
    assert s["policy fp32 masters (sharded)"] == 4 * policy.per_rank(8) == pytest.approx(4 * 8.03e9 / 8, rel=1e-3)
    assert s["policy AdamW moments fp32 (sharded)"] == 8 * policy.per_rank(8)
    assert "policy fp32 gradients (sharded)" not in s  # freed by zero_grad(set_to_none) after every step
    assert s["rollout copy of the policy (full)"] == 2 * 8_030_261_248
    # KV: 2 (k, v) × 32 layers × 8 heads × 128 × 2 bytes = 128 KiB a token; 5,120 tokens a slot
    assert s["KV cache (64 slots x 5120 tokens)"] == 64 * 5120 * 2 * 32 * 8 * 128 * 2 == 40 * memory.GiB
    # with checkpointing each of the 32 blocks keeps its bf16 input, 4 × 5,120 tokens × 4,096 × 2 bytes
    assert t["activations saved for backward"] > 32 * 4 * 5120 * 4096 * 2
    no_ckpt = memory.training_activations(policy.cfg, 4, 5120, 2, False, True)["activations saved for backward"]
    assert no_ckpt / memory.GiB > 130  # why checkpointing is on by default at RLMT's lengths
    assert max(p.peak(ph) for ph in p.phases) < p.budget


def test_24gb_cards_are_refused_with_what_to_change(configs):
    r = run_script("train_grpo.py", *headline(configs, "--gpu-memory-gb", "24"))
    out = r.stdout
    assert "does not fit: sampling" in out and "does not fit: training" in out, out
    assert "it would fit with" in out and "GPUs of this size" in out, out  # a concrete way out
    # without --plan, a real run stops before loading anything, with the same message (a GPU is faked)
    args = _grpo_args(configs, gpu_memory_gb=24.0, plan=False)
    with pytest.raises(SystemExit) as e, _fake_gpu():
        preflight.memory_check(args, argparse.ArgumentParser(), "grpo")
    assert "does not fit its GPUs" in str(e.value) and "--micro-batch-tokens" in str(e.value)


def test_auto_checkpointing_follows_the_plan(configs):
    """auto: on for RLMT's 5,120 tokens, off for short sequences that fit without it; --plan for every script."""
    with _fake_gpu():
        # decided at 4 of the longest sequences (4 x 5,120 tokens need it), then the most tokens that fit
        rlmt = _grpo_args(configs, gpu_memory_gb=80.0, plan=False)
        assert preflight.memory_check(rlmt, None, "grpo") is True and rlmt.micro_batch_tokens == cli.MAX_MICRO_BATCH_TOKENS
        short = _grpo_args(configs, gpu_memory_gb=80.0, plan=False, max_prompt_len=128, max_new_tokens=128)
        assert preflight.memory_check(short, None, "grpo") is False  # 4 x 256 tokens fit without it
        assert 4 * 256 < short.micro_batch_tokens < cli.MAX_MICRO_BATCH_TOKENS and short.micro_batch_tokens % 1024 == 0
        # off: the auto budget shrinks to what fits without it (still a whole 5,120-token sequence) ...
        off = _grpo_args(configs, gpu_memory_gb=80.0, plan=False, activation_checkpointing="off")
        assert preflight.memory_check(off, None, "grpo") is False and 5120 <= off.micro_batch_tokens < 4 * 5120
        # ... a budget given that cannot fit without it is refused, saying what to change
        off = _grpo_args(configs, gpu_memory_gb=80.0, plan=False, activation_checkpointing="off",
                         micro_batch_tokens=4 * 5120)
        with pytest.raises(SystemExit) as e:
            preflight.memory_check(off, None, "grpo")
        assert "--activation-checkpointing on" in str(e.value) and "--micro-batch-tokens" in str(e.value)
    for script, rm in (("train_ppo.py", True), ("train_sft.py", False), ("train_dpo.py", True)):
        r = run_script(script, "--model", configs["llama"], *(["--reward-model", configs["skywork"]] if rm else []),
                       "--plan", "--world-size", "8", "--gpu-memory-gb", "80")
        assert "memory plan for" in r.stdout and r.stdout.strip().endswith("fits"), (script, r.stdout)


def test_plan_bad_flags(configs):
    r = run_script("train_grpo.py", *headline(configs, "--gpu-memory-utilization", "1.5"), check=False)
    assert r.returncode != 0 and "--gpu-memory-utilization must be in (0, 1]" in r.stderr
    r = run_script("train_grpo.py", *headline(configs, "--gpu-memory-gb", "-3"), check=False)
    assert r.returncode != 0 and "--gpu-memory-gb: must be positive" in r.stderr
    r = run_script("train_grpo.py", "--plan", check=False)
    assert r.returncode != 0 and "--model is required" in r.stderr
    r = run_script("train_grpo.py", "--plan", "--model", "/no/such/model", check=False)
    assert r.returncode != 0 and "no such folder" in r.stderr


# --- the plan's terms against what the code allocates --------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("padded", [False, True])
def test_activations_match_what_autograd_keeps(dtype, checkpointing, padded):
    """MemTracker's activation bytes after one training forward (log-probs and entropy, as GRPO trains)
    == the plan's "activations saved for backward" within 2% (measured 0.6%); the peak through the
    backward stays under the plan's training terms."""
    cfg = Config.from_hf(TINY)
    torch.manual_seed(0)
    model = Transformer(cfg, TINY).to(dtype).train()
    model.gradient_checkpointing = checkpointing
    B, T = 2, 256
    ids = torch.randint(0, cfg.vocab_size, (B, T))
    am = torch.ones(B, T, dtype=torch.long)
    if padded:
        am[0, :40] = 0  # a left-padded prompt, as in a rollout batch
    tracker = MemTracker()
    tracker.track_external(model)
    with tracker:
        logp, ent = sequence_logprobs(model, ids, am if padded else None, None, 0.7, with_entropy=True)
        kept = _bytes(tracker.get_tracker_snapshot("current"), "Activation")
        (logp.sum() + ent.sum()).backward()
        peak = tracker.get_tracker_snapshot("peak")
    plan = memory.training_activations(cfg, B, T, dtype.itemsize, checkpointing, padded)
    assert kept == pytest.approx(plan["activations saved for backward"], rel=0.02)
    work = _bytes(peak, "Activation") + _bytes(peak, "Temp")
    assert work <= sum(plan.values())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_packed_activations_match_what_autograd_keeps(dtype, checkpointing):
    """A packed micro-batch (the trainers' unit: sequences end to end in one row, SDPA per sequence on the
    CPU) keeps what the plan counts for its tokens, within 2%, with no T² term; the peak through the
    backward stays under the plan's training terms."""
    from rlmt import data
    from rlmt.logprobs import packed_logprobs
    cfg = Config.from_hf(TINY)
    torch.manual_seed(0)
    model = Transformer(cfg, TINY).to(dtype).train()
    model.gradient_checkpointing = checkpointing
    lengths = [(130, 60), (20, 200), (90, 12)]  # prompt, response: 512 tokens
    b = data.join([[1] * p for p, _ in lengths], [[2] * r for _, r in lengths], 0)
    mask = torch.ones_like(b["response_mask"])  # the head everywhere, as the plan assumes
    tracker = MemTracker()
    tracker.track_external(model)
    with tracker:
        logp, ent = packed_logprobs(model, b, mask, 0.7, with_entropy=True)
        kept = _bytes(tracker.get_tracker_snapshot("current"), "Activation")
        (logp.sum() + ent.sum()).backward()
        peak = tracker.get_tracker_snapshot("peak")
    plan = memory.training_activations(cfg, 1, 512, dtype.itemsize, checkpointing, padded=False)
    assert kept == pytest.approx(plan["activations saved for backward"], rel=0.02)
    assert _bytes(peak, "Activation") + _bytes(peak, "Temp") <= sum(plan.values())


def test_kv_cache_and_trained_state_match_allocations():
    """The KV cache of a generate call and the FSDP2 state after one AdamW step, byte for byte."""
    cfg = Config.from_hf(TINY)
    cache = decode.KVCache(cfg.num_layers, 5, cfg.num_kv_heads, 300, cfg.head_dim, torch.bfloat16, "cpu")
    assert sum(t.nbytes for t in cache.k + cache.v) == 5 * 300 * memory.kv_bytes_per_token(cfg, 2)

    dist.init()
    torch.manual_seed(0)
    model = dist.shard(Transformer(cfg, TINY).to(torch.bfloat16), torch.device("cpu"), torch.bfloat16)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    logp, _ = sequence_logprobs(model, torch.randint(0, cfg.vocab_size, (2, 16)))
    logp.sum().backward()
    local = [p.to_local() for p in model.parameters()]
    grads = sum(p.grad.to_local().nbytes for p in model.parameters())
    opt.step()
    moments = sum(v.to_local().nbytes for s in opt.state.values() for k, v in s.items() if k != "step")
    p = memory.plan(policy=memory.shapes(TINY), world=1, card=memory.GiB,
                    training=dict(tokens=32, checkpointing=False))
    t = p.phases["training"]
    assert sum(x.nbytes for x in local) == t["policy fp32 masters (sharded)"]
    assert all(x.dtype == torch.float32 for x in local)
    assert grads == t["policy fp32 gradients (sharded)"]
    assert moments == t["policy AdamW moments fp32 (sharded)"]


def test_shards_are_padded_like_fsdp2():
    """FSDP2 splits dim 0 in world-size pieces, the last ones padded: ceil(d0 / world) rows a rank."""
    s = memory.shapes(TINY)
    for world in (1, 3, 8):
        expected = sum(-(-shape[0] // world) * torch.Size(shape[1:]).numel() for shape in s.param_shapes)
        assert s.per_rank(world) == expected
    assert s.per_rank(3) >= s.params / 3


def test_kv_slots_is_the_cap_on_the_cpu():
    model = Transformer(Config.from_hf(TINY), TINY)
    assert memory.kv_slots(model, 5120, 64) == 64


# --- helpers --------------------------------------------------------------------------------------------

def _bytes(snapshot, kind):
    return sum(v for k, v in snapshot[torch.device("cpu")].items() if getattr(k, "value", k) == kind)


def _grpo_args(configs, **changes):
    p = argparse.ArgumentParser()
    cli.add_common_args(p)
    args = p.parse_args(["--model", configs["llama"], "--reward-model", configs["skywork"], "--world-size", "8"])
    return argparse.Namespace(**{**vars(args), **changes})


class _fake_gpu:
    """torch.cuda answers as an 8-GPU node's rank 0 would (no device is touched: the plan reads configs)."""

    def __enter__(self):
        self.saved = torch.cuda.is_available, torch.cuda.get_device_properties
        torch.cuda.is_available = lambda: True
        torch.cuda.get_device_properties = lambda i=0: types.SimpleNamespace(total_memory=80 * memory.GiB)
        return self

    def __exit__(self, *exc):
        torch.cuda.is_available, torch.cuda.get_device_properties = self.saved


# --- phases free what they hold -----------------------------------------------------------------------

SHARDED_SCRIPT = """
import json, sys, torch
sys.path.insert(0, {root!r})
from rlmt import dist, reward
from rlmt.logprobs import sequence_logprobs
from rlmt.model import from_pretrained
from torch.distributed.tensor import DTensor
rank, world, device = dist.init()
rm = reward.RewardModel({rm!r}, device=device, batch_size=2)
prompts = ["hello there", "a long question " * 5, "why", "two words", "the cat"]
answers = ["short", "a longer answer " * 3, "yes", "no no", "the dog"]
mine = slice(0, 5) if rank == 0 else slice(0, 0)  # rank 1 has nothing to score: 3 forwards vs 0
scores = rm.score(prompts[mine], answers[mine]).tolist()
ref = dist.shard(from_pretrained({policy!r}), device, torch.float32, train=False)
with torch.no_grad():
    sequence_logprobs(ref, torch.tensor([[1, 2, 3, 4]]))
root_gathered = not isinstance(ref.lm_head.weight, DTensor)  # FSDP2 keeps the root after a no-grad forward
dist.reshard(ref)
out = dict(scores=scores, sharded=all(isinstance(p, DTensor) for p in rm.model.parameters()),
           root_gathered=root_gathered, ref_sharded=all(isinstance(p, DTensor) for p in ref.parameters()))
open({out!r} + str(rank), "w").write(json.dumps(out))
dist.cleanup()
"""


def test_reward_model_and_reference_sharded_two_processes(llama_dir, llama_rm_dir, tmp_path):
    """Under 2 gloo ranks the reward model is FSDP2-sharded (1/world of its weights a rank), a rank with
    fewer rows joins the others' forwards (no hang), the scores equal one process's, and after scoring
    (and after the reference's no-grad forward, with dist.reshard) no full weights stay gathered."""
    import os
    import subprocess
    import sys

    from rlmt import reward
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = tmp_path / "sharded.py"
    script.write_text(SHARDED_SCRIPT.format(root=root, rm=llama_rm_dir, policy=llama_dir, out=str(tmp_path / "rank")))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        str(script)], capture_output=True, text=True, timeout=120, env={**env, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    res = [json.loads((tmp_path / f"rank{k}").read_text()) for k in range(2)]
    one = reward.RewardModel(llama_rm_dir, batch_size=2).score(
        ["hello there", "a long question " * 5, "why", "two words", "the cat"],
        ["short", "a longer answer " * 3, "yes", "no no", "the dog"])
    assert torch.allclose(torch.tensor(res[0]["scores"]), one, rtol=1e-5, atol=1e-5)
    assert res[1]["scores"] == []
    for x in res:
        assert x["sharded"] and x["root_gathered"] and x["ref_sharded"], x


def test_rollout_releases_the_copy_before_scoring(llama_dir, llama_tokenizer, monkeypatch):
    """The rollout copy (15 GiB for an 8B) is gone before the reward model runs, not after."""
    from contextlib import contextmanager

    from rlmt import model as M
    from rlmt import rollout
    events = []
    real = dist.full_copy

    @contextmanager
    def traced(model, dtype=None):
        with real(model, dtype) as copy:
            events.append("copy")
            yield copy
        events.append("released")
    monkeypatch.setattr(dist, "full_copy", traced)

    def reward_fn(prompts, answers):
        events.append("scored")
        return [0.0] * len(answers)
    dist.init()
    policy = dist.shard(M.from_pretrained(llama_dir), torch.device("cpu"), torch.float32)
    rows = [{"id": "a", "messages": [{"role": "user", "content": "hello"}]}]
    rollout.on_policy(policy, llama_tokenizer, rows, step=0, first=0, seed=0, template="chat", group_size=2,
                      reward_fn=reward_fn, max_new_tokens=4)
    assert events == ["copy", "released", "scored"]


def test_kv_slots_from_the_memory_left(monkeypatch):
    """On a GPU the cache takes what --gpu-memory-utilization of the card leaves: (free + cached-but-unused
    − (1 − u) × total − reserve) / bytes a slot, capped by --sample-batch-size, at least 1."""
    cfg = Config.from_hf(TINY)
    fake = types.SimpleNamespace(inv_freq=types.SimpleNamespace(device=torch.device("cuda", 0)), config=cfg,
                                 model=types.SimpleNamespace(embed_tokens=types.SimpleNamespace(
                                     weight=torch.zeros(1, dtype=torch.bfloat16))))
    per_slot = memory.kv_bytes_per_token(cfg, 2) * 1000
    total = 100 * per_slot
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda d: (30 * per_slot, total))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda d: 5 * per_slot)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda d: 3 * per_slot)
    # free 30 + 2 cached, minus 10 kept back at u = 0.9, minus 2 reserved: 20 slots
    assert memory.kv_slots(fake, 1000, 64, 0.9, reserve=2 * per_slot) == 20
    assert memory.kv_slots(fake, 1000, 8, 0.9, reserve=2 * per_slot) == 8
    assert memory.kv_slots(fake, 1000, 64, 0.5, reserve=2 * per_slot) == 1  # nothing left: one slot, slowly
