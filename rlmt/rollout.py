"""Prompts -> samples -> rewards -> a training batch. Shared by GRPO, PPO and DPO pair building.

    rows ──encode (template, left-truncate)──> prompt ids ──sampler.generate(n=G)──> response tokens
         ──decode, chat.split_answer──> (thought, answer, format ok) ──reward.score_all(user turn, answer)──>
         one scalar per sample, in prompt-major order: the G samples of a prompt are consecutive;
         chat.answer_span + chat.answer_tokens mark the answer's tokens (batch["answer_mask"]).

The online trainers add three things around `rollout`: which prompts a rank takes at a step
(`prompts_for`), sampling with seeds that do not depend on the number of ranks (`on_policy`), and
greedy validation (`validate`); `metrics` gives the rollout's numbers for the log.
"""

import math
import time
from dataclasses import dataclass

import torch

from rlmt import batching, chat, data, dist, memory, reward, sampler


@dataclass
class Rollout:
    """One rollout, N = P prompts × G samples in prompt-major order (the G samples of a prompt consecutive).

    batch: tensors only, [N, T] with T = prompt_len + the longest response (sampler.to_batch, rlmt.data.join):
      input_ids, attention_mask, position_ids, response_mask  LongTensor: the exact sampled ids, never
        re-encoded text; response_mask 1 on each sample's tokens up to and including its stop token
      sampler_logp  FloatTensor fp32: the sampler's log-prob of input_ids[b, t], 0 off the response (not
        the trainer's `old_logp`, recomputed by the trainer; their gap is the sampler/trainer mismatch)
      answer_mask   LongTensor: 1 on the response tokens the scored answer came from, and on the stop
        token when there is an answer; 0 everywhere for a strict "[NULL]" (chat.answer_tokens gives the rule)
    prompt_len: int, the column where every response starts
    rewards [N] fp32; format_ok [N] bool (the whole format, for the log); parseable [N] bool (the answer's
      delimiter was found: what the reward saw, chat.parseable)
    response_len [N] fp32: tokens sampled, the stop token included
    thought_len [N] fp32: response tokens before the answer's first token (the whole response when the
      answer is "[NULL]"); answer_mask.sum(1) counts the answer's tokens
    finish: N of "stop" / "length"; prompt_ids: P prompt id lists as sampled; ids: N row ids
    prompts, texts, thoughts, answers: N strings (the user turn, the decoded response without its stop
      token, and its split) for samples.jsonl
    n_truncated: prompts cut to max_prompt_len; t_sample, t_reward: seconds
    """
    batch: dict
    prompt_len: int
    rewards: torch.Tensor
    format_ok: torch.Tensor
    parseable: torch.Tensor
    response_len: torch.Tensor
    thought_len: torch.Tensor
    finish: list
    prompt_ids: list
    ids: list
    prompts: list
    texts: list
    thoughts: list
    answers: list
    n_truncated: int
    t_sample: float
    t_reward: float


def rollout(policy, tokenizer, rows, *, template, group_size, rm=None, reward_fn=None, max_prompt_len=1024,
            max_new_tokens=4096, temperature=0.7, top_p=1.0, top_k=0, strict=False, seed=0, batch_size=64,
            gpu_memory_utilization=0.9, compile=False, progress=False):
    """Sample `group_size` responses for each row and score their answers -> Rollout.

    policy: a plain model, or a trained FSDP2 one, which is gathered into a plain copy in its compute
    dtype for sampling (dist.full_copy; every rank must call then). The phases free what they hold: the
    copy and the KV cache are released before the answers are scored. batch_size: the most sampler slots;
    on a GPU the KV cache takes what `gpu_memory_utilization` of the card leaves (memory.kv_slots).
    compile: torch.compile the decode step (sampler.generate); CUDA graphs are on whenever it is a GPU.
    rows: prompt records ({"id", "messages"}), P of them; the Rollout holds N = P × group_size samples.
    """
    t0 = time.perf_counter()
    prompt_ids, n_cut = data.encode_prompts(tokenizer, rows, template, max_prompt_len)
    _release()  # training's activations go back to the driver, so the cache is sized from what is free
    with dist.full_copy(policy) as model, torch.no_grad():
        longest = max(map(len, prompt_ids), default=0)
        reserve = memory.sampling_reserve(model.config, model.model.embed_tokens.weight.element_size(),
                                          sum(map(len, prompt_ids)), batch_size, max_new_tokens)
        slots = memory.kv_slots(model, longest + max_new_tokens, batch_size, gpu_memory_utilization, reserve)
        samples = sampler.generate(model, prompt_ids, n=group_size, max_new_tokens=max_new_tokens,
                                   temperature=temperature, top_p=top_p, top_k=top_k,
                                   stop_ids=chat.stop_ids(tokenizer), seed=seed, batch_size=slots,
                                   compile=compile, progress=progress)
    _release()  # the rollout copy and the KV cache (~55 GiB of an 8B run's 80): the reward model and
    # training grow into them without the allocator's free-everything-and-retry path on the way
    t_sample = time.perf_counter() - t0
    batch = sampler.to_batch(prompt_ids, samples, chat.pad_id(tokenizer))
    P = batch.pop("prompt_len")
    batch["answer_mask"] = torch.zeros_like(batch["response_mask"])
    stops = set(chat.stop_ids(tokenizer))
    texts, thoughts, answers, ok, parsed, thought_len = [], [], [], [], [], []
    for b, s in enumerate(samples):
        toks = s["tokens"][:-1] if s["tokens"] and s["tokens"][-1] in stops else s["tokens"]
        text = tokenizer.decode(toks, skip_special_tokens=False)
        thought, answer, fmt = chat.split_answer(text, template, strict=strict)
        span = chat.answer_span(text, template, strict=strict)
        if span is None:  # "[NULL]": no token is the answer, every token came before one
            thought_len.append(len(s["tokens"]))
        else:
            first, end = chat.answer_tokens(tokenizer, toks, text, span)
            batch["answer_mask"][b, P + first:P + end] = 1
            if len(toks) < len(s["tokens"]):  # the stop token: where the answer chose to end
                batch["answer_mask"][b, P + len(toks)] = 1
            thought_len.append(first)
        parsed.append(chat.parseable(text, template, strict))
        texts.append(text)
        thoughts.append(thought)
        answers.append(answer)
        ok.append(fmt)
    prompts = [rows[s["prompt_index"]]["messages"] for s in samples]
    t1 = time.perf_counter()
    rewards = reward.score_all(rm, reward_fn, prompts, answers)
    t_reward = time.perf_counter() - t1
    return Rollout(
        batch=batch, prompt_len=P, rewards=rewards.float(), format_ok=torch.tensor(ok, dtype=torch.bool),
        parseable=torch.tensor(parsed, dtype=torch.bool),
        response_len=torch.tensor([len(s["tokens"]) for s in samples], dtype=torch.float32),
        thought_len=torch.tensor(thought_len, dtype=torch.float32), finish=[s["finish_reason"] for s in samples],
        prompt_ids=prompt_ids, ids=[rows[s["prompt_index"]]["id"] for s in samples],
        prompts=[chat.user_turn(p) for p in prompts], texts=texts, thoughts=thoughts, answers=answers,
        n_truncated=n_cut, t_sample=t_sample, t_reward=t_reward)


def _release():
    """Hand the memory torch's allocator caches but no tensor uses back to the GPU (no-op on the CPU)."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def sample_rows(ro, k=4):
    """A few rows for samples.jsonl: what the model actually writes, with its reward."""
    idx = range(0, len(ro.texts), max(1, len(ro.texts) // k))
    return [{"id": ro.ids[i], "prompt": ro.prompts[i], "text": ro.texts[i], "thought": ro.thoughts[i],
             "answer": ro.answers[i], "reward": float(ro.rewards[i]), "format_ok": bool(ro.format_ok[i]),
             "finish": ro.finish[i]} for i in list(idx)[:k]]


def prompts_for(rows, step, per_step, seed, rank=0, world=1):
    """This rank's prompts at `step` -> (rows, index of the first one among the step's prompts).

    The step's slice of the shuffled prompts (batching.step_indices), one contiguous share of it per rank."""
    chunk = batching.step_indices(len(rows), per_step, step, seed)
    share = per_step // world
    return [rows[j] for j in chunk[rank * share:(rank + 1) * share]], rank * share


def on_policy(policy, tokenizer, rows, *, step, first, seed, **kw):
    """`rollout` from the policy's current weights (a trained FSDP2 policy: every rank calls it).

    `first` is the index of rows[0] among the step's prompts across all ranks; each prompt's random stream
    is keyed by (seed, step, that index), so 1 rank and N ranks draw the same samples. kw: rollout's."""
    seeds = [(seed << 40) + (step << 20) + first + i for i in range(len(rows))]
    try:
        return rollout(policy, tokenizer, rows, seed=seeds, **kw)
    except reward.RewardFnError as e:
        e.step = step + 1  # the step as metrics.jsonl counts it; the trainer's crash report names it
        raise


def validate(policy, tokenizer, eval_rows, *, step, seed, rank=0, world=1, **kw):
    """Greedy answers to the held-out prompts, split over ranks -> val_reward_mean, val_format_rate,
    val_response_len (this rank's means; log.reduce_metrics averages them). kw: rollout's."""
    share = math.ceil(len(eval_rows) / world)
    mine = eval_rows[rank * share:(rank + 1) * share] or eval_rows[:1]  # every rank joins the reduction
    ro = on_policy(policy, tokenizer, mine, step=step, first=rank * share, seed=seed, group_size=1,
                   temperature=0.0, **kw)
    return {"val_reward_mean": ro.rewards.mean(), "val_format_rate": ro.format_ok.float().mean(),
            "val_response_len": ro.response_len.mean()}


def metrics(ro, world=1):
    """The rollout's numbers for metrics.jsonl, as detached tensors (log.reduce_metrics averages them over
    ranks; tokens_per_s is multiplied by `world` here so that its average is the total throughput).
    response_len, thought_len, answer_len: mean tokens a sample (answer_len counts answer_mask)."""
    return dict(reward_mean=ro.rewards.mean(), reward_std=ro.rewards.std(),
                format_rate=ro.format_ok.float().mean(), answer_rate=ro.parseable.float().mean(),
                response_len=ro.response_len.mean(), thought_len=ro.thought_len.mean(),
                answer_len=ro.batch["answer_mask"].sum(1).float().mean(),
                length_frac=torch.tensor(sum(f == "length" for f in ro.finish) / len(ro.finish)),
                tokens_per_s=ro.response_len.sum() / max(ro.t_sample, 1e-9) * world,
                t_sample=torch.tensor(ro.t_sample), t_reward=torch.tensor(ro.t_reward))
