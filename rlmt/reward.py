"""Rewards: a preference reward model that scores (user turn, answer), rule rewards, and their sum.

RLMT scores only the answer (the text after `</think>`, or inside `<response>` for Zero) against the
original user conversation (never the Zero instruction), with an off-the-shelf reward model such as
Skywork-Reward-Llama-3.1-8B-v0.2. The reward model's own chat template renders the pair, so the text it
sees is the text it was trained on:

    text = rm_tokenizer.apply_chat_template(prompt + [{"role": "assistant", "content": answer}], tokenize=False)
    ids  = rm_tokenizer(text, add_special_tokens=False)   # the template already holds the BOS
    ids  = ids[:max_len]                                   # right-truncated (5120 in the paper)
    r    = score_head(hidden)[last token of the attention mask]

No normalization here: GRPO standardizes within the group, PPO whitens its advantages.

Llama / Qwen2 / Mistral reward models (…ForSequenceClassification) run on rlmt's own decoder, so the
trainer can shard `RewardModel.model` with FSDP2 like the policy; any other architecture falls back to
transformers' AutoModelForSequenceClassification.
"""

import importlib
import importlib.util
import itertools
import json
import numbers
import os
import sys

import torch

from rlmt import chat, dist, hub


def _preview(prompt, n=60):
    text = prompt if isinstance(prompt, str) else chat.user_turn(prompt)
    return text[:n] + ("…" if len(text) > n else "")


def check_finite(rewards, prompts=None, where="reward"):
    """Raise ValueError naming the first sample whose reward is NaN or infinite.

    rewards: [N]; prompts: the N prompts (strings or message lists), quoted in the message when given.
    """
    bad = (~torch.isfinite(rewards)).nonzero().flatten()
    if len(bad):
        i = int(bad[0])
        shown = f" (prompt: {_preview(prompts[i])!r})" if prompts is not None else ""
        more = f"; {len(bad) - 1} more sample(s) are not finite either" if len(bad) > 1 else ""
        raise ValueError(f"{where} for sample {i} is {rewards[i].item()}{shown}{more}")
    return rewards


def last_token_index(attention_mask):
    """[B, T] mask (1 = token, left or right padding) -> [B] index of each row's last token.

    Read from the mask, never by searching for the pad id (pad is often EOS, which ends the template)."""
    T = attention_mask.shape[-1]
    return (torch.arange(T, device=attention_mask.device) * attention_mask.long()).argmax(-1)


def _as_messages(prompt):
    """A prompt as a message list: a string becomes one user message."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    if not isinstance(prompt, (list, tuple)) or not all(isinstance(m, dict) and "role" in m and "content" in m
                                                       for m in prompt):
        raise TypeError(f"a prompt must be a string or a list of {{'role', 'content'}} messages, got {prompt!r:.80}")
    return list(prompt)


class RewardModel:
    """A sequence-classification reward model with its own tokenizer and chat template.

    path_or_alias: a local folder, an rlmt alias or a hub id. dtype / device: as rlmt.model.from_pretrained
    (the checkpoint's dtype by default). max_len: tokens kept per (prompt, answer), right-truncated.
    batch_size: rows per forward. trust_remote_code: for the tokenizer and the transformers fallback.

    Attributes: `model` (rlmt Transformer with the "score" head, or the transformers model), `tokenizer`,
    `backend` ("rlmt" or "transformers").
    """

    def __init__(self, path_or_alias, device=None, dtype=None, max_len=5120, batch_size=8,
                 trust_remote_code=False):
        from rlmt.model import ARCHITECTURES, from_pretrained
        if max_len < 1 or batch_size < 1:
            raise ValueError(f"max_len ({max_len}) and batch_size ({batch_size}) must be positive")
        folder = hub.resolve_path(path_or_alias)
        cfg_path = os.path.join(folder, "config.json")
        if not os.path.exists(cfg_path):
            raise FileNotFoundError(f"reward model {path_or_alias!r}: no config.json in {folder}")
        with open(cfg_path) as f:
            hf = json.load(f)
        arch = (hf.get("architectures") or [None])[0]
        # Tokenizer first: a missing chat template is reported before any weights are read.
        self.tokenizer = chat.load_tokenizer(folder, trust_remote_code=trust_remote_code)
        if not getattr(self.tokenizer, "chat_template", None):
            raise ValueError(f"reward model {path_or_alias!r}: its tokenizer has no chat template, so the "
                             "(prompt, answer) pair cannot be rendered the way the model was trained; use a "
                             "reward model that ships one (tokenizer_config.json or chat_template.jinja)")
        self.pad_id = chat.pad_id(self.tokenizer)  # padding is never read: masks decide
        self.max_len, self.batch_size, self.name = max_len, batch_size, path_or_alias
        # The template is supposed to hold the BOS. If it does not, but the tokenizer prepends one to
        # every plain encode (its training pipeline most likely did `tokenizer(text)`), prepend exactly
        # one: a Llama-style model has never seen a sequence without it.
        bos = self.tokenizer.bos_token_id
        self.bos_id = bos if bos is not None and self.tokenizer("a")["input_ids"][:1] == [bos] \
            and self.tokenizer("a", add_special_tokens=False)["input_ids"][:1] != [bos] else None

        if arch in ARCHITECTURES:
            if ARCHITECTURES[arch][1] != "score":
                raise ValueError(f"reward model {path_or_alias!r} is a {arch}, not a reward model "
                                 "(…ForSequenceClassification with one label)")
            self.backend = "rlmt"
            # Loaded on the CPU, then put on the device by dist.shard: FSDP2-sharded when there are several
            # ranks (an 8B in bf16 is 15 GiB replicated, 1.9 GiB a rank on 8), plain in one process.
            self.model = from_pretrained(folder, dtype=dtype)
            if device is not None:
                self.model = dist.shard(self.model, torch.device(device), next(self.model.parameters()).dtype,
                                        train=False)
        else:  # another architecture: transformers runs it (lazy import, as in the rest of rlmt)
            from transformers import AutoModelForSequenceClassification
            self.backend = "transformers"
            self.model = AutoModelForSequenceClassification.from_pretrained(
                folder, dtype=dtype if dtype is not None else "auto", trust_remote_code=trust_remote_code)
            if self.model.config.num_labels != 1:
                raise ValueError(f"reward model {path_or_alias!r}: {arch} has {self.model.config.num_labels} "
                                 "labels; a reward model must have one (num_labels=1)")
            if device is not None:
                self.model.to(device)
        self.model.eval().requires_grad_(False)  # dropout off; never trained

    # --- text -> token ids ---------------------------------------------------------------------------

    def render(self, prompt, answer):
        """The text the reward model reads: the conversation plus the answer as the assistant turn."""
        if not isinstance(answer, str):
            raise TypeError(f"an answer must be a string, got {type(answer).__name__}")
        msgs = _as_messages(prompt) + [{"role": "assistant", "content": answer}]
        return self.tokenizer.apply_chat_template(msgs, tokenize=False)

    def encode(self, prompts, answers):
        """Token ids (list of N lists of int), exactly one BOS when the model uses one, at most max_len."""
        if len(prompts) != len(answers):
            raise ValueError(f"{len(prompts)} prompts but {len(answers)} answers")
        texts = [self.render(p, a) for p, a in zip(prompts, answers)]
        out = []
        for ids in self.tokenizer(texts, add_special_tokens=False)["input_ids"]:
            ids = list(ids)
            if self.bos_id is not None and ids[:1] != [self.bos_id]:
                ids = [self.bos_id] + ids
            while len(ids) > 1 and ids[0] == ids[1] == self.tokenizer.bos_token_id:
                ids = ids[1:]  # a template that emits its own BOS twice: keep one
            out.append(ids[:self.max_len])
        return out

    # --- scoring -------------------------------------------------------------------------------------

    @torch.no_grad()
    def score_ids(self, ids):
        """Scores [N] (fp32, CPU) of N token-id lists, each scored at its own last token.

        Rows are sorted by length (longest first, so an out-of-memory shows on the first batch) and cut
        into micro-batches of `batch_size`, right-padded; the results come back in input order.
        A sharded model (FSDP2, several ranks) gathers its weights in every forward, a collective: every
        rank must call this, and the ranks agree on the number of forwards (a rank with fewer rows, or
        none, runs one-token forwards to match). Its full weights are released afterwards.
        """
        n = len(ids)
        if any(len(r) == 0 for r in ids):
            raise ValueError("an empty token sequence cannot be scored")
        order = sorted(range(n), key=lambda i: -len(ids[i]))
        scores = torch.empty(n, dtype=torch.float32)
        device = next(self.model.parameters()).device
        forwards = -(-n // self.batch_size)
        sharded = self.backend == "rlmt" and dist.is_sharded(self.model)
        if sharded:
            forwards = int(dist.all_reduce_max(torch.tensor(forwards, device=device)))
        for k in range(forwards):
            rows = order[k * self.batch_size:(k + 1) * self.batch_size]
            if rows:
                scores[rows] = self._forward([ids[i] for i in rows], device).float().cpu()
            else:
                self._forward([[self.pad_id]], device)  # joins the other ranks' gathers
        if sharded:
            dist.reshard(self.model)
        return scores

    def _forward(self, rows, device):
        """rows: B lists of ids -> [B] scores at each row's last real token."""
        lengths = torch.tensor([len(r) for r in rows])
        T = int(lengths.max())
        pad = self.pad_id
        if self.backend == "transformers":
            # HF picks "the rightmost token that is not the pad id". Pad with an id that no row holds, so
            # that pick is exactly the last real token (a row ending in EOS == pad would lose its EOS).
            used = {t for r in rows for t in r}
            vocab = self.model.get_input_embeddings().num_embeddings
            pad = next(t for t in itertools.chain([self.pad_id], range(vocab)) if t not in used and t < vocab)
        input_ids = torch.full((len(rows), T), pad, dtype=torch.long)
        for b, r in enumerate(rows):
            input_ids[b, :len(r)] = torch.tensor(r)
        attention_mask = (torch.arange(T)[None] < lengths[:, None]).long()  # [B, T], 1 = token
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        if self.backend == "rlmt":
            # Right padding comes after every real token, so plain causal attention never lets a real token
            # see it and positions count from 0 as they would alone: no mask needed, and without one
            # attention runs the flash kernel instead of the masked one.
            per_token = self.model(input_ids)  # [B, T]
            return per_token[torch.arange(len(rows), device=device), last_token_index(attention_mask)]
        saved = self.model.config.pad_token_id
        self.model.config.pad_token_id = pad
        try:
            return self.model(input_ids=input_ids, attention_mask=attention_mask).logits[:, 0]
        finally:
            self.model.config.pad_token_id = saved

    def score(self, prompts, answers):
        """Rewards [N] (fp32, CPU) for N (prompt, answer) pairs; NaN or inf raises, naming the sample.

        prompts: the original user conversations (message lists) or strings (one user message each);
        answers: the answer strings only (no thought).
        """
        if len(prompts) == 0 and len(answers) == 0:
            return self.score_ids([])  # a sharded model's other ranks may be scoring: join them
        return check_finite(self.score_ids(self.encode(prompts, answers)), prompts, "reward model score")


# --- rule rewards --------------------------------------------------------------------------------------

class RewardFnError(RuntimeError):
    """A --reward-fn raised. `spec` names it, `step` is the step it failed at (set by rollout.on_policy;
    None outside a training step), the original exception is __cause__ with its traceback."""

    def __init__(self, spec, error):
        super().__init__(f"{type(error).__name__}: {error}")
        self.spec, self.step = spec, None


def load_reward_fn(spec):
    """A rule reward from "package.module:function" or "path/to/file.py:function".

    The function is called as `function(prompts: list[str], answers: list[str]) -> list[float]` with the
    last user turns and the answers; the returned callable checks its output (length N, real numbers).
    """
    if not isinstance(spec, str) or ":" not in spec or not all(spec.rpartition(":")[::2]):
        raise ValueError(f"reward function {spec!r}: expected 'module:function' or 'path/to/file.py:function'")
    where, _, fname = spec.rpartition(":")  # rpartition: a Windows path keeps its drive colon
    if where.endswith(".py") or os.sep in where or "/" in where:
        if not os.path.isfile(where):
            raise FileNotFoundError(f"reward function {spec!r}: no such file {where!r}")
        name = "rlmt_reward_" + os.path.splitext(os.path.basename(where))[0]
        mod_spec = importlib.util.spec_from_file_location(name, where)
        module = importlib.util.module_from_spec(mod_spec)
        sys.modules[name] = module  # as `import` would: pickling and dataclasses look the module up
        mod_spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(where)
        except ModuleNotFoundError as e:
            if e.name == where or where.startswith(f"{e.name}."):  # the module itself, not one it imports
                raise ModuleNotFoundError(f"reward function {spec!r}: no module named {where!r} "
                                          "(is it on PYTHONPATH?)") from None
            raise
    fn = getattr(module, fname, None)
    if not callable(fn):
        raise AttributeError(f"reward function {spec!r}: {where} has no function {fname!r}")

    def reward_fn(prompts, answers):
        try:
            out = fn(list(prompts), list(answers))
        except Exception as e:  # the user's code failed: say whose, keep the traceback (preflight.reward_fn_crash)
            raise RewardFnError(spec, e) from e
        if isinstance(out, torch.Tensor) or hasattr(out, "tolist"):
            out = out.tolist()
        if not isinstance(out, (list, tuple)) or len(out) != len(answers):
            got = f"{len(out)} values" if isinstance(out, (list, tuple)) else type(out).__name__
            raise ValueError(f"reward function {spec!r} returned {got} for {len(answers)} answers")
        for i, v in enumerate(out):
            if isinstance(v, str) or not isinstance(v, numbers.Real):
                raise TypeError(f"reward function {spec!r}: value {i} is {v!r}, not a number")
        return [float(v) for v in out]

    reward_fn.spec = spec
    return reward_fn


def score_all(rm, reward_fn, prompts, answers):
    """Rewards [N] (fp32, CPU): the reward model's score, the rule reward, or their sum.

    rm: a RewardModel or None; reward_fn: from load_reward_fn (or any callable of the same signature) or
    None; prompts: message lists or strings; answers: strings.
    """
    if rm is None and reward_fn is None:
        raise ValueError("no reward: give a reward model, a reward function, or both")
    if len(prompts) != len(answers):
        raise ValueError(f"{len(prompts)} prompts but {len(answers)} answers")
    total = torch.zeros(len(answers))
    if rm is not None:
        total += rm.score(prompts, answers)
    if reward_fn is not None:
        users = [p if isinstance(p, str) else chat.user_turn(p) for p in prompts]
        rule = reward_fn(users, list(answers))
        if len(rule) != len(answers):
            raise ValueError(f"the reward function returned {len(rule)} values for {len(answers)} answers")
        total += check_finite(torch.tensor([float(v) for v in rule], dtype=torch.float32), prompts, "rule reward")
    return check_finite(total, prompts, "reward")
