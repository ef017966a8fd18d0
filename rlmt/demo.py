"""The offline CPU demo: a tiny model learns the Zero format (`<think> … </think> <response> … </response>`)
from a reward, in about two minutes on 2 cores, with nothing downloaded.

The paper's pipeline in miniature: a tiny Llama is first warm-started for a few seconds on transcripts
where half follow the format (the rest drop the closing tag or all tags); GRPO with
`--strict` then scores "[NULL]" for a broken format, and the demo's rule reward gives 1 to any real
answer and 0 to "[NULL]". The format rate is the visible behaviour: it rises from ~0.25 towards 1.
"""

import os
import random

import torch

from rlmt import chat, data, tiny
from rlmt.logprobs import sequence_logprobs

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = os.path.join(HERE, "data", "demo_prompts.jsonl")
TAGS = ("<think>", "</think>", "<response>", "</response>")


def reward(prompts, answers):
    """Rule reward for the demo: 1 for a real answer, 0 for the strict-mode "[NULL]" of a broken format."""
    return [0.0 if a == chat.NULL_ANSWER else 1.0 for a in answers]


def _completion(rng):
    """A warm-start target: the format half of the time, a typical breakage otherwise."""
    words = lambda k: " ".join(rng.choice(tiny._WORDS[:24]) for _ in range(k))  # noqa: E731 (short, common)
    kind = rng.randrange(4)
    if kind < 2:
        return f"<think> {words(rng.randint(1, 4))} </think> <response> {words(rng.randint(1, 4))} </response>"
    if kind == 2:
        return f"<think> {words(rng.randint(1, 4))} </think> <response> {words(rng.randint(1, 4))}"
    return words(rng.randint(2, 8))


def build(out_dir, steps=200, seed=0):
    """Tiny tokenizer + Llama, warm-started on mixed-format transcripts; returns the model folder."""
    from rlmt import model as M
    path = os.path.join(out_dir, "model")
    if os.path.exists(os.path.join(path, "config.json")):
        return path
    tok = tiny.build_tokenizer(os.path.join(out_dir, "tokenizer"), "llama", added_tokens=TAGS)
    tiny.build_checkpoint(os.path.join(out_dir, "init"), "llama", tokenizer=tok, hidden_size=96, num_layers=2,
                          intermediate_size=192, rope_scaling=None)
    model = M.from_pretrained(os.path.join(out_dir, "init")).train()
    with torch.no_grad():  # the random init's large weights (std 0.1) would slow the warm start down
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(0.3)
    rows = data.load_prompts(PROMPTS)
    prompts, _ = data.encode_prompts(tok, rows, "zero", 896)
    stop = tok.convert_tokens_to_ids("<|eot_id|>")
    rng = random.Random(seed)
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    print(f"demo: warm-starting a tiny model for {steps} steps ...")
    for _ in range(steps):
        batch = rng.sample(range(len(prompts)), 16)
        resp = [tok(" " + _completion(rng), add_special_tokens=False)["input_ids"] + [stop] for _ in batch]
        b = data.join([prompts[i] for i in batch], resp, chat.pad_id(tok))
        logp, _ = sequence_logprobs(model, b["input_ids"], b["attention_mask"], b["position_ids"])
        loss = -(logp * b["response_mask"]).sum() / b["response_mask"].sum()
        loss.backward()
        opt.step()
        opt.zero_grad()
    M.save_pretrained(model.eval(), path, tokenizer=tok)
    print(f"demo: warm-start loss {loss.item():.2f}; model in {path}")
    return path


def apply_grpo_defaults(args, parser):
    """Fill a train_grpo.py namespace for the demo (flags the user gave explicitly are kept)."""
    demo = dict(out="runs/grpo-demo", template="zero", strict=True, prompts_per_step=8, group_size=8,
                micro_batch_size=16, sample_batch_size=64, lr=2e-3, kl_coef=0.001, max_new_tokens=24,
                max_prompt_len=896, steps=40, save_every=0, eval_every=10, eval_prompts=16, temperature=1.0)
    for k, v in demo.items():
        if getattr(args, k) == parser.get_default(k):
            setattr(args, k, v)
    args.model = args.model or build(args.out)
    args.data = args.data or PROMPTS
    args.eval_data = args.eval_data or PROMPTS
    if not args.reward_model and not args.reward_fn:
        args.reward_fn = "rlmt.demo:reward"
