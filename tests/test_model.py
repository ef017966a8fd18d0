"""rlmt.model against transformers (the independent reference) on tiny random checkpoints."""

import json
import os
import shutil

import pytest
import torch
import transformers

from rlmt import model as M
from rlmt import tiny
from conftest import assert_close_to_scale


def _batch(vocab, padding, B=3, T=80, seed=0, avoid=()):
    """Random ids with left or right padding; T=80 passes the llama3 scaling's original context (64)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (B, T), generator=g)
    for a in avoid:  # keep the pad id out of the content (HF finds the last token by searching for it)
        ids[ids == a] = (a + 1) % vocab
    am = torch.ones(B, T, dtype=torch.long)
    if padding == "left":
        am[0, :9], am[1, :2] = 0, 0
    elif padding == "right":
        am[0, 50:], am[2, 70:] = 0, 0
    return ids, am, (am.cumsum(-1) - 1).clamp(min=0)


def _hf(path, cls=transformers.AutoModelForCausalLM):
    return cls.from_pretrained(path, dtype=torch.float32).eval()


@pytest.mark.parametrize("family", ["llama", "qwen"])
@pytest.mark.parametrize("padding", ["none", "left", "right"])
def test_logits_match_transformers(family, padding, llama_dir, qwen_dir):
    path = llama_dir if family == "llama" else qwen_dir
    ours, ref = M.from_pretrained(path), _hf(path)
    assert ours.config.num_kv_heads < ours.config.num_heads  # GQA exercised
    assert ours.config.tie_word_embeddings == (family == "qwen")
    ids, am, pos = _batch(ref.config.vocab_size, padding)
    with torch.no_grad():
        a = ours(ids, am, pos)
        b = ref(input_ids=ids, attention_mask=am, position_ids=pos).logits
    valid = am.bool()
    assert_close_to_scale(a[valid], b[valid], 1e-5, "logits vs transformers")
    assert a.shape == (3, 80, ref.config.vocab_size)


def test_rope_scaling_is_applied(llama_dir):
    cfg = M.from_pretrained(llama_dir).config
    assert cfg.rope_scaling["rope_type"] == "llama3"
    plain = M.rope_inv_freq(M.Config(**{**cfg.__dict__, "rope_scaling": None}))
    scaled = M.rope_inv_freq(cfg)
    # head_dim 16, θ 5e5, original context 64, factor 8, low/high freq factors 1/4: wavelength 2π/f is
    # 6.3 for f[0] (< 64/4: kept), 32.4 for f[1] (between 16 and 64: ramped), > 64 for the rest (f / 8)
    assert scaled[0] == plain[0] and plain[1] / 8 < scaled[1] < plain[1]
    assert torch.allclose(scaled[2:], plain[2:] / 8)


def test_transformers_4_config_layout(llama_dir, tmp_path):
    """Hub checkpoints carry `rope_theta` and `rope_scaling` (4.x); transformers 5 writes
    `rope_parameters`. Both must give the same model."""
    old = tmp_path / "old"
    shutil.copytree(llama_dir, old)
    cfg = json.loads((old / "config.json").read_text())
    rope = cfg.pop("rope_parameters")
    cfg["rope_theta"] = rope.pop("rope_theta")
    cfg["rope_scaling"] = {**rope, "type": rope.pop("rope_type")}  # the oldest spelling
    (old / "config.json").write_text(json.dumps(cfg))
    a, b = M.from_pretrained(llama_dir), M.from_pretrained(str(old))
    assert a.config == b.config
    ids, am, pos = _batch(a.config.vocab_size, "none")
    with torch.no_grad():
        assert torch.equal(a(ids), b(ids))


@pytest.mark.parametrize("family", ["llama", "qwen"])
def test_reward_score_matches_sequence_classification(family, llama_rm_dir, qwen_rm_dir):
    path = llama_rm_dir if family == "llama" else qwen_rm_dir
    ours = M.from_pretrained(path)
    ref = _hf(path, transformers.AutoModelForSequenceClassification)
    assert ours.config.head == "score"
    ids, am, pos = _batch(ref.config.vocab_size, "right", avoid=(ref.config.pad_token_id,))
    ids[~am.bool()] = ref.config.pad_token_id
    with torch.no_grad():
        per_token = ours(ids, am, pos)
        b = ref(input_ids=ids, attention_mask=am).logits.squeeze(-1)
    last = am.sum(-1) - 1  # the last valid token, from the mask
    a = per_token[torch.arange(3), last]
    assert_close_to_scale(a, b, 1e-5, "scores vs transformers")


@pytest.mark.parametrize("family", ["llama", "qwen"])
def test_save_then_transformers_load(family, llama_dir, qwen_dir, tmp_path, llama_tokenizer):
    path = llama_dir if family == "llama" else qwen_dir
    ours = M.from_pretrained(path)
    out = M.save_pretrained(ours, str(tmp_path / "export"), tokenizer=llama_tokenizer)
    assert sorted(os.listdir(out))[:2] == ["chat_template.jinja", "config.json"]
    assert not any(".tmp-" in p for p in os.listdir(tmp_path))
    ref = _hf(out)
    ids, am, pos = _batch(ref.config.vocab_size, "left")
    with torch.no_grad():
        valid = am.bool()
        assert_close_to_scale(ours(ids, am, pos)[valid],
                              ref(input_ids=ids, attention_mask=am, position_ids=pos).logits[valid], 1e-5)
    again = M.from_pretrained(out)
    if family == "qwen":  # tied embeddings stay tied after load, save and load
        assert again.lm_head.weight is again.model.embed_tokens.weight
    for (n, p), (_, q) in zip(ours.state_dict().items(), again.state_dict().items()):
        assert torch.equal(p, q), n


def test_sharded_checkpoint_loads(llama_dir, tmp_path):
    ours = M.from_pretrained(llama_dir)
    out = M.save_pretrained(ours, str(tmp_path / "sharded"), max_shard_bytes=150_000)
    shards = sorted(p for p in os.listdir(out) if p.endswith(".safetensors"))
    assert len(shards) >= 2 and os.path.exists(os.path.join(out, "model.safetensors.index.json"))
    ids, _, _ = _batch(ours.config.vocab_size, "none")
    with torch.no_grad():
        want = ours(ids)
        assert torch.equal(M.from_pretrained(out)(ids), want)
        assert_close_to_scale(_hf(out)(input_ids=ids).logits, want, 1e-5, "logits vs transformers")


def test_save_overwrites_atomically(llama_dir, tmp_path):
    ours = M.from_pretrained(llama_dir)
    out = tmp_path / "ckpt"
    M.save_pretrained(ours, str(out))
    with torch.no_grad():
        ours.model.norm.weight.add_(1.0)
    M.save_pretrained(ours, str(out))
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]
    assert torch.equal(M.from_pretrained(str(out)).model.norm.weight, ours.model.norm.weight)


def test_critic_from_policy_and_saved_as_classifier(llama_dir, tmp_path):
    critic = M.from_pretrained(llama_dir, head="score")
    policy = M.from_pretrained(llama_dir)
    assert critic.config.head == "score" and critic.score.weight.shape == (1, 64)
    assert torch.equal(critic.model.layers[1].mlp.up_proj.weight, policy.model.layers[1].mlp.up_proj.weight)
    ids, am, pos = _batch(critic.config.vocab_size, "left")
    with torch.no_grad():
        values = critic(ids, am, pos)
    assert values.shape == (3, 80) and torch.isfinite(values).all()
    out = M.save_pretrained(critic, str(tmp_path / "critic"))
    ref = _hf(out, transformers.AutoModelForSequenceClassification)
    assert torch.equal(ref.score.weight, critic.score.weight)


def test_dtype_and_gradient_checkpointing(llama_dir):
    assert M.from_pretrained(llama_dir, dtype=torch.bfloat16).model.norm.weight.dtype == torch.bfloat16
    ids, am, pos = _batch(384, "left", T=24)
    grads = []
    for ckpt in (False, True):
        m = M.from_pretrained(llama_dir).train()
        m.gradient_checkpointing = ckpt
        m(ids, am, pos)[am.bool()].logsumexp(-1).sum().backward()
        grads.append(m.model.layers[0].self_attn.q_proj.weight.grad)
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_clear_errors(llama_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="no such folder"):
        M.from_pretrained(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="no config.json"):
        M.from_pretrained(str(tmp_path))
    bad = tmp_path / "gpt2"
    shutil.copytree(llama_dir, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["architectures"], cfg["model_type"] = ["GPT2LMHeadModel"], "gpt2"
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="'GPT2LMHeadModel'.*not supported.*LlamaForCausalLM"):
        M.from_pretrained(str(bad))
    cfg["architectures"], cfg["rope_parameters"] = ["LlamaForCausalLM"], {"rope_type": "yarn", "factor": 4.0}
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="rope type 'yarn'"):
        M.from_pretrained(str(bad))
    empty = tmp_path / "noweights"
    empty.mkdir()
    shutil.copy(os.path.join(llama_dir, "config.json"), empty / "config.json")
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        M.from_pretrained(str(empty))


def test_aliases_resolve_to_hub_ids():
    assert M.ALIASES["llama-3.1-8b"] == "meta-llama/Llama-3.1-8B"
    assert M.ALIASES["skywork-reward-llama-3.1-8b-v0.2"] == "Skywork/Skywork-Reward-Llama-3.1-8B-v0.2"
    with pytest.raises(FileNotFoundError, match="not a hub id or one of the aliases"):
        M.resolve_path("./missing-model")


def test_from_pretrained_mistral_and_untied_qwen(tmp_path, qwen_tokenizer):
    """Mistral-style configs load as Llama; a Qwen2 with untied embeddings (the 7B) loads too."""
    path = str(tmp_path / "qwen-untied")
    ref = tiny.build_checkpoint(path, "qwen", tokenizer=qwen_tokenizer, tie_word_embeddings=False, seed=3)
    assert M.from_pretrained(path).lm_head.weight is not M.from_pretrained(path).model.embed_tokens.weight
    cfg = transformers.MistralConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=1, sliding_window=None)
    torch.manual_seed(0)
    mistral = transformers.MistralForCausalLM(cfg).eval()
    mistral.save_pretrained(str(tmp_path / "mistral"))
    for ref, path in ((ref, path), (mistral, str(tmp_path / "mistral"))):
        ours = M.from_pretrained(path)
        ids, am, pos = _batch(ref.config.vocab_size, "left")
        with torch.no_grad():
            valid = am.bool()
            assert_close_to_scale(ours(ids, am, pos)[valid],
                                  ref(input_ids=ids, attention_mask=am, position_ids=pos).logits[valid], 1e-5)


def test_a_run_folder_resolves_to_its_newest_export(llama_dir, tmp_path):
    """`--model runs/grpo` (sample.py, eval.py, a warm start) reads OUT/latest/policy, the newest export."""
    import shutil
    step = tmp_path / "run" / "checkpoints" / "step-000003"
    shutil.copytree(llama_dir, step / "policy")
    os.symlink(os.path.join("checkpoints", "step-000003"), tmp_path / "run" / "latest")
    assert M.resolve_path(str(tmp_path / "run")) == str(tmp_path / "run" / "latest" / "policy")
    assert M.from_pretrained(str(tmp_path / "run")).config.vocab_size == M.from_pretrained(llama_dir).config.vocab_size
    assert M.resolve_path(llama_dir) == llama_dir  # a model folder is itself
