"""Templates, BOS / EOS, stop ids and padding on the real Llama 3 and Qwen3 vocabularies (the tokenizer
files only, from ../shared/data/tokenizers, see its README), not only on the tiny tokenizers the other
tests train."""

import copy
import json
import os
import shutil

import pytest

from rlmt import chat, data, reward

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENIZERS = os.path.join(ROOT, "..", "shared", "data", "tokenizers")
if not os.path.isdir(os.path.join(TOKENIZERS, "llama-3.2-base")) or not os.path.isdir(os.path.join(TOKENIZERS, "qwen3")):
    pytest.skip(f"no real tokenizers in {TOKENIZERS}", allow_module_level=True)

# Llama 3 special ids (the same in every Llama 3.x tokenizer)
BOS, END_OF_TEXT, EOM, EOT, PAD = 128000, 128001, 128008, 128009, 128004
# Qwen2 / 2.5 / 3
IM_START, IM_END, ENDOFTEXT = 151644, 151645, 151643

# Llama-3.1-Instruct's template without its tools and date header: what the instruct models render for
# plain chats (the BOS is in the template, as in Meta's).
LLAMA_31_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
# The same without the BOS in the template: the reward model has to add it (RewardModel.bos_id)
LLAMA_NO_BOS_TEMPLATE = LLAMA_31_TEMPLATE.removeprefix("{{ bos_token }}")

HI = [{"role": "user", "content": "Hi there"}]
TALK = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3+3?"}]


@pytest.fixture(scope="module")
def llama_base():
    return chat.load_tokenizer(os.path.join(TOKENIZERS, "llama-3.2-base"))


@pytest.fixture(scope="module")
def qwen3():
    return chat.load_tokenizer(os.path.join(TOKENIZERS, "qwen3"))


def with_template(tokenizer, template):
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = template
    return tok


@pytest.fixture(scope="module")
def llama_instruct(llama_base):
    return with_template(llama_base, LLAMA_31_TEMPLATE)


def test_special_tokens_and_stop_ids(llama_base, qwen3):
    assert (llama_base.bos_token_id, llama_base.eos_token_id, llama_base.pad_token_id) == (BOS, END_OF_TEXT, PAD)
    assert not llama_base.chat_template  # a base tokenizer
    # a Zero run on a base Llama may end its turn with <|eot_id|> though EOS is <|end_of_text|>: stop on all
    assert chat.stop_ids(llama_base) == [END_OF_TEXT, EOM, EOT]
    assert chat.pad_id(llama_base) == PAD
    assert qwen3.bos_token_id is None and qwen3.eos_token_id == IM_END and qwen3.chat_template
    assert chat.stop_ids(qwen3) == [ENDOFTEXT, IM_END]
    assert chat.pad_id(qwen3) == ENDOFTEXT


def test_pad_falls_back_to_eos(llama_base):
    tok = copy.deepcopy(llama_base)
    tok.pad_token = None
    assert tok.pad_token_id is None and chat.pad_id(tok) == END_OF_TEXT


def test_zero_on_the_base_tokenizer(llama_base):
    for template in ("zero", "zero-nothink"):
        text = chat.render(llama_base, HI, template)
        assert text.endswith("User: <query>Hi there</query>\nAssistant:") and "<|begin_of_text|>" not in text
        ids = chat.encode_prompt(llama_base, TALK, template)
        assert ids[0] == BOS and ids.count(BOS) == 1  # prepended once: the Zero text holds none
        assert llama_base.decode(ids[1:]) == chat.render(llama_base, TALK, template)  # text round-trips
    for template in ("chat", "chat-think", "think"):
        with pytest.raises(ValueError, match=f"--template {template} needs a chat template.*--template zero"):
            chat.encode_prompt(llama_base, HI, template)


def test_llama_instruct_templates(llama_instruct):
    header = "<|start_header_id|>assistant<|end_header_id|>\n\n"
    want = ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi there<|eot_id|>" + header)
    assert chat.render(llama_instruct, HI, "chat") == want
    assert chat.render(llama_instruct, HI, "chat-think") == want  # the warm-started model opens <think>
    assert chat.render(llama_instruct, HI, "think") == want + "<think>\n"
    for template in chat.TEMPLATES:
        ids = chat.encode_prompt(llama_instruct, TALK, template)
        assert ids[0] == BOS and ids.count(BOS) == 1, template
    ids = chat.encode_prompt(llama_instruct, HI, "chat")
    assert ids[-4:] == llama_instruct.encode(header, add_special_tokens=False)[-4:]
    assert EOT in ids and chat.stop_ids(llama_instruct) == [END_OF_TEXT, EOM, EOT]


def test_qwen3_templates(qwen3):
    want = "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n"
    assert chat.render(qwen3, HI, "chat") == want
    assert chat.render(qwen3, HI, "chat-think") == want
    assert chat.render(qwen3, HI, "think") == want + "<think>\n"
    text = chat.render(qwen3, TALK, "chat")
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>\n") and text.endswith(want[-24:])
    for template in chat.TEMPLATES:
        ids = chat.encode_prompt(qwen3, TALK, template)
        assert not template.startswith("zero") or ids[0] != IM_START  # no BOS anywhere: none added
        assert qwen3.decode(ids) == chat.render(qwen3, TALK, template)


def test_left_truncation_keeps_one_bos(llama_instruct, qwen3):
    rows = [{"messages": [{"role": "user", "content": "word " * 200}]}, {"messages": HI}]
    for template in ("chat", "zero"):
        n = len(chat.encode_prompt(llama_instruct, HI, template)) + 4  # the short prompt fits, the long one not
        (long, short), n_cut = data.encode_prompts(llama_instruct, rows, template, max_prompt_len=n)
        full = chat.encode_prompt(llama_instruct, rows[0]["messages"], template)
        assert n_cut == 1 and len(long) == n and long[0] == BOS and long.count(BOS) == 1
        assert long[1:] == full[-(n - 1):]  # the end of the prompt: the opened assistant turn survives
        assert short == chat.encode_prompt(llama_instruct, HI, template)
    (long, _), _ = data.encode_prompts(qwen3, rows, "chat", max_prompt_len=32)
    assert long == chat.encode_prompt(qwen3, rows[0]["messages"], "chat")[-32:]  # no BOS to keep


def reward_model_dir(tmp_path_factory, rm_dir, tokenizer_dir, template, name):
    """The tiny reward model's weights with a real tokenizer and `template`: enough to check encode()
    (its scores would index beyond the tiny vocabulary, so none are computed)."""
    out = tmp_path_factory.mktemp(name)
    for f in os.listdir(rm_dir):
        if f.endswith((".json", ".safetensors")) and not f.startswith(("tokenizer", "special_tokens", "vocab")):
            shutil.copy(os.path.join(rm_dir, f), out)
    for f in os.listdir(tokenizer_dir):
        shutil.copy(os.path.join(tokenizer_dir, f), out)
    if template is not None:
        path = os.path.join(out, "tokenizer_config.json")
        with open(path) as f:
            cfg = json.load(f)
        cfg["chat_template"] = template
        with open(path, "w") as f:
            json.dump(cfg, f)
    for f in os.listdir(out):  # a template file next to the config would win over ours
        if f.endswith(".jinja"):
            os.remove(os.path.join(out, f))
    return str(out)


@pytest.mark.parametrize("template", [LLAMA_31_TEMPLATE, LLAMA_NO_BOS_TEMPLATE], ids=["bos-in-template", "no-bos"])
def test_reward_model_renders_one_bos(template, llama_rm_dir, tmp_path_factory):
    folder = reward_model_dir(tmp_path_factory, llama_rm_dir, os.path.join(TOKENIZERS, "llama-3.2-base"), template,
                              "rm")
    rm = reward.RewardModel(folder)
    text = rm.render(TALK, "8")
    assert text.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n8<|eot_id|>")
    assert "<think>" not in text
    (ids,) = rm.encode([TALK], ["8"])
    assert ids[0] == BOS and ids.count(BOS) == 1 and ids[-1] == EOT  # scored at the end of the turn


def test_reward_model_refuses_the_base_tokenizer(llama_rm_dir, tmp_path_factory):
    folder = reward_model_dir(tmp_path_factory, llama_rm_dir, os.path.join(TOKENIZERS, "llama-3.2-base"), None,
                              "rm-base")
    with pytest.raises(ValueError, match="has no chat template"):
        reward.RewardModel(folder)


def test_qwen3_reward_rendering(qwen3):
    # Qwen3's own template gives the last assistant turn an empty thought; the reward model reads what its
    # template renders, and no BOS is added (the vocabulary has none)
    rm = reward.RewardModel.__new__(reward.RewardModel)
    rm.tokenizer, rm.bos_id, rm.max_len = qwen3, None, 10_000
    text = rm.render(HI, "Hello.")
    assert text == "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\nHello.<|im_end|>\n"
    (ids,) = rm.encode([HI], ["Hello."])
    assert ids[0] == IM_START and qwen3.decode(ids) == text
