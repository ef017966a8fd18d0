"""Reward-model scoring against transformers run one sample at a time, batching / ordering / padding
invariance, BOS and truncation, the transformers fallback, NaN errors, rule rewards and their sum."""

import pytest
import torch
import transformers

from rlmt import reward as R

PROMPTS = [
    [{"role": "user", "content": "Write a poem about the sea."}],
    "Name three colors.",  # a plain string is one user message
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Why is the sky blue?"}],
    [{"role": "user", "content": "a dog and a cat"}],
    "What is one plus one? Please explain the step.",
]
ANSWERS = ["The sea is blue and the light is good.", "red blue green", "because of light.", "yes",
           "two. " * 20]


def _messages(prompt, answer):
    user = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    return user + [{"role": "assistant", "content": answer}]


def hf_reference(path, prompts, answers, max_len=None):
    """transformers' own pipeline, one sample at a time, no padding: (scores [N], token id lists).

    apply_chat_template(tokenize=True) adds no special tokens of its own, so the BOS is the template's.
    The config's pad id is cleared: with no padding HF then scores the last token, which is what rlmt
    does from the mask (with pad == EOS, HF would skip the template's closing EOS)."""
    tok = transformers.AutoTokenizer.from_pretrained(path)
    ref = transformers.AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32).eval()
    ref.config.pad_token_id = None
    scores, all_ids = [], []
    with torch.no_grad():
        for p, a in zip(prompts, answers):
            ids = list(tok.apply_chat_template(_messages(p, a), tokenize=True, return_dict=True)["input_ids"])
            ids = ids[:max_len] if max_len else ids
            scores.append(ref(input_ids=torch.tensor([ids])).logits[0, 0])
            all_ids.append(ids)
    return torch.stack(scores), all_ids


@pytest.fixture(scope="module")
def rms(llama_rm_dir, qwen_rm_dir):
    return {"llama": R.RewardModel(llama_rm_dir, batch_size=2), "qwen": R.RewardModel(qwen_rm_dir, batch_size=2)}


@pytest.mark.parametrize("family", ["llama", "qwen"])
def test_score_matches_transformers(family, rms, llama_rm_dir, qwen_rm_dir):
    rm = rms[family]
    assert rm.backend == "rlmt"
    want, want_ids = hf_reference(llama_rm_dir if family == "llama" else qwen_rm_dir, PROMPTS, ANSWERS)
    assert rm.encode(PROMPTS, ANSWERS) == want_ids
    got = rm.score(PROMPTS, ANSWERS)
    assert got.dtype == torch.float32 and got.shape == (5,)
    assert want.std() > 0.05  # the samples really score differently
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_llama_rendering_by_hand(rms):
    text = rms["llama"].render(PROMPTS[0], ANSWERS[0])
    assert text == ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nWrite a poem about the sea."
                    "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
                    "The sea is blue and the light is good.<|eot_id|>")


@pytest.mark.parametrize("family", ["llama", "qwen"])
def test_batch_size_order_and_padding_side(family, rms):
    rm = rms[family]
    results = []
    try:
        for bs in (1, 3, len(PROMPTS)):
            rm.batch_size = bs
            results.append(rm.score(PROMPTS, ANSWERS))
    finally:
        rm.batch_size = 2
    for r in results[1:]:
        torch.testing.assert_close(r, results[0], atol=1e-5, rtol=1e-5)
    perm = [3, 0, 4, 2, 1]
    shuffled = rm.score([PROMPTS[i] for i in perm], [ANSWERS[i] for i in perm])
    torch.testing.assert_close(shuffled, results[0][perm], atol=1e-5, rtol=1e-5)
    # A left-padded batch through the same model, read at the last token of the mask, agrees too.
    ids = rm.encode(PROMPTS, ANSWERS)
    T = max(map(len, ids))
    input_ids = torch.full((len(ids), T), rm.pad_id)
    mask = torch.zeros(len(ids), T, dtype=torch.long)
    for b, r in enumerate(ids):
        input_ids[b, T - len(r):], mask[b, T - len(r):] = torch.tensor(r), 1
    with torch.no_grad():
        per_token = rm.model(input_ids, mask)
    left = per_token[torch.arange(len(ids)), R.last_token_index(mask)]
    torch.testing.assert_close(left, results[0], atol=1e-5, rtol=1e-5)


def test_last_token_index_from_mask():
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1]])
    assert R.last_token_index(mask).tolist() == [2, 4, 0, 4]


def test_exactly_one_bos(rms, llama_tokenizer, llama_rm_dir, tmp_path):
    bos = llama_tokenizer.bos_token_id
    for ids in rms["llama"].encode(PROMPTS, ANSWERS):
        assert ids[0] == bos and ids.count(bos) == 1
    assert all(bos is None or bos not in ids for ids in rms["qwen"].encode(PROMPTS, ANSWERS))  # Qwen: none
    # A template without the BOS, on a tokenizer that prepends one to plain encodes: one is prepended.
    d = _copy_rm(llama_rm_dir, tmp_path / "nobos")
    tok = transformers.AutoTokenizer.from_pretrained(llama_rm_dir)
    tok.chat_template = tok.chat_template.replace("{{- bos_token }}", "")
    tok.save_pretrained(d)
    rm = R.RewardModel(d)
    assert not rm.render(PROMPTS[0], "x").startswith("<|begin_of_text|>")
    for ids, want in zip(rm.encode(PROMPTS, ANSWERS), rms["llama"].encode(PROMPTS, ANSWERS)):
        assert ids == want


def test_right_truncation(llama_rm_dir, rms):
    long = "the cat and the dog. " * 60
    full = rms["llama"].encode([PROMPTS[0]], [long])[0]
    assert len(full) > 100
    rm = R.RewardModel(llama_rm_dir, max_len=64)
    ids = rm.encode([PROMPTS[0], PROMPTS[1]], [long, "red"])
    assert ids[0] == full[:64] and len(ids[1]) < 64  # the first max_len tokens; short rows untouched
    want, want_ids = hf_reference(llama_rm_dir, [PROMPTS[0], PROMPTS[1]], [long, "red"], max_len=64)
    assert want_ids == ids
    torch.testing.assert_close(rm.score([PROMPTS[0], PROMPTS[1]], [long, "red"]), want, atol=1e-4, rtol=1e-4)


def test_transformers_fallback(gpt2_rm_dir):
    rm = R.RewardModel(gpt2_rm_dir, batch_size=2)
    assert rm.backend == "transformers" and isinstance(rm.model, transformers.PreTrainedModel)
    assert not rm.model.training
    want, want_ids = hf_reference(gpt2_rm_dir, PROMPTS, ANSWERS)
    assert rm.encode(PROMPTS, ANSWERS) == want_ids
    assert want.std() > 0.05
    torch.testing.assert_close(rm.score(PROMPTS, ANSWERS), want, atol=1e-4, rtol=1e-4)
    rm.batch_size = 1
    torch.testing.assert_close(rm.score(PROMPTS, ANSWERS), want, atol=1e-4, rtol=1e-4)
    # pad == EOS in the config, and every row ends in EOS: still scored at that last token, not before it.
    rm.model.config.pad_token_id = rm.tokenizer.eos_token_id
    rm.batch_size = 5
    assert all(ids[-1] == rm.tokenizer.eos_token_id for ids in want_ids)
    torch.testing.assert_close(rm.score(PROMPTS, ANSWERS), want, atol=1e-4, rtol=1e-4)
    assert rm.model.config.pad_token_id == rm.tokenizer.eos_token_id  # restored after each forward


def _copy_rm(src, dst):
    import shutil
    dst.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(f"{src}/{name}", dst / name)
    return str(dst)


def test_clear_errors(llama_rm_dir, llama_dir, llama_base_tokenizer, tmp_path, rms):
    d = _copy_rm(llama_rm_dir, tmp_path / "notemplate")
    llama_base_tokenizer.save_pretrained(d)
    with pytest.raises(ValueError, match="no chat template"):
        R.RewardModel(d)
    with pytest.raises(ValueError, match="not a reward model"):
        R.RewardModel(llama_dir)
    with pytest.raises(FileNotFoundError, match="no such folder"):
        R.RewardModel(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="2 prompts but 1 answers"):
        rms["llama"].score(PROMPTS[:2], ANSWERS[:1])
    with pytest.raises(TypeError, match="prompt must be"):
        rms["llama"].score([42], ["x"])
    assert rms["llama"].score([], []).shape == (0,)


def test_nan_reward_names_the_sample(rms, monkeypatch):
    rewards = torch.tensor([0.1, 0.2, 0.3, float("nan"), float("inf")])
    prompts = ["p0", "p1", "p2", [{"role": "user", "content": "x" * 100}], "p4"]
    with pytest.raises(ValueError) as e:
        R.check_finite(rewards, prompts)
    assert str(e.value).startswith(f"reward for sample 3 is nan (prompt: '{'x' * 60}…')")
    assert "1 more" in str(e.value)
    with pytest.raises(ValueError, match="reward for sample 1 is inf$"):
        R.check_finite(torch.tensor([0.0, float("inf")]))
    rm = rms["qwen"]
    monkeypatch.setattr(rm, "score_ids", lambda ids: torch.tensor([0.0, float("-inf"), 1.0, 2.0, 3.0]))
    with pytest.raises(ValueError, match=r"reward model score for sample 1 is -inf \(prompt: 'Name three colors.'\)"):
        rm.score(PROMPTS, ANSWERS)


RULES = '''
def length_reward(prompts, answers):
    return [len(a) / 10 for a in answers]

def record(prompts, answers):
    record.seen = (prompts, answers)
    return [1.0] * len(answers)

def too_short(prompts, answers):
    return [1.0]

def not_numbers(prompts, answers):
    return ["1.0"] * len(answers)

def nan_reward(prompts, answers):
    return [0.0, float("nan")] + [0.0] * (len(answers) - 2)

NOT_A_FUNCTION = 3
'''


@pytest.fixture
def rules_file(tmp_path):
    path = tmp_path / "my_rules.py"
    path.write_text(RULES)
    return path


def test_rule_reward_from_file_and_module(rules_file, monkeypatch):
    fn = R.load_reward_fn(f"{rules_file}:length_reward")
    assert fn(["q", "q"], ["abc", "abcdefghij"]) == [0.3, 1.0]
    monkeypatch.syspath_prepend(str(rules_file.parent))
    fn = R.load_reward_fn("my_rules:length_reward")
    assert fn(["q"], ["abcde"]) == [0.5]


def test_rule_reward_errors(rules_file, tmp_path, monkeypatch):
    for bad in ("no_colon", ":f", "my_rules:", f"{rules_file}"):
        with pytest.raises(ValueError, match="expected 'module:function'"):
            R.load_reward_fn(bad)
    with pytest.raises(FileNotFoundError, match="no such file"):
        R.load_reward_fn(f"{tmp_path}/nope.py:f")
    with pytest.raises(ModuleNotFoundError, match="no module named 'surely_not_a_module_xyz'"):
        R.load_reward_fn("surely_not_a_module_xyz:f")
    (tmp_path / "imports_missing.py").write_text("import surely_not_a_module_abc\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModuleNotFoundError, match="surely_not_a_module_abc"):  # the real cause, not ours
        R.load_reward_fn("imports_missing:f")
    for name in ("missing", "NOT_A_FUNCTION"):
        with pytest.raises(AttributeError, match=f"has no function '{name}'"):
            R.load_reward_fn(f"{rules_file}:{name}")
    with pytest.raises(ValueError, match="returned 1 values for 2 answers"):
        R.load_reward_fn(f"{rules_file}:too_short")(["a", "b"], ["a", "b"])
    with pytest.raises(TypeError, match="value 0 is '1.0', not a number"):
        R.load_reward_fn(f"{rules_file}:not_numbers")(["a"], ["a"])


def test_score_all(rms, rules_file):
    rm = rms["llama"]
    model_only = rm.score(PROMPTS, ANSWERS)
    torch.testing.assert_close(R.score_all(rm, None, PROMPTS, ANSWERS), model_only)
    length = R.load_reward_fn(f"{rules_file}:length_reward")
    rule = torch.tensor([len(a) / 10 for a in ANSWERS])
    torch.testing.assert_close(R.score_all(None, length, PROMPTS, ANSWERS), rule)
    torch.testing.assert_close(R.score_all(rm, length, PROMPTS, ANSWERS), model_only + rule)
    # The rule function sees the last user turn as a string and the answers, in order.
    record = R.load_reward_fn(f"{rules_file}:record")
    R.score_all(None, record, PROMPTS, ANSWERS)
    import sys
    seen = sys.modules["rlmt_reward_my_rules"].record.seen
    assert seen == (["Write a poem about the sea.", "Name three colors.", "Why is the sky blue?",
                     "a dog and a cat", "What is one plus one? Please explain the step."], ANSWERS)
    with pytest.raises(ValueError, match="rule reward for sample 1 is nan"):
        R.score_all(rm, R.load_reward_fn(f"{rules_file}:nan_reward"), PROMPTS, ANSWERS)
    with pytest.raises(ValueError, match="no reward"):
        R.score_all(None, None, PROMPTS, ANSWERS)
    with pytest.raises(ValueError, match="5 prompts but 4 answers"):
        R.score_all(rm, None, PROMPTS, ANSWERS[:4])
