"""What a run leaves to read: the reward-curve PNG, TensorBoard events, Weights & Biases calls, and the
clear stops (a --reward-fn that raises, an --out that is a file)."""

import argparse
import json
import os
import sys
import types

import pytest

from conftest import run_script
from rlmt import cli, log, preflight, reward


def write_metrics(out, rows):
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "metrics.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


RISING = [{"step": s, "reward_mean": s / 20, "format_rate": 0.5} for s in range(1, 21)]


def test_reward_curve_png_shows_the_curve(tmp_path):
    image = pytest.importorskip("matplotlib.image")
    out = str(tmp_path)
    write_metrics(out, RISING)
    path = log.plot_rewards(out)
    assert path == os.path.join(out, "reward_curve.png") and os.path.getsize(path) > 0
    px = image.imread(path)[..., :3]  # [H, W, RGB] floats in [0, 1]
    assert px.shape == (350, 600, 3)  # figsize (6, 3.5) at dpi 100
    assert (px < 0.9).any(axis=-1).mean() > 0.01  # not blank: axes, text and lines are drawn
    # matplotlib's first colour (C0, #1f77b4) is the reward_mean line: its pixels are there, and they rise
    blue = (abs(px[..., 0] - 0x1f / 255) < 0.08) & (abs(px[..., 1] - 0x77 / 255) < 0.08) & \
        (abs(px[..., 2] - 0xb4 / 255) < 0.08)
    assert blue.sum() > 200
    rows, cols = blue.nonzero()
    left, right = rows[cols < cols.min() + 40].mean(), rows[cols > cols.max() - 40].mean()
    assert right < left - 50  # image rows count down: a rising curve ends higher up than it starts


def test_tensorboard_scalars_read_back(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    out = str(tmp_path)
    tb = log.tensorboard(out)
    assert tb is not None
    for r in RISING[:3]:
        log.log_step(out, r["step"], {**{k: v for k, v in r.items() if k != "step"}, "kl": float("nan")}, tb=tb)
    tb.close()
    acc = EventAccumulator(os.path.join(out, "tb"))
    acc.Reload()
    assert set(acc.Tags()["scalars"]) == {"reward_mean", "format_rate"}  # NaN is left out, not logged
    got = [(e.step, e.value) for e in acc.Scalars("reward_mean")]
    assert got == [(1, pytest.approx(0.05)), (2, pytest.approx(0.1)), (3, pytest.approx(0.15))]
    assert [json.loads(line)["step"] for line in open(os.path.join(out, "metrics.jsonl"))] == [1, 2, 3]


class FakeWandb(types.ModuleType):
    """Records what rlmt calls: init(**kw), run.log(metrics, step), run.finish()."""

    def __init__(self):
        super().__init__("wandb")
        self.calls = []

    def init(self, **kw):
        self.calls.append(("init", kw))
        return self

    def log(self, metrics, step):
        self.calls.append(("log", metrics, step))

    def finish(self):
        self.calls.append(("finish",))


def test_wandb_logs_config_and_each_step(tmp_path, monkeypatch):
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    out = str(tmp_path / "run")
    os.makedirs(out)
    assert log.wandb(argparse.Namespace(wandb=None, out=out)) is None and fake.calls == []  # off by default
    args = argparse.Namespace(wandb="my-project", out=out, lr=1e-6)
    wb = log.wandb(args)
    log.log_step(out, 1, {"reward_mean": 0.5, "kl": float("inf")}, wb=wb)
    log.log_step(out, 2, {"reward_mean": 0.75}, wb=wb)
    wb.finish()
    (init, kw), *rest = fake.calls
    assert init == "init" and kw["project"] == "my-project" and kw["config"]["lr"] == 1e-6 and kw["name"] == "run"
    assert rest == [("log", {"reward_mean": 0.5}, 1), ("log", {"reward_mean": 0.75}, 2), ("finish",)]


def parser_with_common_args():
    p = argparse.ArgumentParser()
    cli.add_common_args(p)
    return p


def test_wandb_missing_and_out_a_file_are_flag_errors(tmp_path, monkeypatch, capsys):
    p = parser_with_common_args()
    assert "Weights & Biases" in p.format_help()
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed: find_spec raises, import fails
    monkeypatch.setattr(preflight.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(SystemExit):
        preflight.check_outputs(p.parse_args(["--wandb", "proj", "--out", str(tmp_path)]), p)
    assert "--wandb needs wandb: pip install wandb" in capsys.readouterr().err
    a_file = tmp_path / "metrics.txt"
    a_file.write_text("")
    with pytest.raises(SystemExit):
        preflight.check_outputs(p.parse_args(["--out", str(a_file)]), p)
    assert f"--out {a_file} is a file" in capsys.readouterr().err
    preflight.check_outputs(p.parse_args(["--out", str(tmp_path / "new")]), p)  # a folder to come is fine


def test_out_a_file_stops_every_trainer(tmp_path):
    a_file = tmp_path / "taken"
    a_file.write_text("")
    for script in ("train_grpo.py", "train_ppo.py", "train_sft.py", "train_dpo.py"):
        r = run_script(script, "--out", a_file, check=False)
        assert r.returncode == 2 and f"--out {a_file} is a file" in r.stderr, (script, r.stderr[-500:])
        assert "Traceback" not in r.stderr


RAISES = '''
def boom(prompts, answers):
    raise KeyError("no gold answer for this prompt")
'''


def test_reward_fn_error_names_spec_step_and_log(tmp_path):
    """Called directly: the wrapper's error carries the spec, the crash line names spec, step and log file,
    and the log holds the user's own traceback."""
    path = tmp_path / "rules.py"
    path.write_text(RAISES)
    spec = f"{path}:boom"
    fn = reward.load_reward_fn(spec)
    with pytest.raises(reward.RewardFnError) as info:
        reward.score_all(None, fn, ["q"], ["a"])
    e = info.value
    assert e.spec == spec and isinstance(e.__cause__, KeyError)
    e.step = 7
    line = preflight.reward_fn_crash(str(tmp_path / "out"), e)
    err_log = tmp_path / "out" / "error.log"
    assert line == (f"error: reward function {spec!r} raised at step 7: KeyError: 'no gold answer for this prompt'"
                    f" (traceback in {err_log})")
    text = err_log.read_text()
    assert 'raise KeyError("no gold answer for this prompt")' in text and "RewardFnError" in text


def test_grpo_stops_with_one_line_when_the_reward_fn_raises(llama_dir, rl_prompts, tmp_path):
    path = tmp_path / "rules.py"
    path.write_text(RAISES)
    out = tmp_path / "run"
    r = run_script("train_grpo.py", "--model", llama_dir, "--reward-fn", f"{path}:boom", "--data", rl_prompts,
                   "--out", out, "--prompts-per-step", 2, "--group-size", 2, "--max-new-tokens", 4,
                   "--max-prompt-len", 64, "--save-every", 0, "--eval-every", 0, "--template", "chat",
                   "--steps", 2, check=False)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    last = r.stderr.strip().splitlines()[-1].removeprefix("[rank0]: ")  # torch.distributed's prefix
    assert last == (f"error: reward function '{path}:boom' raised at step 1: KeyError: 'no gold answer for this "
                    f"prompt' (traceback in {out / 'error.log'})")
    assert "no gold answer" in (out / "error.log").read_text()
