"""Peak memory of per-token log-probs + entropy, forward and backward: rlmt's chunked path vs the naive
`log_softmax(logits).gather` on the full [T, V] fp32 logits. Each variant runs in a fresh process and
reports its peak resident memory above what the inputs already took.

    python bench/logprob_memory.py [--tokens 4096] [--vocab 128256] [--dim 256] [--chunk-size 1024]
"""

import argparse
import os
import resource
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def peak_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def run_one(args):
    import torch
    from rlmt.chunked import token_logprobs
    g = torch.Generator().manual_seed(0)
    h = (torch.randn(1, args.tokens, args.dim, generator=g) * 0.1).requires_grad_()
    w = (torch.randn(args.vocab, args.dim, generator=g) * 0.1).requires_grad_()
    targets = torch.randint(0, args.vocab, (1, args.tokens), generator=g)
    w.grad = torch.zeros_like(w)  # gradient buffers exist in both variants, as in training
    h.grad = torch.zeros_like(h)
    base = peak_mb()
    t0 = time.perf_counter()
    if args.variant == "naive":
        logp_all = torch.log_softmax((h @ w.T).float(), dim=-1)
        logp = logp_all.gather(-1, targets[..., None]).squeeze(-1)
        ent = -(logp_all.exp() * logp_all).sum(-1)
    else:
        logp, ent = token_logprobs(h, w, targets, 1.0, True, args.chunk_size)
    (logp.sum() + 0.01 * ent.sum()).backward()
    print(f"{peak_mb() - base:.0f} {time.perf_counter() - t0:.2f}")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=4096, help="sequence length T")
    p.add_argument("--vocab", type=int, default=128256, help="vocabulary size V (Llama 3: 128,256)")
    p.add_argument("--dim", type=int, default=256, help="hidden size D (small: memory is about T x V)")
    p.add_argument("--chunk-size", type=int, default=1024, help="tokens per chunk in rlmt's path")
    p.add_argument("--variant", choices=["naive", "chunked"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.variant:
        return run_one(args)
    logits_mb = args.tokens * args.vocab * 4 / 2**20
    print(f"T={args.tokens} V={args.vocab} D={args.dim}: one fp32 [T, V] logits tensor is {logits_mb:.0f} MB")
    res = {}
    for variant in ("naive", "chunked"):
        out = subprocess.run([sys.executable, __file__, "--variant", variant] + sys.argv[1:],
                             capture_output=True, text=True, check=True).stdout.split()
        res[variant] = float(out[0]), float(out[1])
        print(f"{variant:8s} peak +{res[variant][0]:8.0f} MB   {res[variant][1]:.2f} s (forward + backward)")
    print(f"chunked / naive peak memory: {res['chunked'][0] / res['naive'][0]:.3f}")


if __name__ == "__main__":
    main()
