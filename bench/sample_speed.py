"""rlmt.sampler against transformers' `generate` on the same model, prompts and lengths, in one run.

    python bench/sample_speed.py [--batch 64] [--new-tokens 256] [--kv-heads 2] [--threads 2] [--no-tail]

The model is a random ~7M-parameter Llama (vocab 8,192, width 256, 4 layers, 8 heads; 2 KV heads by
default, Llama 3's 4:1 grouping), built once with transformers and saved under --workdir.

1. Equal work: `--batch` prompts of 16-64 tokens, one sample each, sampled at T 0.7 / top-p 1 and forced
   to exactly --new-tokens tokens (rlmt: ignore_eos; transformers: no EOS), so both do the same work.
2. Long tail: 4 samples for each of `--batch` prompts, stop ids chosen so that a row stops with
   probability ~1/64 per token (lengths spread like a geometric law, a few rows run to the cap
   --tail-max), through `--batch` slots: rlmt with continuous batching, rlmt in waves of `--batch`
   samples (one generate call per wave, no refills), and transformers in waves of `--batch` rows (a
   finished row idles until its wave's longest is done). Useful tokens per second.
Run it on an otherwise idle machine: on 2 cores, a second busy process stalls every multi-threaded op.
"""

import argparse
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from rlmt import data, sampler, tiny  # noqa: E402
from rlmt import model as M  # noqa: E402


def build(args):
    path = os.path.join(args.workdir, f"llama-7m-kv{args.kv_heads}")
    if not os.path.exists(os.path.join(path, "config.json")):
        tiny.build_checkpoint(path, family="llama", hidden_size=256, num_layers=4, num_heads=8,
                              num_kv_heads=args.kv_heads, intermediate_size=704, vocab_size=8192)
    return path


def hf_generate(ref, prompts, new_tokens, stop_ids=None, n=1):
    """transformers' sampling at T 0.7, top-p 1, top-k off; every field explicit. -> [rows, new] tokens."""
    import transformers
    ids, am = data.left_pad(prompts, 0)
    ids, am = ids.repeat_interleave(n, 0), am.repeat_interleave(n, 0)
    config = transformers.GenerationConfig(do_sample=True, temperature=0.7, top_p=1.0, top_k=0,
                                           max_new_tokens=new_tokens, eos_token_id=stop_ids, pad_token_id=0)
    with torch.no_grad():
        return ref.generate(input_ids=ids, attention_mask=am, generation_config=config)[:, ids.shape[1]:]


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=64, help="prompts (equal-work case) and slots")
    p.add_argument("--new-tokens", type=int, default=256, help="tokens per row in the equal-work case")
    p.add_argument("--kv-heads", type=int, default=2, help="KV heads of the 8 attention heads (8 = no GQA)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--repeat", type=int, default=3, help="equal-work runs of each; the fastest is reported")
    p.add_argument("--tail-max", type=int, default=512, help="max new tokens in the long-tail case")
    p.add_argument("--no-tail", action="store_true", help="skip the long-tail case")
    p.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "rlmt-bench"),
                   help="where the random checkpoint is saved (reused)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    import transformers
    path = build(args)
    ours = M.from_pretrained(path)
    ref = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(16, 65, (args.batch,), generator=g).tolist()
    prompts = [torch.randint(0, 8192, (n,), generator=g).tolist() for n in lengths]
    cfg = ours.config
    print(f"model: {sum(p.numel() for p in ours.parameters()) / 1e6:.1f}M parameters, {cfg.num_heads} heads, "
          f"{cfg.num_kv_heads} KV heads; torch {torch.__version__}, transformers {transformers.__version__}, "
          f"{args.threads} threads; prompts of {min(lengths)}-{max(lengths)} tokens")

    # --- 1. equal work: every row exactly --new-tokens tokens
    kw = dict(temperature=0.7, top_p=1.0, ignore_eos=True, batch_size=args.batch)
    sampler.generate(ours, prompts[:4], max_new_tokens=8, **kw)  # warm-up, both sides
    hf_generate(ref, prompts[:4], 8)
    t_ours, t_hf = [], []
    for _ in range(args.repeat):  # alternate, so a slow spell of the machine hits both
        out, t = timed(lambda: sampler.generate(ours, prompts, max_new_tokens=args.new_tokens, **kw))
        assert all(len(s["tokens"]) == args.new_tokens for s in out)
        t_ours.append(t)
        hf, t = timed(lambda: hf_generate(ref, prompts, args.new_tokens))
        assert hf.shape == (args.batch, args.new_tokens)
        t_hf.append(t)
    work = args.batch * args.new_tokens
    print(f"\nequal work: {args.batch} rows x {args.new_tokens} new tokens, T 0.7 (fastest of {args.repeat})")
    for name, ts in [("rlmt.sampler", t_ours), ("transformers.generate", t_hf)]:
        runs = ", ".join(f"{t:.2f}" for t in ts)
        print(f"  {name:24s}{min(ts):7.2f} s  {work / min(ts):8.0f} tok/s   (runs: {runs} s)")
    print(f"  ratio                   {min(t_hf) / min(t_ours):7.2f}x")
    if args.no_tail:
        return

    # --- 2. long tail: stop ids that end a row with probability ~1/64 per token
    # the model's mean next-token distribution over a pilot's response positions; the most likely
    # tokens, until their mass reaches 1/64, become stop ids
    pilot = sampler.generate(ours, prompts[:16], max_new_tokens=64, seed=1, **kw)
    batch = sampler.to_batch(prompts[:16], pilot, 0)
    with torch.no_grad():
        logits = ours(batch["input_ids"], batch["attention_mask"], batch["position_ids"])
    probs = (logits.float() / 0.7).softmax(-1)[batch["response_mask"].bool()].mean(0)
    mass, order = probs.sort(descending=True)
    stops = order[:int((mass.cumsum(0) < 1 / 64).sum()) + 1].tolist()
    n, B, cap = 4, args.batch, args.tail_max
    kw = dict(max_new_tokens=cap, temperature=0.7, top_p=1.0, stop_ids=stops, batch_size=B)
    steps = []  # rows of each rlmt decode forward (one new token per row)
    hook = ours.register_forward_pre_hook(lambda m, a: steps.append(len(a[0])) if a[0].shape[1] == 1 else None)
    cont, t_cont = timed(lambda: sampler.generate(ours, prompts, n=n, **kw))
    cont_steps, steps[:] = list(steps), []
    waves, t_waves = timed(lambda: [s for i in range(0, len(prompts), B // n)
                                    for s in sampler.generate(ours, prompts[i:i + B // n], n=n, seed=i, **kw)])
    wave_steps = list(steps)
    hook.remove()

    def hf_waves():
        rows, hf_steps = [], []
        for i in range(0, len(prompts), B // n):
            out = hf_generate(ref, prompts[i:i + B // n], cap, stops, n=n)
            hf_steps += [len(out)] * (out.shape[1] - 1)  # every row stays in the batch to the wave's end
            rows += [next((row[:j + 1] for j, t in enumerate(row) if t in stops), row) for row in out.tolist()]
        return rows, hf_steps
    (hf_rows, hf_steps), t_hfw = timed(hf_waves)
    print(f"\nlong tail: {len(prompts)} prompts x {n} samples through {B} slots, T 0.7, {len(stops)} stop ids "
          f"(~1/64 of the mass), at most {cap} new tokens")
    print(f"  {'':28s} {'time':>9s} {'tok/s':>8s} {'tokens':>7s} {'mean':>5s} {'max':>4s} {'decode steps':>13s} "
          f"{'rows computed':>14s}")
    for name, lens, t, st in [("rlmt, continuous batching", [len(s["tokens"]) for s in cont], t_cont, cont_steps),
                              (f"rlmt, waves of {B}", [len(s["tokens"]) for s in waves], t_waves, wave_steps),
                              (f"transformers, waves of {B}", [len(r) for r in hf_rows], t_hfw, hf_steps)]:
        print(f"  {name:28s} {t:7.2f} s {sum(lens) / t:8.0f} {sum(lens):7d} {sum(lens) / len(lens):5.0f} "
              f"{max(lens):4d} {len(st):13d} {sum(st):14d}")
    print("  (decode steps: forwards of one token per row; rows computed: their summed batch rows. On a GPU a "
          "step costs about the same for 1 or 64 rows, so steps set the time there; on the CPU rows do.)")

if __name__ == "__main__":
    main()
