"""rlmt on one GPU: the sampler, a training micro-step, reward scoring and a whole GRPO step, each next
to its ceiling, in one run of a few minutes (random bf16 weights in the shapes of real checkpoints).

    python bench/gpu.py                          # everything, ~5 minutes on an H100 / H200
    python bench/gpu.py --only "decode:64:eager,graph,hf" --models 1b
    python bench/gpu.py --dry-run                # tiny shapes on the CPU: checks every section runs

Sections (--only, run in the order given after the ceilings), each result also a line of --out/gpu.jsonl:
  ceil    the two ceilings every other number is read against: device-to-device copy bandwidth (bytes
          read + written) and the bf16 matmul rate (8192^3), median of 10 (METHOD: measure, don't quote).
  decode  rlmt.sampler.generate: --batches prompts of --prompt-len random ids, one sample each, exactly
          --new-tokens tokens (ignore_eos) at T 0.7, for the Llama-3.2-1B and -3.1-8B shapes. Variants:
          eager; graph (the eager step captured in a CUDA graph per shape); compile (torch.compile);
          compile+graph; +full (every slot over the whole cache width: the path before live shapes; all
          rows here are live to the end, so only the width differs); hf (transformers.generate, default
          dynamic cache, sdpa, same weights); a suffix @K reads the tokens back every K steps (sync_every;
          default 16 on a GPU). Roofline:
          prefill FLOPs / matmul rate + Σ over decode steps (weights + the KV cache read so far) / copy
          bandwidth, as new tokens per second.
  train   one GRPO micro-step of the 1B shape: sequence_logprobs with entropy (chunked fp32 log-probs) on
          the response (the last 7/8 of each row), the clipped surrogate, backward, activation
          checkpointing on, --train-batch rows of --train-len tokens. MFU = (6 N T + 6 L D T^2 per row) /
          time / matmul rate, N the matmul parameters of the blocks, plus the LM head's for the positions
          it runs on (embeddings not counted).
  rm      reward-model scoring (8B shape, score head) through RewardModel.score_ids: --rm-rows sequences of
          1,024-5,120 tokens, 8 a micro-batch, right-padded: tokens/s, MFU, peak memory.
  grpo    `train_grpo.py` itself, 2 steps, on 1B-shaped random checkpoints written to --workdir: 16 prompts
          x 8 samples, up to 1,024 new tokens; the second step's t_sample / t_reward / t_train.
  rollout one rank's rollout at RLMT's lengths through the trainer's path (bench/rollout_speed.py's
          workload: 8 prompts of the paper's data's lengths x 8 samples, lognormal responses of mean 1,500 cut
          at 4,096, forced per sample): the --rollout-model policy stored in fp32 and FSDP2-sharded (a one-process
          group, as `python train_grpo.py`; torchrun's ranks take the same path), its rollout copy
          (dist.full_copy: ms and GB), then sampler.generate on the copy. Variants: full+graph (every slot
          over the whole cache width, one CUDA graph: the path before live shapes), graph (live shapes, a
          graph per bucket), compile+graph. Seconds per rollout, graphs captured, % of the live-position
          roofline (each decode step: all weights + each live row's KV up to its position, at the copy
          bandwidth; prefill at the matmul rate); ms per step at 64 rows x 1,280 / x 5,120 columns and 4 rows.
  memory  the memory plan against the allocator: `train_grpo.py`, one step, on 3B-shaped random checkpoints
          (fp32 masters, bf16 reference and reward model of the same shape) at the paper's lengths (8
          prompts x 8 samples, prompts cut to 1,024, 4,096 new tokens), through bench/phase_peaks.py:
          torch.cuda.max_memory_allocated in sampling, scoring and training next to rlmt.memory's peak.
A --budget (seconds) bounds the run: measurements that would start after it are skipped and listed.
"""

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from rlmt import model as M  # noqa: E402
from rlmt import decode, reward, sampler  # noqa: E402
from rlmt.logprobs import sequence_logprobs  # noqa: E402

# Llama 3.2 1B / 3.2 3B / 3.1 8B (config.json of the hub checkpoints); "tiny" is the --dry-run stand-in.
SHAPES = {
    "1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
               num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=True, rope_factor=32.0),
    "3b": dict(vocab_size=128256, hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
               num_attention_heads=24, num_key_value_heads=8, tie_word_embeddings=True, rope_factor=32.0),
    "8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False, rope_factor=8.0),
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False, rope_factor=8.0),
}


# --- timing and output ------------------------------------------------------------------------------

def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device):
    """(result, seconds) of fn(), the device drained before and after."""
    sync(device)
    t = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t


def median_time(fn, device, warmup=2, repeat=10):
    for _ in range(warmup):
        fn()
    return statistics.median(timed(fn, device)[1] for _ in range(repeat))


def peak_gb(device):
    return torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else float("nan")


def reset_peak(device):
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


class Report:
    """Results as they come: one printed line and one JSON line each, and a table at the end."""

    def __init__(self, out, budget):
        self.rows, self.skipped, self.start, self.budget = [], [], time.perf_counter(), budget
        self.path = os.path.join(out, "gpu.jsonl") if out else None
        if out:
            os.makedirs(out, exist_ok=True)

    def time_left(self, what):
        """False (and the measurement listed as skipped) once the budget is spent."""
        if time.perf_counter() - self.start > self.budget:
            self.skipped.append(what)
            return False
        return True

    def add(self, section, **row):
        row = {"section": section, "t": round(time.perf_counter() - self.start, 1), **row}
        self.rows.append(row)
        print(json.dumps(row), flush=True)
        if self.path:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")

    def guard(self, section, what, fn):
        """Run one measurement; an error (out of memory, a compile failure) is reported, not fatal."""
        if not self.time_left(f"{section} {what}"):
            return None
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - one failed measurement must not lose the others
            self.add(section, what=what, error=f"{type(e).__name__}: {str(e).splitlines()[0][:300]}")
            return None


# --- models -------------------------------------------------------------------------------------------

def hf_config(shape, head="lm"):
    import transformers
    s = dict(SHAPES[shape])
    factor = s.pop("rope_factor")
    cfg = transformers.LlamaConfig(
        **s, max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=500000.0, bos_token_id=1,
        eos_token_id=2, pad_token_id=0,
        rope_scaling={"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8192})
    cfg.architectures = ["LlamaForCausalLM" if head == "lm" else "LlamaForSequenceClassification"]
    if head != "lm":
        cfg.num_labels, cfg.tie_word_embeddings = 1, False
    return cfg


@contextlib.contextmanager
def default_dtype(dtype):
    saved = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(saved)


def build_rlmt(shape, device, dtype, head="lm"):
    """A random rlmt Transformer built on the device in `dtype` (std 0.02, as HF initializes)."""
    hf = hf_config(shape, head)
    cfg = M.Config.from_hf(hf.to_dict())
    with torch.device(device), default_dtype(dtype), torch.no_grad():
        model = M.Transformer(cfg, hf.to_dict())
        for name, p in model.named_parameters():
            p.fill_(1.0) if "norm" in name else p.normal_(0.0, 0.02)
    model.inv_freq = M.rope_inv_freq(cfg).to(device)
    return model.eval().requires_grad_(False)


def build_pair(shape, device, dtype):
    """transformers' LlamaForCausalLM and an rlmt Transformer sharing its weights (the names match one to
    one), and the relative error of rlmt's logits against it on two random prompts."""
    import transformers
    hf_cfg = hf_config(shape)
    with torch.device(device):
        hf = transformers.AutoModelForCausalLM.from_config(hf_cfg, dtype=dtype, attn_implementation="sdpa")
    hf.eval().requires_grad_(False)
    cfg = M.Config.from_hf(hf_cfg.to_dict())
    with torch.device("meta"):
        model = M.Transformer(cfg, hf_cfg.to_dict())
    model.load_state_dict(hf.state_dict(), strict=False, assign=True)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.inv_freq = M.rope_inv_freq(cfg).to(device)
    model.eval().requires_grad_(False)
    ids = torch.randint(3, cfg.vocab_size, (2, 64), device=device)
    with torch.no_grad():
        a, b = model(ids).float(), hf(input_ids=ids).logits.float()
    return hf, model, ((a - b).norm() / b.norm()).item()


def param_counts(cfg):
    """(matmul parameters per token: blocks + LM head, bytes the decode step reads for weights)."""
    D, F, L, V = cfg.hidden_size, cfg.intermediate_size, cfg.num_layers, cfg.vocab_size
    kv = cfg.num_kv_heads * cfg.head_dim
    per_layer = D * cfg.num_heads * cfg.head_dim * 2 + 2 * D * kv + 3 * D * F + 2 * D
    blocks = L * per_layer
    read = blocks + V * D + D if cfg.tie_word_embeddings else blocks + 2 * V * D + D  # + embedding rows, small
    return blocks + V * D, read


# --- sections -----------------------------------------------------------------------------------------

def section_ceilings(rep, device, dry):
    def copy_bw():
        n = (1 << 20) if dry else (1 << 30)  # 4 GiB of fp32 each way on the GPU
        x, y = torch.randn(n, device=device), torch.empty(n, device=device)
        t = median_time(lambda: y.copy_(x), device)
        return 2 * n * 4 / t / 1e12

    def matmul():
        n = 512 if dry else 8192
        dt = torch.float32 if dry else torch.bfloat16
        a, b = torch.randn(n, n, device=device, dtype=dt), torch.randn(n, n, device=device, dtype=dt)
        t = median_time(lambda: a @ b, device)
        return 2 * n ** 3 / t / 1e12

    bw = rep.guard("ceil", "copy", copy_bw)
    mm = rep.guard("ceil", "matmul", matmul)
    rep.add("ceil", copy_TBps=bw, matmul_TFLOPs=mm)
    return bw or 1.0, mm or 1.0


def decode_roofline(cfg, batch, prompt_len, new, bw, mm, dtype_bytes):
    """New tokens / s at the ceilings: prefill at the matmul rate, each decode step at the copy bandwidth
    (all weights once + every live row's KV cache up to its position)."""
    n_mm, w_read = param_counts(cfg)
    kv_per_tok = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * dtype_bytes
    t_prefill = 2 * n_mm * batch * prompt_len / (mm * 1e12)
    t_decode = sum(w_read * dtype_bytes + batch * (prompt_len + i) * kv_per_tok for i in range(1, new)) / (bw * 1e12)
    return batch * new / (t_prefill + t_decode)


def width_churn(model, batch, S, device):
    """ms per eager decode step (no CUDA graph) over a fixed cache width, and over a width that changes
    every step as the unbucketed eager sampler's did: the cost of a new attention shape."""
    cfg = model.config
    cache = decode.KVCache(cfg.num_layers, batch, cfg.num_kv_heads, S, cfg.head_dim,
                            model.lm_head.weight.dtype, device)
    tok = torch.randint(3, cfg.vocab_size, (batch,), device=device)
    out = {}
    with torch.no_grad():
        for name, widths in (("fixed", [S // 2] * 24), ("changing", list(range(S // 2, S // 2 + 24)))):
            times = []
            for w in widths:
                cache.width = w
                times.append(timed(lambda: decode.decode_one_token(model, cache, tok, torch.full_like(tok, w - 1)),
                                   device)[1])
            out[f"step_ms_{name}_width"] = 1e3 * statistics.median(times[4:])
    return out


def section_decode(rep, args, device, dtype, bw, mm, batches, variants):
    """Batch sizes outer, models inner: with batches "64", both models' batch-64 rows come first."""
    pairs = {}
    for shape in args.models:
        reset_peak(device)
        built = rep.guard("decode", f"{shape} build", lambda: build_pair(shape, device, dtype))
        if built is not None:
            pairs[shape] = built
            rep.add("decode", model=shape, logits_rel_err_vs_hf=built[2], weights_gb=peak_gb(device))
    for batch in batches:
        if "eager" in variants:
            for shape, (_, model, _) in pairs.items():
                rep.guard("decode", f"{shape} b{batch} width churn", lambda: rep.add(
                    "decode", model=shape, batch=batch, **width_churn(model, batch, max(2 * args.prompt_len, 64), device)))
        for shape, (hf, model, _) in pairs.items():
            cfg = model.config
            g = torch.Generator().manual_seed(batch)
            prompts = torch.randint(3, cfg.vocab_size, (batch, args.prompt_len), generator=g).tolist()
            roof = decode_roofline(cfg, batch, args.prompt_len, args.new_tokens, bw, mm,
                                   model.lm_head.weight.element_size())
            ref_tokens = None
            for variant in variants:
                def run(new=args.new_tokens, variant=variant):
                    if variant == "hf":
                        ids = torch.tensor(prompts, device=device)
                        out = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True,
                                          temperature=0.7, top_p=1.0, top_k=0, max_new_tokens=new,
                                          min_new_tokens=new, eos_token_id=None, pad_token_id=0)
                        return out[:, ids.shape[1]:].tolist()
                    kind, _, every = variant.partition("@")  # "graph@1": read tokens back every step
                    samples = sampler.generate(model, prompts, max_new_tokens=new, temperature=0.7, seed=1,
                                               batch_size=batch, ignore_eos=True, compile="compile" in kind,
                                               cuda_graph="graph" in kind, full_width="full" in kind,
                                               sync_every=int(every) if every else None)
                    return [s["tokens"] for s in samples]

                def measure(variant=variant, run=run):
                    nonlocal ref_tokens
                    # warm-up: compiled variants need the same slots and cache width (rounded to 256)
                    t_warm = timed(lambda: run(args.new_tokens // 2 + 1 if "compile" in variant else 8), device)[1]
                    reset_peak(device)
                    tokens, t = timed(run, device)
                    assert all(len(x) == args.new_tokens for x in tokens), "a row stopped early"
                    row = dict(model=shape, batch=batch, variant=variant, tok_s=batch * args.new_tokens / t,
                               seconds=t, ms_per_step=1e3 * t / args.new_tokens, roofline_tok_s=roof,
                               of_roofline=batch * args.new_tokens / t / roof, peak_gb=peak_gb(device),
                               warmup_s=t_warm)
                    if variant != "hf":  # same uniforms: rlmt's variants should draw the same tokens
                        ref_tokens = ref_tokens or tokens
                        same = sum(a == b for x, y in zip(ref_tokens, tokens) for a, b in zip(x, y))
                        row["same_tokens_as_first"] = same / (batch * args.new_tokens)
                    rep.add("decode", **row)

                rep.guard("decode", f"{shape} b{batch} {variant}", measure)
    pairs.clear()
    reset_peak(device)


def section_train(rep, args, device, dtype, mm):
    from rlmt import losses

    def measure(batch):
        reset_peak(device)
        policy = build_rlmt(args.train_model, device, dtype).requires_grad_(True).train()
        policy.gradient_checkpointing = True
        cfg, T = policy.config, args.train_len
        ids = torch.randint(3, cfg.vocab_size, (batch, T), device=device)
        mask = torch.zeros(batch, T, device=device)
        mask[:, T // 8:] = 1  # a prompt of T/8 tokens, then the response
        adv = torch.randn(batch, device=device)

        start = T // 8

        def step():  # the LM head runs on the response positions only, as in train_grpo.py
            logp, ent = sequence_logprobs(policy, ids, None, None, 0.7, with_entropy=True, start=start)
            pg, _ = losses.policy_loss(logp, logp.detach(), adv, mask)
            loss = losses.aggregate(pg - 0.001 * ent, mask, "seq-mean-token-mean")
            loss.backward()

        t = median_time(step, device, warmup=2, repeat=5)
        n_mm, _ = param_counts(cfg)
        head = cfg.vocab_size * cfg.hidden_size  # counted only where it runs: T - start + 1 positions
        flops = batch * (6 * (n_mm - head) * T + 6 * head * (T - start + 1) + 6 * cfg.num_layers * cfg.hidden_size * T * T)
        rep.add("train", model=args.train_model, batch=batch, seq=T, seconds=t, tok_s=batch * T / t,
                mfu=flops / t / (mm * 1e12), peak_gb=peak_gb(device))
        del policy

    for batch in args.train_batch:
        rep.guard("train", f"batch {batch}", lambda: measure(batch))
    reset_peak(device)


def section_rm(rep, args, device, dtype, mm):
    def measure():
        reset_peak(device)
        rm = object.__new__(reward.RewardModel)  # the scoring half of RewardModel; no tokenizer needed
        rm.model, rm.backend, rm.pad_id, rm.batch_size = build_rlmt(args.rm_model, device, dtype, "score"), \
            "rlmt", 0, 8
        cfg = rm.model.config
        g = torch.Generator().manual_seed(0)
        lo, hi = args.rm_len
        lens = torch.randint(lo, hi + 1, (args.rm_rows,), generator=g).tolist()
        ids = [torch.randint(3, cfg.vocab_size, (n,), generator=g).tolist() for n in lens]
        rm.score_ids(ids[:8])  # warm-up
        reset_peak(device)
        scores, t = timed(lambda: rm.score_ids(ids), device)
        assert torch.isfinite(scores).all()
        n_mm, _ = param_counts(cfg)
        n_mm -= cfg.vocab_size * cfg.hidden_size  # a score head, not an LM head
        flops = sum(2 * n_mm * n + 2 * cfg.num_layers * cfg.hidden_size * n * n for n in lens)
        rep.add("rm", model=args.rm_model, rows=len(lens), tokens=sum(lens), seconds=t, tok_s=sum(lens) / t,
                mfu=flops / t / (mm * 1e12), peak_gb=peak_gb(device))

    rep.guard("rm", "score", measure)
    reset_peak(device)


def write_checkpoints(workdir, shape, device, dtype):
    """A random policy and reward model of `shape`, with a tokenizer covering every id, as HF folders."""
    from rlmt import tiny
    policy_dir, rm_dir = os.path.join(workdir, f"policy-{shape}"), os.path.join(workdir, f"rm-{shape}")
    if os.path.exists(os.path.join(rm_dir, "config.json")):
        return policy_dir, rm_dir
    V = SHAPES[shape]["vocab_size"]
    tok = tiny.build_tokenizer(os.path.join(workdir, f"tok-{shape}"), "llama",
                               added_tokens=[f"<w{i}>" for i in range(V - 384)])
    for path, head in ((policy_dir, "lm"), (rm_dir, "score")):
        model = build_rlmt(shape, device, dtype, head)
        model.hf_config.update(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                               pad_token_id=tok.eos_token_id)
        M.save_pretrained(model, path, tok)
        del model
    return policy_dir, rm_dir


def section_grpo(rep, args, device, dtype):
    def measure():
        policy_dir, rm_dir = write_checkpoints(args.workdir, args.grpo_model, device, dtype)
        out = os.path.join(args.workdir, "grpo-run")
        cmd = [sys.executable, os.path.join(ROOT, "train_grpo.py"), "--model", policy_dir, "--reward-model", rm_dir,
               "--data", os.path.join(ROOT, "data", "demo_prompts.jsonl"), "--out", out, "--steps", "2",
               "--prompts-per-step", str(args.grpo_prompts), "--group-size", "8",
               "--max-new-tokens", str(args.grpo_new_tokens), "--save-every", "0", *args.grpo_flags]
        t0 = time.perf_counter()
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=max(60, rep.budget))
        if r.returncode:
            raise RuntimeError(f"train_grpo.py exited {r.returncode}: {r.stderr.strip().splitlines()[-1:]}")
        with open(os.path.join(out, "metrics.jsonl")) as f:
            m = [json.loads(line) for line in f][-1]  # the second step: CUDA and cuBLAS warmed up
        keys = ("t_sample", "t_reward", "t_train", "tokens_per_s", "response_len", "reward_mean")
        rep.add("grpo", model=args.grpo_model, prompts=args.grpo_prompts, group=8, new_tokens=args.grpo_new_tokens,
                flags=" ".join(args.grpo_flags), process_s=time.perf_counter() - t0,
                **{k: m.get(k) for k in keys})

    rep.guard("grpo", "2 steps", measure)


def section_rollout(rep, args, device, dtype, bw, mm):
    from bench.rollout_speed import workload
    from rlmt import dist
    shape, G = args.rollout_model, 8
    cap, mean = (16, 8) if args.dry_run else (args.rollout_new_tokens, 1500)
    plens, lengths = workload(args.rollout_prompts, G, cap, mean)
    if args.dry_run:
        plens = [min(n, 24) for n in plens]
    g = torch.Generator().manual_seed(0)
    V = SHAPES[shape]["vocab_size"]
    prompts = [torch.randint(3, V, (n,), generator=g).tolist() for n in plens]
    state = {}

    def build():
        dist.init()
        reset_peak(device)
        trained = dist.shard(build_rlmt(shape, device, torch.float32), device, dtype)  # fp32 masters, as trained
        times = []
        for _ in range(4):  # the refresh each rollout pays: an all-gather per parameter, cast to bf16
            t = time.perf_counter()
            with dist.full_copy(trained):
                sync(device)
                times.append(time.perf_counter() - t)
        state["stack"] = contextlib.ExitStack()  # the copy the variants decode
        state["model"] = state["stack"].enter_context(dist.full_copy(trained))
        rep.add("rollout", model=shape, refresh_ms=1e3 * statistics.median(times[1:]), first_refresh_ms=1e3 * times[0],
                copy_gb=sum(p.numel() * p.element_size() for p in state["model"].parameters()) / 1e9,
                peak_gb=peak_gb(device))
        del trained  # the rest decodes the copy; in a real run the fp32 masters are sharded over 8 ranks
        reset_peak(device)
        return True

    def roofline():
        cfg = state["model"].config
        n_mm, w_read = param_counts(cfg)
        kv_tok = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 2
        cols = [0] * max(lengths)  # per decode step: the live rows' positions summed
        for j, n in enumerate(lengths):
            for t in range(1, n):
                cols[t] += plens[j // G] + t
        steps = sum(1 for c in cols if c)
        return 2 * n_mm * sum(plens) / (mm * 1e12) + (steps * w_read * 2 + sum(cols) * kv_tok) / (bw * 1e12)

    def rollout(variant):
        model, st = state["model"], {}
        kw = dict(n=G, max_new_tokens=lengths, temperature=0.7, ignore_eos=True, batch_size=len(lengths), seed=1,
                  compile="compile" in variant, cuda_graph="graph" in variant, full_width="full" in variant,
                  stats=st)
        if "compile" in variant:  # compile outside the timing (a run pays it once, on its first rollouts):
            # a short rollout of ragged lengths meets every specialization (1 row, the full width, both)
            sampler.generate(model, prompts, **{**kw, "max_new_tokens": [1 + n % 64 for n in lengths], "stats": {}})
        reset_peak(device)
        out, t = timed(lambda: sampler.generate(model, prompts, **kw), device)
        assert [len(s["tokens"]) for s in out] == lengths
        floor = state.setdefault("floor", roofline())
        rep.add("rollout", model=shape, variant=variant, seconds=t, tokens=sum(lengths), tok_s=sum(lengths) / t,
                roofline_s=floor, of_roofline=floor / t, steps=st["steps"], graphs=len(st["shapes"]),
                kv_columns=st["columns"], peak_gb=peak_gb(device))

    def step_times(variant):
        """ms per decode step at three shapes, each captured (or compiled) first: the cost of a step at
        full rows and a short width, at the full width, and at a few live rows."""
        model, cfg = state["model"], state["model"].config
        rows, S = len(lengths), max(plens) + cap
        cache = decode.KVCache(cfg.num_layers, rows, cfg.num_kv_heads, S, cfg.head_dim, dtype, device)
        step = decode.Decoder(model, cache, rows, "compile" in variant, "graph" in variant)
        out = {}
        for b, w in ((rows, min(S, 1280)), (rows, S), (min(4, rows), S - min(1024, S // 4))):
            tok = torch.randint(3, cfg.vocab_size, (b,), device=device)
            pos = torch.full((b,), w - 1, device=device)
            with torch.no_grad():
                out[f"ms_{b}x{w}"] = 1e3 * median_time(lambda: step(tok, pos, w), device, warmup=3, repeat=20)
        rep.add("rollout", model=shape, variant=variant, **out)
        del cache, step

    if rep.guard("rollout", f"{shape} build + refresh", build) is None:
        return
    for variant in args.rollout_variants:
        if args.dry_run:  # CUDA graphs need a GPU: the same variants, eager
            variant = "+".join(v for v in variant.split("+") if v != "graph") or "eager"
        rep.guard("rollout", f"{shape} {variant}", lambda: rollout(variant))
        rep.guard("rollout", f"{shape} {variant} steps", lambda: step_times(variant))
    state["stack"].close()
    state.clear()
    reset_peak(device)


def long_prompts(path, n, words):
    """n prompts of `words` words each, so that every prompt is cut to --max-prompt-len (the plan's case)."""
    import random
    rng = random.Random(0)
    vocab = "the a of to and in is it that for on with as was be by this are or from at which have".split()
    with open(path, "w") as f:
        for i in range(n):
            text = " ".join(rng.choice(vocab) for _ in range(words))
            f.write(json.dumps({"id": f"long-{i}", "messages": [{"role": "user", "content": text}]}) + "\n")
    return path


def section_memory(rep, args, device, dtype):
    def measure():
        policy_dir, rm_dir = write_checkpoints(args.workdir, args.memory_model, device, dtype)
        data = long_prompts(os.path.join(args.workdir, "long_prompts.jsonl"), args.memory_prompts,
                            2 * args.memory_prompt_len)
        result = os.path.join(args.workdir, "phase_peaks.json")
        cmd = [sys.executable, os.path.join(ROOT, "bench", "phase_peaks.py"), result,
               os.path.join(ROOT, "train_grpo.py"), "--model", policy_dir, "--reward-model", rm_dir, "--data", data,
               "--out", os.path.join(args.workdir, "memory-run"), "--steps", "1", "--save-every", "0",
               "--eval-every", "0", "--prompts-per-step", str(args.memory_prompts), "--group-size", "8",
               "--max-prompt-len", str(args.memory_prompt_len), "--max-new-tokens", str(args.memory_new_tokens)]
        t0 = time.perf_counter()
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=max(60, rep.budget))
        if r.returncode:
            raise RuntimeError(f"phase_peaks.py exited {r.returncode}: {r.stderr.strip().splitlines()[-3:]}")
        with open(result) as f:
            res = json.load(f)
        for phase, planned in res["plan"].items():
            got = res["measured"].get(phase)
            rep.add("memory", model=args.memory_model, phase=phase, plan_gib=planned / 2**30,
                    measured_gib=got / 2**30 if got is not None else None,
                    ratio=got / planned if got else None, checkpointing=res["checkpointing"],
                    process_s=time.perf_counter() - t0)

    rep.guard("memory", "1 step", measure)


# --- main ---------------------------------------------------------------------------------------------

def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default="train;rm;decode:64;grpo;decode:1,256",
                   help="sections to run after the ceilings, ';'-separated, in this order: train, rm, grpo, memory, rollout, "
                        "decode or decode:BATCHES or decode:BATCHES:VARIANTS (comma-separated lists)")
    p.add_argument("--models", default="1b,8b", help="decode: model shapes (1b, 8b)")
    p.add_argument("--batches", default="64,1,256", help="decode: batch sizes, in the order measured")
    p.add_argument("--variants", default="eager,graph,compile+graph,compile,hf",
                   help="decode: eager, graph, compile, compile+graph, hf (transformers.generate); "
                        "a suffix @K sets sync_every, e.g. graph@1")
    p.add_argument("--prompt-len", type=int, default=512, help="decode: prompt tokens")
    p.add_argument("--new-tokens", type=int, default=512, help="decode: new tokens per row")
    p.add_argument("--train-model", default="1b", help="train: model shape")
    p.add_argument("--train-batch", default="2,4", help="train: rows per micro-step (comma-separated to compare)")
    p.add_argument("--train-len", type=int, default=4096, help="train: tokens per row")
    p.add_argument("--rm-model", default="8b", help="rm: model shape")
    p.add_argument("--rm-rows", type=int, default=64, help="rm: sequences scored")
    p.add_argument("--rm-len", default="1024,5120", help="rm: min,max tokens per sequence")
    p.add_argument("--grpo-model", default="1b", help="grpo: policy and reward model shape")
    p.add_argument("--grpo-prompts", type=int, default=16, help="grpo: prompts per step (x 8 samples)")
    p.add_argument("--grpo-new-tokens", type=int, default=1024, help="grpo: max new tokens")
    p.add_argument("--grpo-flag", action="append", default=[], dest="grpo_flags",
                   help="grpo: an extra flag for train_grpo.py (repeatable, e.g. --grpo-flag=--micro-batch-size=8)")
    p.add_argument("--memory-model", default="3b", help="memory: policy and reward model shape")
    p.add_argument("--memory-prompts", type=int, default=8, help="memory: prompts (x 8 samples): one rank's share")
    p.add_argument("--memory-prompt-len", type=int, default=1024,
                   help="memory: prompt tokens (every prompt is cut to it)")
    p.add_argument("--memory-new-tokens", type=int, default=4096, help="memory: max new tokens")
    p.add_argument("--rollout-model", default="8b", help="rollout: policy shape")
    p.add_argument("--rollout-prompts", type=int, default=8, help="rollout: prompts (x 8 samples): one rank's share")
    p.add_argument("--rollout-new-tokens", type=int, default=4096, help="rollout: response cap")
    p.add_argument("--rollout-variants", default="full+graph,graph,compile+graph",
                   help="rollout: comma-separated; graph, compile, full (every slot over the whole width), joined by +")
    p.add_argument("--budget", type=float, default=420, help="seconds; later measurements are skipped")
    p.add_argument("--workdir", default="/tmp/rlmt-gpu-bench", help="grpo: where checkpoints and the run go")
    p.add_argument("--out", default=os.environ.get("OUT"), help="folder for gpu.jsonl (default $OUT)")
    p.add_argument("--dry-run", action="store_true", help="tiny shapes and lengths on the CPU, fp32")
    args = p.parse_args()
    args.models, args.variants = args.models.split(","), args.variants.split(",")
    args.batches, args.train_batch = [int(b) for b in args.batches.split(",")], [int(b) for b in args.train_batch.split(",")]
    args.rm_len = [int(n) for n in args.rm_len.split(",")]
    args.rollout_variants = args.rollout_variants.split(",")
    args.only = [part.split(":") for part in args.only.split(";")]  # [name, batches?, variants?]
    unknown = {part[0] for part in args.only} - {"train", "rm", "decode", "grpo", "memory", "rollout"}
    if unknown:
        p.error(f"--only: unknown section(s) {', '.join(sorted(unknown))} (train, rm, decode, grpo, memory, rollout)")
    if args.dry_run:
        args.models, args.train_model, args.rm_model, args.grpo_model = ["tiny"], "tiny", "tiny", "tiny"
        args.batches, args.prompt_len, args.new_tokens, args.train_len = [2, 4], 16, 16, 64
        args.rm_rows, args.rm_len, args.grpo_prompts, args.grpo_new_tokens = 8, [16, 48], 2, 16
        args.memory_model, args.memory_prompts, args.memory_prompt_len, args.memory_new_tokens = "tiny", 2, 16, 16
        args.rollout_model, args.rollout_prompts = "tiny", 2
    device = torch.device("cuda" if torch.cuda.is_available() and not args.dry_run else "cpu")
    if device.type != "cuda" and not args.dry_run:
        p.error("no GPU here; --dry-run checks the script on the CPU")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch._dynamo.config.cache_size_limit = 32  # one compiled decode step per (model, batch)
    torch.backends.cuda.matmul.allow_tf32 = True
    rep = Report(args.out, args.budget)
    info = dict(torch=torch.__version__, device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu")
    try:
        import transformers
        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    rep.add("info", **info, args=vars(args))

    bw, mm = section_ceilings(rep, device, args.dry_run)  # every other number is read against these
    sections = {"train": lambda: section_train(rep, args, device, dtype, mm),
                "rm": lambda: section_rm(rep, args, device, dtype, mm),
                "grpo": lambda: section_grpo(rep, args, device, dtype),
                "memory": lambda: section_memory(rep, args, device, dtype),
                "rollout": lambda: section_rollout(rep, args, device, dtype, bw, mm)}
    for name, *spec in args.only:  # in the order given: the most wanted first, within the budget
        if name == "decode":  # decode:BATCHES[:VARIANTS] overrides --batches / --variants
            batches = [int(b) for b in spec[0].split(",")] if spec and not args.dry_run else args.batches
            variants = spec[1].split(",") if len(spec) > 1 else args.variants
            variants = [v for v in variants if not (args.dry_run and "graph" in v)]  # CUDA graphs need a GPU
            section_decode(rep, args, device, dtype, bw, mm, batches, variants)
        else:
            sections[name]()

    print("\n--- summary ---")
    for r in rep.rows:
        if r["section"] == "info":
            continue
        print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()
                       if k not in ("t",)))
    if rep.skipped:
        print(f"skipped (budget {args.budget:.0f} s spent): {', '.join(rep.skipped)}")
    print(f"total {time.perf_counter() - rep.start:.0f} s")


if __name__ == "__main__":
    main()
