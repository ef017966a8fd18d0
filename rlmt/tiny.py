"""Tiny tokenizers and random checkpoints, built offline.

Tests, benchmarks and the `--demo` runs cannot download anything, so they build a byte-level BPE
tokenizer with `tokenizers` (trained in a second on a few hundred sentences) and random Llama / Qwen2
checkpoints with `transformers`, saved as ordinary HF folders. rlmt then loads them through its own
loading code, exactly as it loads a hub checkpoint.
"""

import json
import os

# The special tokens and chat templates of the two families, written in the same shape as the real ones
# (Llama 3.1 Instruct, Qwen2.5 Instruct), so template and EOS handling is tested on realistic strings.
LLAMA_SPECIAL = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                 "<|eot_id|>", "<|finetune_right_pad_id|>"]
QWEN_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

LLAMA_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)
QWEN_TEMPLATE = (
    "{%- if messages[0]['role'] != 'system' %}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

_WORDS = ("the a an of to and in is it that for on with as was be by this are or from at which have not "
          "think response answer question user assistant reasoning process plan here first then write "
          "story poem list three two one why how what when where who please explain short long good "
          "because so if yes no maybe sure step you I we they he she time day world water light sound "
          "color red blue green cat dog bird tree river city house book word number name people").split()


def corpus(n=400, seed=0):
    """Sentences for training a tiny tokenizer: common words, the template markers, some digits."""
    import random
    rng = random.Random(seed)
    lines = []
    for i in range(n):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(4, 14))]
        if i % 3 == 0:
            words = ["<think>"] + words[:5] + ["</think>", "<response>"] + words[5:] + ["</response>"]
        lines.append(" ".join(words) + rng.choice([".", "?", "!", f" {i}.", ":\n"]))
    lines.append("A conversation between User and Assistant. User: <query> </query> Assistant:")
    return lines


def build_tokenizer(out_dir, family="llama", chat_template=True, pad_token="default", vocab_size=384,
                    added_tokens=()):
    """Train a byte-level BPE tokenizer and save it as an HF tokenizer folder.

    family: "llama" (BOS prepended, end-of-turn <|eot_id|>) or "qwen" (no BOS, <|im_end|>).
    chat_template: False makes a base-model tokenizer with no template (for the Zero templates).
    pad_token: "default" (the family's: none for Llama, <|endoftext|> for Qwen), None, or a token.
    added_tokens: extra whole-word tokens (the demo makes <think> … </response> one id each).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    special = LLAMA_SPECIAL if family == "llama" else QWEN_SPECIAL
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus(), trainer)
    if added_tokens:
        from tokenizers import AddedToken
        tok.add_tokens([AddedToken(t, normalized=False) for t in added_tokens])
    if family == "llama":
        bos = "<|begin_of_text|>"
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))])
        kw = dict(bos_token=bos, eos_token="<|eot_id|>" if chat_template else "<|end_of_text|>")
    else:
        kw = dict(eos_token="<|im_end|>" if chat_template else "<|endoftext|>")
        if pad_token == "default":
            pad_token = "<|endoftext|>"
    if pad_token not in (None, "default"):
        kw["pad_token"] = pad_token
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **kw)
    if chat_template:
        fast.chat_template = LLAMA_TEMPLATE if family == "llama" else QWEN_TEMPLATE
    fast.save_pretrained(out_dir)
    return fast


def build_checkpoint(out_dir, family="llama", head="lm", tokenizer=None, seed=0, hidden_size=64,
                     num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128, vocab_size=None,
                     rope_scaling="llama3", tie_word_embeddings=None, max_position_embeddings=2048,
                     dtype="float32"):
    """Save a random Llama or Qwen2 checkpoint with transformers (the independent reference).

    head: "lm" (…ForCausalLM) or "score" (…ForSequenceClassification, num_labels 1, a reward model).
    Qwen2 defaults: q/k/v bias, tied embeddings and a vocab 16 rows larger than the tokenizer, like the
    real ones. Llama defaults: GQA, `llama3` rope scaling, untied embeddings.
    """
    import torch
    import transformers

    n_tok = len(tokenizer) if tokenizer is not None else 384
    if family == "llama":
        cfg = transformers.LlamaConfig(
            vocab_size=vocab_size or n_tok, hidden_size=hidden_size, intermediate_size=intermediate_size,
            num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
            max_position_embeddings=max_position_embeddings, rms_norm_eps=1e-5, rope_theta=500000.0,
            tie_word_embeddings=bool(tie_word_embeddings),
            rope_scaling=None if rope_scaling is None else {
                "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64})
    elif family == "qwen":
        cfg = transformers.Qwen2Config(
            vocab_size=vocab_size or n_tok + 16, hidden_size=hidden_size, intermediate_size=intermediate_size,
            num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
            max_position_embeddings=max_position_embeddings, rms_norm_eps=1e-6, rope_theta=1000000.0,
            tie_word_embeddings=True if tie_word_embeddings is None else tie_word_embeddings)
    else:
        raise ValueError(f"unknown family {family!r}")
    if tokenizer is not None:
        cfg.bos_token_id, cfg.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
        cfg.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    cls = transformers.AutoModelForCausalLM if head == "lm" else transformers.AutoModelForSequenceClassification
    if head != "lm":
        cfg.num_labels = 1
    torch.manual_seed(seed)
    model = cls.from_config(cfg).to(getattr(torch, dtype)).eval()
    with torch.no_grad():  # HF initializes with std 0.02; larger weights give less uniform, more testable logits
        for name, p in model.named_parameters():
            p.normal_(1.0 if "norm" in name else 0.0, 0.1)
    model.save_pretrained(out_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    with open(os.path.join(out_dir, "config.json")) as f:
        assert json.load(f)["architectures"], "transformers wrote no architecture"
    return model
