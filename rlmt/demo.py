"""The offline CPU demo: a tiny model learns the Zero format (`<think> … </think> <response> … </response>`)
from a reward, in about two minutes on 2 cores, with nothing downloaded.

The paper's pipeline in miniature: a tiny Llama is first warm-started for a few seconds on transcripts
where half follow the format (the rest drop the closing tag or all tags); GRPO or PPO with
`--strict` then scores "[NULL]" for a broken format, and the demo's rule reward gives 1 to any real
answer and 0 to "[NULL]". The format rate is the visible behaviour: it rises from ~0.25 towards 1.
PPO's demo adds a per-prompt offset to that reward (`offset_reward`) for its critic to learn; the
critic's explained variance, ~0 at first, turns clearly positive within about ten steps.
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


def offset_reward(prompts, answers):
    """PPO demo's rule reward: `reward` plus 1 when the prompt is a question (ends with "?").

    A real reward model's scores carry a per-prompt offset; GRPO removes it with the group mean, PPO's
    critic has to learn it from the prompt. The format alone is decided in the last few tokens, which
    no critic can foresee (its explained variance stays near 0 on `reward`, as measured); the offset is
    visible from the first state on, so a working critic's explained variance turns clearly positive."""
    return [r + float(p.rstrip().endswith("?")) for p, r in zip(prompts, reward(prompts, answers))]


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
    """Fill a train_grpo.py namespace for the demo (flags the user gave explicitly are kept). lr 5e-4: the
    reward reaches ~1 by step 10 and stays (2e-3 reached it sooner, then collapsed after step 35 with the
    KL at 4.8 and every answer cut at the token limit)."""
    _apply(args, parser, dict(out="runs/grpo-demo", template="zero", strict=True, prompts_per_step=8,
                              group_size=8, sample_batch_size=64, lr=5e-4, kl_coef=0.001,
                              max_new_tokens=24, max_prompt_len=896, steps=40, save_every=0, eval_every=10,
                              eval_prompts=16, temperature=1.0))


def apply_ppo_defaults(args, parser):
    """Fill a train_ppo.py namespace for the demo (flags the user gave explicitly are kept): one sample
    per prompt as in the paper's PPO, the reward with a per-prompt offset (`offset_reward`), and classic
    PPO's 4 epochs × 2 mini-batches per rollout, so the fresh value head sees enough updates to learn the
    offset within the demo's few steps (a tiny critic needs a few dozen)."""
    _apply(args, parser, dict(out="runs/ppo-demo", template="zero", strict=True, prompts_per_step=48,
                              group_size=1, sample_batch_size=64, lr=5e-4, critic_lr=3e-3,
                              ppo_epochs=4, mini_batches=2, max_new_tokens=24, max_prompt_len=896, steps=30,
                              save_every=0, eval_every=10, eval_prompts=16, temperature=1.0),
           reward_fn="rlmt.demo:offset_reward")


def _apply(args, parser, demo, reward_fn="rlmt.demo:reward"):
    for k, v in demo.items():
        if getattr(args, k) == parser.get_default(k):
            setattr(args, k, v)
    args.model = args.model or build(args.out)
    args.data = args.data or PROMPTS
    args.eval_data = args.eval_data or PROMPTS
    if not args.reward_model and not args.reward_fn:
        args.reward_fn = reward_fn


# --- SFT and DPO demos ----------------------------------------------------------------------------------

# The SFT demo's conversations: a question about a topic, a thought that restates it, a three-word answer.
# Every word is in the tiny tokenizer's training corpus (rlmt.tiny), so a conversation is a few dozen tokens.
SFT_TOPICS = {"color": "red blue green", "dog": "dog cat bird", "river": "river water tree",
              "city": "city house people", "book": "book word name", "day": "day time light"}
SFT_ASKS = ("name three", "tell me about", "write about", "explain", "what is a good")


def sft_conversation(rng):
    """One warm-start conversation in RLMT's format: the answer follows `<think>\\n…\\n</think>\\n\\n`."""
    topic = rng.choice(sorted(SFT_TOPICS))
    ask = rng.choice(SFT_ASKS)
    messages = [{"role": "system", "content": "You are a helpful assistant."}] if rng.random() < 0.3 else []
    messages += [{"role": "user", "content": f"{ask} {topic}?"},
                 {"role": "assistant", "content": f"<think>\nthe user asks about {topic} . first plan , then "
                                                  f"answer .\n</think>\n\n{SFT_TOPICS[topic]}"}]
    return messages


def build_sft(out_dir, n=256, seed=0):
    """A tiny chat tokenizer and random Llama, and n synthetic thinking-format conversations
    -> (model folder, data file)."""
    import json

    from rlmt import model as M
    path, data_path = os.path.join(out_dir, "init"), os.path.join(out_dir, "sft_demo.jsonl")
    if not os.path.exists(os.path.join(path, "config.json")):
        tok = tiny.build_tokenizer(os.path.join(out_dir, "tokenizer"), "llama", added_tokens=TAGS)
        tiny.build_checkpoint(os.path.join(out_dir, "random"), "llama", tokenizer=tok, hidden_size=96, num_layers=2,
                              intermediate_size=192, rope_scaling=None)
        model = M.from_pretrained(os.path.join(out_dir, "random"))
        with torch.no_grad():  # as in build(): the random init's std-0.1 weights learn slowly
            for p in model.parameters():
                if p.dim() > 1:
                    p.mul_(0.3)
        M.save_pretrained(model, path, tokenizer=tok)
    rng = random.Random(seed)
    with open(data_path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"id": f"sft-demo-{i}", "messages": sft_conversation(rng)}) + "\n")
    return path, data_path


def apply_sft_defaults(args, parser):
    """Fill a train_sft.py namespace for the demo (flags the user gave explicitly are kept)."""
    demo = dict(out="runs/sft-demo", lr=3e-3, batch_size=16, max_len=256, epochs=4.0,
                save_every=0)
    for k, v in demo.items():
        if getattr(args, k) == parser.get_default(k):
            setattr(args, k, v)
    if not args.model or not args.data:
        model, data_path = build_sft(args.out)
        args.model, args.data = args.model or model, args.data or data_path


def answer_words(prompts, answers):
    """The DPO demo's rule reward: the answer's word count (0 for the strict-mode "[NULL]"), so the pairs
    prefer the longer of the answers that kept the format."""
    return [0.0 if a == chat.NULL_ANSWER else float(len(a.split())) for a in answers]


def apply_dpo_defaults(args, parser):
    """Fill a train_dpo.py namespace for the demo: pairs sampled from the warm-started tiny model of
    build() under the Zero template, scored by answer_words, then DPO on them."""
    demo = dict(out="runs/dpo-demo", template="zero", strict=True, lr=1e-3, batch_size=8,
                max_new_tokens=24, max_prompt_len=896, epochs=6.0, save_every=0, warmup=0.05)
    for k, v in demo.items():
        if getattr(args, k) == parser.get_default(k):
            setattr(args, k, v)
    args.model = args.model or build(args.out, steps=120)
    args.data = args.data or PROMPTS
    if not args.reward_model and not args.reward_fn:
        args.reward_fn = "rlmt.demo:answer_words"


def show(policy, tokenizer, messages, template="chat", max_new_tokens=48):
    """Print the greedy answer of a trained demo model to one conversation."""
    from rlmt import dist, sampler
    prompt = chat.encode_prompt(tokenizer, messages, template)
    with dist.full_copy(policy) as model:
        out = sampler.generate(model, [prompt], max_new_tokens=max_new_tokens, temperature=0.0,
                               stop_ids=chat.stop_ids(tokenizer))[0]
    print(f"demo: {chat.user_turn(messages)!r} -> {tokenizer.decode(out['tokens'], skip_special_tokens=True)!r}")


def dpo_report(policy, tokenizer, pairs_path, args):
    """Print what DPO changed: the demo reward of the parseable answers (and the format rate) sampled from
    the starting model, read back from the pairs files, against fresh samples of the trained model."""
    import json

    from rlmt import dist, pairs, reward, rollout
    before = []
    for path in (pairs_path, pairs.dropped_path(pairs_path)):
        with open(path) as f:
            before += [s for line in f if line.strip() for s in json.loads(line)["scores"]]
    rows = data.load_prompts(args.data)
    with dist.full_copy(policy) as model, torch.no_grad():
        ro = rollout.rollout(model, tokenizer, rows, template=args.template, group_size=args.group_size,
                             reward_fn=reward.load_reward_fn(args.reward_fn), max_prompt_len=args.max_prompt_len,
                             max_new_tokens=args.max_new_tokens, temperature=args.temperature, strict=args.strict,
                             seed=[(args.seed << 32) + j for j in range(len(rows))])
    valid = [s for s in before if s is not None]
    after = ro.rewards[ro.format_ok]
    print(f"demo: answer words {sum(valid) / max(1, len(valid)):.2f} -> {after.mean().item():.2f}, format rate "
          f"{len(valid) / max(1, len(before)):.2f} -> {ro.format_ok.float().mean().item():.2f} "
          "(before -> after DPO)")
