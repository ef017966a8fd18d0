"""One rank's rollout at RLMT's lengths: rlmt.sampler.generate's decode paths against transformers.generate.

    python bench/rollout_speed.py                 # 8 prompts x 8 samples, responses up to 4,096 tokens
    python bench/rollout_speed.py --scale 0.25    # every response length / 4: a quick look
    python bench/rollout_speed.py --write-lengths # re-derive bench/prompt_lengths.json from the data

Workload: what one of 8 ranks samples in a step of the paper's run (64 prompts x 8 samples / 8 ranks).
  prompts    --prompts lengths drawn from bench/prompt_lengths.json (the 7,544 prompts of rlmt-wildchat-if
             rendered with Llama 3.1 Instruct's chat template, cut to 1,024 tokens), filled with random ids;
  responses  --group-size per prompt, lengths long-tailed: lognormal with mean --mean-len and sigma 0.8, cut
             to --max-new-tokens (mean ~1,500 and ~5% cut at 4,096, as RLMT's rollouts), forced per sample:
             rlmt with one budget per sample and ignore_eos, transformers with a stopping criterion per row.
Variants, interleaved --runs times (medians, and the spread):
  rlmt exact       the CPU default: the live rows only, attending up to the longest live row
  rlmt buckets     the GPU's shapes (rows 1, 2, 3, 4, 6, 8, ..., width in steps of 256), eager here
  rlmt full width  every slot over the whole cache width at every step (the static path before live shapes)
  transformers     generate() on all samples as one batch (a finished row waits for the longest)
Useful tokens/s: the samples' tokens over the wall time. Also printed, per path: decode steps, rows and KV
columns read, next to the floor of each row attending only to its own positions (what a per-row kernel,
e.g. FlexAttention with a block mask, would read).
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from rlmt import data, sampler, tiny  # noqa: E402
from rlmt import model as M  # noqa: E402

LENGTHS = os.path.join(ROOT, "bench", "prompt_lengths.json")
DATA = os.path.join(ROOT, "..", "shared", "data", "rlmt-wildchat-if", "train.jsonl")
TOKENIZER = os.path.join(ROOT, "..", "shared", "data", "tokenizers", "llama-3.2-base")
# Llama 3.1 Instruct's template for one conversation without tools: the system header with its dates
# (what the real template writes when no system message is given), then the turns, assistant opened.
LLAMA31_TEMPLATE = (
    "{{ bos_token }}<|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\n"
    "Today Date: 26 Jul 2024\n\n{% for m in messages if m['role'] == 'system' %}{{ m['content'] }}{% endfor %}"
    "<|eot_id|>{% for m in messages if m['role'] != 'system' %}<|start_header_id|>{{ m['role'] }}"
    "<|end_header_id|>\n\n{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
    "<|start_header_id|>assistant<|end_header_id|>\n\n")


def write_lengths(path=LENGTHS, max_prompt_len=1024):
    """Prompt lengths of the paper's prompt file through the Llama 3.1 template -> `path` (JSON)."""
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER)
    tokenizer.chat_template = LLAMA31_TEMPLATE
    rows = data.load_prompts(DATA)
    ids, cut = data.encode_prompts(tokenizer, rows, "chat", max_prompt_len)
    with open(path, "w") as f:
        json.dump({"source": "shared/data/rlmt-wildchat-if/train.jsonl", "tokenizer": "Llama 3 (llama-3.2-base)",
                   "template": "Llama 3.1 Instruct, no system prompt", "max_prompt_len": max_prompt_len,
                   "truncated": cut, "lengths": [len(x) for x in ids]}, f)
    print(f"{path}: {len(ids)} prompts, median {int(np.median([len(x) for x in ids]))} tokens, {cut} cut")


def workload(prompts, group_size, max_new, mean_len, seed=0, sigma=0.8):
    """-> (prompt lengths [prompts], response lengths [prompts x group_size], prompt-major): the prompts drawn
    from bench/prompt_lengths.json, the responses lognormal with the given mean, cut to max_new."""
    with open(LENGTHS) as f:
        pool = json.load(f)["lengths"]
    rng = np.random.default_rng(seed)
    p = rng.choice(pool, size=prompts).tolist()
    mu = np.log(mean_len) - sigma ** 2 / 2  # the lognormal's mean is exp(mu + sigma^2 / 2)
    r = np.minimum(np.maximum(1, rng.lognormal(mu, sigma, size=prompts * group_size).round()), max_new)
    return p, r.astype(int).tolist()


def live_columns(prompt_lens, response_lens, group_size):
    """KV columns read when each row attends only to its own positions: sum over samples and steps."""
    return sum(sum(prompt_lens[j // group_size] + t for t in range(1, n)) for j, n in enumerate(response_lens))


def hf_generate(ref, prompts, group_size, lengths):
    """transformers.generate, all samples in one batch, T 0.7; row b stops after lengths[b] new tokens."""
    import transformers

    class PerRow(transformers.StoppingCriteria):
        def __init__(self, start):
            self.start, self.want = start, torch.tensor(lengths)

        def __call__(self, input_ids, scores, **kw):
            return input_ids.shape[1] - self.start >= self.want

    ids, am = data.left_pad(prompts, 0)
    ids, am = ids.repeat_interleave(group_size, 0), am.repeat_interleave(group_size, 0)
    config = transformers.GenerationConfig(do_sample=True, temperature=0.7, top_p=1.0, top_k=0,
                                           max_new_tokens=max(lengths), eos_token_id=None, pad_token_id=0)
    with torch.no_grad():
        out = ref.generate(input_ids=ids, attention_mask=am, generation_config=config,
                           stopping_criteria=transformers.StoppingCriteriaList([PerRow(ids.shape[1])]))
    return out.shape[1] - ids.shape[1]  # decode steps, every row computed at each


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=8, help="prompts (one rank's share of the paper's 64)")
    p.add_argument("--group-size", type=int, default=8, help="samples per prompt")
    p.add_argument("--max-new-tokens", type=int, default=4096, help="response cap")
    p.add_argument("--mean-len", type=float, default=1500, help="mean response length before the cap")
    p.add_argument("--scale", type=float, default=1.0, help="multiply --max-new-tokens and --mean-len by this")
    p.add_argument("--slots", type=int, default=64, help="sampler slots (batch_size)")
    p.add_argument("--runs", type=int, default=3, help="interleaved runs of each variant")
    p.add_argument("--variants", default="exact,buckets,full,hf",
                   help="comma-separated: exact, buckets, full (rlmt's paths), hf (transformers.generate)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--write-lengths", action="store_true", help="rebuild bench/prompt_lengths.json and exit")
    p.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "rlmt-bench"),
                   help="where the random checkpoint is saved (reused)")
    args = p.parse_args()
    if args.write_lengths:
        return write_lengths()
    torch.set_num_threads(args.threads)
    import transformers
    path = os.path.join(args.workdir, "llama-7m-kv2-long")
    if not os.path.exists(os.path.join(path, "config.json")):  # the sampler benchmark's model, 8K positions
        tiny.build_checkpoint(path, family="llama", hidden_size=256, num_layers=4, num_heads=8, num_kv_heads=2,
                              intermediate_size=704, vocab_size=8192, max_position_embeddings=8192)
    ours = M.from_pretrained(path)
    ref = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    G, cap = args.group_size, max(1, int(args.max_new_tokens * args.scale))
    plens, lengths = workload(args.prompts, G, cap, args.mean_len * args.scale)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 8192, (n,), generator=g).tolist() for n in plens]
    useful = sum(lengths)
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {args.threads} threads; "
          f"{args.prompts} prompts of {min(plens)}-{max(plens)} tokens (median {int(np.median(plens))}) x {G} "
          f"samples, responses mean {np.mean(lengths):.0f}, max {max(lengths)} (cap {cap}, "
          f"{sum(n == cap for n in lengths)} at it), {useful:,} tokens, {args.slots} slots")

    paths = {"exact": {}, "buckets": {"bucket": 256}, "full": {"full_width": True}}
    kw = dict(n=G, max_new_tokens=lengths, temperature=0.7, ignore_eos=True, batch_size=args.slots, seed=1)
    variants = args.variants.split(",")
    sampler.generate(ours, prompts[:2], max_new_tokens=4, batch_size=4)  # warm-up
    times, stats = {v: [] for v in variants}, {}
    for _ in range(args.runs):  # interleaved, so a slow spell of the machine hits every variant
        for v in variants:
            t = time.perf_counter()
            if v == "hf":
                steps = hf_generate(ref, prompts, G, lengths)
                S = max(plens) + steps
                stats[v] = dict(steps=steps, rows=steps * len(lengths),
                                columns=sum(len(lengths) * (max(plens) + t) for t in range(1, steps)))
            else:
                st = {}
                out = sampler.generate(ours, prompts, stats=st, **kw, **paths[v])
                assert [len(s["tokens"]) for s in out] == lengths, "a sample missed its forced length"
                stats[v] = st
            times[v].append(time.perf_counter() - t)
            print(f"  {v:6s} {times[v][-1]:7.2f} s", flush=True)

    floor = live_columns(plens, lengths, G)
    base = statistics.median(times["hf"]) if "hf" in times else None
    print(f"\n{'variant':16s} {'tok/s':>8s} {'median s':>9s} {'spread s':>13s} {'vs hf':>6s} {'steps':>6s} "
          f"{'rows':>8s} {'KV columns':>12s} {'/ own-row floor':>16s}")
    names = {"exact": "rlmt exact", "buckets": "rlmt buckets", "full": "rlmt full width", "hf": "transformers"}
    for v in variants:
        med, st = statistics.median(times[v]), stats[v]
        ratio = f"{base / med:5.2f}x" if base else "     -"
        print(f"{names[v]:16s} {useful / med:8.0f} {med:9.2f} {min(times[v]):6.2f}-{max(times[v]):6.2f} {ratio:>6s} "
              f"{st['steps']:6d} {st['rows']:8d} {st['columns']:12,d} {st['columns'] / floor:16.2f}")
    print(f"own-row floor: {floor:,} KV columns (each row attends to its own positions only)")


if __name__ == "__main__":
    main()
