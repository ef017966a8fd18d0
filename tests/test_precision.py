"""Precision: fp32 master weights, gradients and AdamW state with bf16 compute (rlmt.dist.shard), exports in
the checkpoint's dtype, and optimizer steps skipped on a non-finite gradient norm (rlmt.optim)."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from conftest import assert_same_update, run_script
from rlmt import optim, tiny


@pytest.fixture(scope="module")
def bf16_qwen(tmp_path_factory, qwen_tokenizer):
    """A Qwen2 checkpoint saved in bf16, like the paper's models (tied embeddings: every row of the
    embedding gets a gradient through the head, so every weight can move in one step)."""
    path = str(tmp_path_factory.mktemp("bf16") / "qwen-bf16")
    tiny.build_checkpoint(path, family="qwen", tokenizer=qwen_tokenizer, dtype="bfloat16")
    return path


def grpo_args(model, rm, data, out, *extra):
    return ["--model", model, "--reward-model", rm, "--data", data, "--out", out, "--prompts-per-step", 2,
            "--group-size", 4, "--micro-batch-size", 2, "--max-new-tokens", 12, "--max-prompt-len", 64,
            "--eval-every", 0, "--template", "chat", *extra]


def training_state(out, tmp_path):
    """OUT/latest/state's sharded checkpoint as one plain dict {"policy": {"model": …, "optim": …}}."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    dst = str(tmp_path / "state.pt")
    dcp_to_torch_save(os.path.join(out, "latest", "state", "sharded"), dst)
    return torch.load(dst, weights_only=False)


def metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_bf16_compute_moves_every_fp32_master(bf16_qwen, qwen_rm_dir, rl_prompts, tmp_path):
    """The paper's lr on bf16 compute: one optimizer step moves >= 99% of the weights, because they are
    stored in fp32 (an Adam step of ~1e-6 is below half a bf16 ulp of almost every weight: a bf16-stored
    policy moved 0.5% of them). The state holds fp32 masters and fp32 AdamW moments; the export keeps the
    checkpoint's bf16."""
    out = str(tmp_path / "run")
    run_script("train_grpo.py", *grpo_args(bf16_qwen, qwen_rm_dir, rl_prompts, out, "--dtype", "bfloat16",
                                           "--lr", 1e-6, "--steps", 1, "--save-every", 1))
    state = training_state(out, tmp_path)["policy"]
    init = load_file(os.path.join(bf16_qwen, "model.safetensors"))
    masters = {k: v for k, v in state["model"].items() if k in init}  # the tied lm_head is embed_tokens
    assert masters.keys() == init.keys() and all(v.dtype == torch.float32 for v in masters.values())
    changed = sum(int((masters[k] != init[k].float()).sum()) for k in init)
    total = sum(v.numel() for v in init.values())
    assert changed / total >= 0.99, f"{changed} of {total} weights moved"
    moments = state["optim"]["state"]
    assert moments.keys() >= init.keys()
    assert all(s[m].dtype == torch.float32 for s in moments.values() for m in ("exp_avg", "exp_avg_sq"))
    with open(os.path.join(out, "latest", "policy", "config.json")) as f:
        assert json.load(f)["dtype"] == "bfloat16"
    assert all(v.dtype == torch.bfloat16 for v in load_file(os.path.join(out, "latest", "policy", "model.safetensors")).values())
    # the sampler decoded a bf16 copy of the same masters: its log-probs agree with the trainer's to bf16's
    # resolution (measured 3e-4 to 3e-3 mean absolute here; an fp32 policy agrees to ~4e-7)
    row = metrics(out)[0]
    assert row["mismatch_logp_diff_mean"] < 2e-2 and row["skipped_steps"] == 0


def test_bf16_two_ranks_and_resume_equal_one_process(llama_dir, tmp_path):
    """bf16 compute, fp32 masters: torchrun --nproc_per_node 2 (gloo), and one step + resume + one step,
    each == one process after two SFT steps.
    Each micro-batch is the same bf16 computation in both runs; only the fp32 reduction order differs.
    Adam's first steps move a weight by about ±lr whatever its gradient's size, so the weights are compared
    through the update, relative to its norm: a rank that trained on its own half of the batch would be off
    by tens of percent. The gradient norm (which Adam's scale invariance hides) must agree to bf16 resolution."""
    import random

    from rlmt import demo
    rng = random.Random(0)
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps({"messages": demo.sft_conversation(rng)}) + "\n" for _ in range(8)))
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    common = ["--model", llama_dir, "--data", str(data), "--batch-size", 4, "--micro-batch-size", 2, "--lr", 1e-4,
              "--max-len", 128, "--steps", 2, "--warmup", 0, "--dtype", "bfloat16", "--save-dtype", "float32"]
    run_script("train_sft.py", *common, "--out", one)
    run_script("train_sft.py", *common, "--out", two, nproc=2)
    for x, y in zip(metrics(one), metrics(two)):
        for k in ("loss", "grad_norm"):  # bf16 carries 8 significant bits: 2^-8 ≈ 0.4%
            assert x[k] == pytest.approx(y[k], rel=1e-2), (x["step"], k)
    w0 = load_file(os.path.join(llama_dir, "model.safetensors"))
    wa = load_file(os.path.join(one, "latest", "policy", "model.safetensors"))
    wb = load_file(os.path.join(two, "latest", "policy", "model.safetensors"))
    assert all(v.dtype == torch.float32 for v in wa.values())  # --save-dtype float32: the masters themselves
    assert_same_update(w0, wa, wb, rel=0.05)
    # resume from the fp32 masters and moments: the same two steps, to the last bit
    part = str(tmp_path / "part")
    run_script("train_sft.py", *common, "--out", part, "--stop-after", 1)
    run_script("train_sft.py", *common, "--out", part, "--resume", "auto")
    wc = load_file(os.path.join(part, "latest", "policy", "model.safetensors"))
    assert all(torch.equal(wa[k], wc[k]) for k in wa)


def test_a_non_finite_gradient_skips_the_step():
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    model(torch.ones(1, 3)).sum().backward()
    model.weight.grad[0, 0] = float("nan")
    norm, stepped = optim.step(model, opt, 1.0)
    assert not stepped and torch.isnan(norm)
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))  # weights untouched
    assert not opt.state and all(p.grad is None for p in model.parameters())  # no Adam moment, grads cleared
    model(torch.ones(1, 3)).sum().backward()
    norm, stepped = optim.step(model, opt, 1.0)
    assert stepped and torch.isfinite(norm) and not torch.equal(before[0], model.weight)


def test_skipped_steps_stop_the_run_after_the_limit_in_a_row(capsys):
    skipped = optim.SkippedSteps(limit=3)
    for step, ok in enumerate([False, False, True, False, False], start=1):
        skipped.update(ok, step, torch.tensor(float("nan")))
        skipped.check(step)  # never three in a row: no exit
    assert skipped.total == 4 and skipped.in_a_row == 2
    assert "warning: step 5: gradient norm nan, optimizer step skipped" in capsys.readouterr().err
    skipped.update(False, 6, torch.tensor(float("inf")))
    with pytest.raises(SystemExit, match="step 6: 3 optimizer steps in a row skipped .* before step 4"):
        skipped.check(6)


def test_a_diverged_run_stops_with_a_message(llama_dir, tmp_path):
    """lr 1e30: step 1 throws the weights to ~1e30, every later gradient is NaN. Those steps are skipped
    and logged, and the run stops after --max-skipped-steps of them with one message, no traceback."""
    import random

    from rlmt import demo
    rng = random.Random(1)
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps({"messages": demo.sft_conversation(rng)}) + "\n" for _ in range(4)))
    out = str(tmp_path / "nan")
    r = run_script("train_sft.py", "--model", llama_dir, "--data", str(data), "--out", out, "--batch-size", 4,
                   "--micro-batch-size", 4, "--lr", 1e30, "--warmup", 0, "--steps", 10, "--max-skipped-steps", 3,
                   check=False)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "step 4: 3 optimizer steps in a row skipped for a non-finite gradient norm" in r.stderr
    rows = metrics(out)
    assert [m["skipped_steps"] for m in rows] == [0, 1, 2, 3]
    assert rows[0]["grad_norm"] > 0 and all(m["grad_norm"] != m["grad_norm"] for m in rows[1:])  # NaN


def test_bad_precision_flags(llama_dir, tmp_path):
    r = run_script("train_sft.py", "--model", llama_dir, "--data", "x.jsonl", "--max-skipped-steps", 0, check=False)
    assert r.returncode == 2 and "--max-skipped-steps: must be at least 1, got 0" in r.stderr
    r = run_script("train_grpo.py", "--model", llama_dir, "--data", "x.jsonl", "--dtype", "float16", check=False)
    assert r.returncode == 2 and "--dtype: invalid choice: 'float16'" in r.stderr
