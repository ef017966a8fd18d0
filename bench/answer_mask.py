"""The rollout's token-level answer mask (rlmt.chat.answer_tokens) at RLMT's lengths, against its own
fallback, a binary search on prefix decodes (the path any non-byte-level tokenizer takes).

    python bench/answer_mask.py [--samples 64] [--tokens 4096] [--repeat 5]

--samples responses of exactly --tokens tokens in the real Qwen3 vocabulary (../shared/data/tokenizers),
written as a thought of mixed English, CJK and emoji words, `</think>`, then an answer a fifth as long;
each cut at --tokens, as a response at the length limit is (a cut may split a character: those rows take
the fallback, as in a real rollout). Timed: answer_span + answer_tokens over all rows, the decode
excluded (the rollout decodes every response anyway); the two paths alternate --repeat times, medians
and the spread. A rank of the paper's run holds 64 samples a step (64 prompts x 8 over 8 GPUs).
"""

import argparse
import os
import random
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from rlmt import chat  # noqa: E402

TOKENIZER = os.path.join(ROOT, "..", "shared", "data", "tokenizers", "qwen3")
WORDS = "the model thinks about 答案 🦩 carefully before it answers , and then".split()


def responses(tokenizer, n, length, seed=0):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        thought = " ".join(rng.choice(WORDS) for _ in range(length))
        answer = " ".join(rng.choice(WORDS) for _ in range(length // 5))
        ids = tokenizer.encode(f"<think>\n{thought[:len(thought) * 4 // 5]}\n</think>\n\n{answer}",
                               add_special_tokens=False)
        out.append(ids[:length])
    return out


def masks(tokenizer, rows, texts):
    t0 = time.perf_counter()
    for ids, text in zip(rows, texts):
        chat.answer_tokens(tokenizer, ids, text, chat.answer_span(text, "chat-think"))
    return time.perf_counter() - t0


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=64, help="responses (a rank's share of the paper's step)")
    p.add_argument("--tokens", type=int, default=4096, help="tokens of each response (the paper's limit)")
    p.add_argument("--repeat", type=int, default=5, help="timed passes of each path, alternated")
    args = p.parse_args()
    if not os.path.isdir(TOKENIZER):
        sys.exit(f"error: no tokenizer in {TOKENIZER}")
    tokenizer = chat.load_tokenizer(TOKENIZER)
    rows = responses(tokenizer, args.samples, args.tokens)
    texts = [tokenizer.decode(ids, skip_special_tokens=False) for ids in rows]
    t_table = time.perf_counter()
    table = chat._byte_counts(tokenizer)  # built once per tokenizer, then cached
    t_table = time.perf_counter() - t_table
    fallback = sum("\ufffd" in t for t in texts)
    fast, slow = [], []
    for _ in range(args.repeat):
        fast.append(masks(tokenizer, rows, texts))
        chat._BYTE_COUNTS[tokenizer] = None  # as a tokenizer without a byte-level vocabulary
        slow.append(masks(tokenizer, rows, texts))
        chat._BYTE_COUNTS[tokenizer] = table
    med_f, med_s = statistics.median(fast), statistics.median(slow)
    print(f"{args.samples} responses x {args.tokens} tokens (Qwen3), {fallback} cut inside a character "
          f"(those take the prefix decodes in both); byte table built in {t_table:.3f} s")
    print(f"  byte counts     median {med_f:.3f} s  (spread {min(fast):.3f}-{max(fast):.3f})")
    print(f"  prefix decodes  median {med_s:.3f} s  (spread {min(slow):.3f}-{max(slow):.3f})")
    print(f"  ratio {med_s / med_f:.1f}x; per 512-sample rollout: {med_f * 512 / args.samples:.2f} s vs "
          f"{med_s * 512 / args.samples:.2f} s")


if __name__ == "__main__":
    main()
