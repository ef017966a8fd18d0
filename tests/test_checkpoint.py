"""A long run survives: the per-step checkpoint layout (rlmt.checkpoint.save / find_resume) under faults.

- every filesystem operation of a save, failed in turn: the previous complete checkpoint still loads;
- train_grpo.py SIGKILLed at random moments (inside saves too) and relaunched with `--resume auto` until
  it finishes: each launch resumes from the last complete step, and the weights are the uninterrupted run's;
- SIGTERM: the step is saved, exit 0, and `--resume auto` continues to the same end;
- a `--resume` with no checkpoint, or a negative --keep-last, gets one clear message.
"""

import builtins
import io
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT, assert_close_to_scale
from rlmt import checkpoint, dist
from rlmt import model as M

# --- unit: fault injection ------------------------------------------------------------------------------


class Crash(Exception):
    """The injected failure: the process is taken to be dead from this operation on."""


class Faults:
    """Count the filesystem operations a save makes, and fail the k-th one and every one after it (a
    killed process does nothing more: no cleanup handler gets to tidy up). k None: count only."""

    def __init__(self, k=None):
        self.k, self.n, self.saved = k, 0, []

    def _wrap(self, fn, counts=lambda a, kw: True):
        def op(*a, **kw):
            if not counts(a, kw):
                return fn(*a, **kw)
            self.n += 1
            if self.k is not None and self.n > self.k:
                raise Crash(f"injected at operation {self.k + 1}: {getattr(fn, '__name__', fn)}")
            return fn(*a, **kw)
        return op

    def __enter__(self):
        import safetensors.torch
        import torch.distributed.checkpoint as dcp
        always = lambda a, kw: True  # noqa: E731
        targets = [(os, "rename", always), (os, "replace", always), (os, "remove", always), (os, "symlink", always),
                   (os, "mkdir", always), (shutil, "rmtree", always), (os, "unlink", always),  # rmtree: file by
                   (os, "rmdir", always), (dcp, "save", always),  # file, so a kill can leave half a folder
                   (safetensors.torch, "save_file", always),
                   (torch, "save", lambda a, kw: isinstance(a[1], (str, os.PathLike))),  # a file, not DCP's streams
                   (builtins, "open", _writes), (io, "open", _writes)]  # open(), and Path.open() (io.open)
        for mod, name, counts in targets:
            self.saved.append((mod, name, getattr(mod, name)))
            setattr(mod, name, self._wrap(getattr(mod, name), counts))
        return self

    def __exit__(self, *exc):
        for mod, name, fn in reversed(self.saved):
            setattr(mod, name, fn)
        return False


def _writes(a, kw):
    mode = a[1] if len(a) > 1 else kw.get("mode", "r")
    return isinstance(mode, str) and any(c in mode for c in "wax+")


@pytest.fixture(scope="module")
def trainee(llama_dir):
    """A tiny policy as the trainers hold it: FSDP2 in a one-process group, fp32, with AdamW."""
    env = {k: os.environ.pop(k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK") if k in os.environ}
    dist.init()
    try:
        policy = dist.shard(M.from_pretrained(llama_dir), torch.device("cpu"), torch.float32).train()
        opt = torch.optim.AdamW(policy.parameters(), lr=1e-2)
        from rlmt import chat
        yield policy, opt, chat.load_tokenizer(llama_dir)
    finally:
        dist.cleanup()
        os.environ.update(env)


def train_step(policy, opt, seed):
    """One AdamW step on random tokens -> the new weights (full tensors, cloned)."""
    ids = torch.randint(0, 300, (2, 8), generator=torch.Generator().manual_seed(seed))
    policy(ids).float().logsumexp(-1).mean().backward()
    opt.step()
    opt.zero_grad()
    return weights(policy)


def weights(policy):
    """{name: full tensor}, cloned: what the policy holds now."""
    return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
            for k, v in policy.state_dict().items()}


def set_weights(policy, w):
    """Put the full weights `w` back (one process: a shard is the whole tensor)."""
    with torch.no_grad():
        for k, p in policy.named_parameters():
            (p.to_local() if hasattr(p, "to_local") else p).copy_(w[k])


def save(trainee, out, step, tag):
    policy, opt, tok = trainee
    return checkpoint.save(out, step, {"policy": policy}, {"policy": opt}, {"step": step, "tag": tag},
                           exports={"policy": (policy, tok, torch.bfloat16)}, keep_last=1)


def loaded(trainee, state_dir):
    """Load `state_dir` into the trainee (its weights zeroed first) -> (trainer_state, weights)."""
    policy, opt, _ = trainee
    with torch.no_grad():
        for p in policy.parameters():
            p.zero_()
    meta = checkpoint.load_state(state_dir, {"policy": policy}, {"policy": opt})
    return meta, weights(policy)


def leftovers(out):
    """Names in OUT that only a crashed save leaves behind."""
    names = os.listdir(out) + [os.path.join("checkpoints", n) for n in os.listdir(os.path.join(out, "checkpoints"))]
    names += [os.path.join("checkpoints", n, "state.deleting") for n in os.listdir(os.path.join(out, "checkpoints"))
              if os.path.exists(os.path.join(out, "checkpoints", n, "state.deleting"))]
    return sorted(n for n in names if n.endswith((".tmp", ".deleting", ".replaced")))


@pytest.fixture(scope="module")
def history(trainee, tmp_path_factory):
    """OUT after saving steps 1 and 2 (step 1's state pruned), the weights of steps 1 to 3."""
    out = str(tmp_path_factory.mktemp("history") / "run")
    w = {}
    for step in (1, 2):
        w[step] = train_step(trainee[0], trainee[1], step)
        save(trainee, out, step, f"step {step}")
    w[3] = train_step(trainee[0], trainee[1], 3)
    return out, w


def with_leftovers(out):
    """What crashed saves leave: a half-built step, a half-removed state, a temporary latest link."""
    tmp = os.path.join(out, "checkpoints", "step-000003.tmp", "state")
    os.makedirs(tmp)
    with open(os.path.join(tmp, "trainer_state.json"), "w") as f:  # whole-looking, but inside a .tmp
        f.write('{"step": 3}')
    os.makedirs(os.path.join(out, "checkpoints", "step-000001", "state.deleting", "sharded"))
    os.symlink("checkpoints/step-000001", os.path.join(out, "latest.tmp"))


# (name, step saved, its tag, how OUT is prepared besides `history`)
SCENARIOS = [("a new step", 3, "step 3", None), ("re-saving the latest step", 2, "step 2 again", None),
             ("a new step after crashed saves", 3, "step 3", with_leftovers)]


@pytest.mark.parametrize("name, step, tag, prepare", SCENARIOS, ids=[s[0] for s in SCENARIOS])
def test_a_save_failed_at_any_operation_leaves_the_previous_checkpoint(trainee, history, tmp_path, name, step,
                                                                        tag, prepare):
    """For every k: the k-th filesystem operation of a save fails (and nothing after it runs). Then
    find_resume(auto) gives a complete checkpoint that loads with its own weights: the previous one (step 2)
    until the new one is in place, the new one after. The next save succeeds, sweeps the leftovers, and
    prunes the older state but keeps every export."""
    base, w = history
    expect = {"step 1": w[1], "step 2": w[2], tag: w[3]}

    def fresh(k):
        out = str(tmp_path / f"out-{k}")
        shutil.copytree(base, out, symlinks=True)
        if prepare:
            prepare(out)
        return out

    set_weights(trainee[0], w[3])  # what the save writes, whatever its step
    out = fresh("count")
    with Faults() as count:
        save(trainee, out, step, tag)
    n_ops, outcomes = count.n, []
    assert n_ops > 10, f"only {n_ops} operations counted: is the injection wired?"
    for k in range(n_ops):
        out = fresh(k)
        set_weights(trainee[0], w[3])
        with Faults(k), pytest.raises(BaseException):  # Crash, or DCP's CheckpointException wrapping it
            save(trainee, out, step, tag)
        state_dir = checkpoint.find_resume("auto", out)
        assert state_dir is not None, f"{name}, operation {k + 1}/{n_ops} failed: no checkpoint found in {out}"
        meta, got = loaded(trainee, state_dir)
        assert meta["tag"] in (tag, "step 2") and all(torch.equal(got[x], expect[meta["tag"]][x]) for x in got), \
            f"{name}, op {k + 1}: {meta['tag']}"
        outcomes.append(meta["tag"])
        # nothing that looks whole is half-written or half-deleted: each step (or step moved aside while it is
        # re-saved) with a trainer_state.json loads, with its own weights
        for step_name in os.listdir(os.path.join(out, "checkpoints")):
            folder = os.path.join(out, "checkpoints", step_name)
            if re.fullmatch(r"step-\d{6}(\.replaced)?", step_name) and \
                    os.path.exists(os.path.join(folder, "state", "trainer_state.json")):
                meta, got = loaded(trainee, checkpoint.find_resume(folder, out))
                assert all(torch.equal(got[x], expect[meta["tag"]][x]) for x in got), (name, k + 1, step_name)
        # the next save (the relaunched run's) succeeds and leaves nothing behind
        set_weights(trainee[0], w[3])
        save(trainee, out, step, tag)
        assert leftovers(out) == [], (k, leftovers(out))
        assert os.readlink(os.path.join(out, "latest")) == f"checkpoints/step-{step:06d}"
        assert loaded(trainee, checkpoint.find_resume("auto", out))[0]["tag"] == tag
        steps = sorted(os.listdir(os.path.join(out, "checkpoints")))
        assert [s for s in steps if os.path.exists(os.path.join(out, "checkpoints", s, "state"))] == \
            [f"step-{step:06d}"], steps
        assert all(os.path.exists(os.path.join(out, "checkpoints", s, "policy", "model.safetensors")) for s in steps)
    # the old checkpoint until some operation, the new one from there on: never a mix, never nothing
    flip = outcomes.index(tag) if tag in outcomes else n_ops
    assert outcomes == ["step 2"] * flip + [tag] * (n_ops - flip) and 0 < flip < n_ops, outcomes


def test_find_resume_reads_every_form_and_names_what_is_missing(trainee, history, tmp_path):
    out, _ = history
    step2 = os.path.join(out, "checkpoints", "step-000002")
    assert checkpoint.find_resume("auto", out) == os.path.join(step2, "state")
    assert checkpoint.find_resume(out, "elsewhere") == os.path.join(step2, "state")  # an OUT folder
    assert checkpoint.find_resume(step2, "elsewhere") == os.path.join(step2, "state")  # a step folder
    assert checkpoint.find_resume(os.path.join(step2, "state"), "x") == os.path.join(step2, "state")
    assert checkpoint.find_resume(os.path.join(out, "latest"), "x") == os.path.join(out, "latest", "state")
    assert checkpoint.find_resume(None, out) is None
    assert checkpoint.find_resume("auto", str(tmp_path / "new")) is None  # nothing yet: start fresh
    with pytest.raises(ValueError, match="step-000001: no trainer_state.json in its state/: .* pruned"):
        checkpoint.find_resume(os.path.join(out, "checkpoints", "step-000001"), out)
    with pytest.raises(ValueError, match=f"--resume {tmp_path}: no checkpoint there: no trainer_state.json"):
        checkpoint.find_resume(str(tmp_path), out)
    with pytest.raises(ValueError, match="no such folder"):
        checkpoint.find_resume(str(tmp_path / "nope"), out)
    # latest dangling (a kill between two renames): the highest complete step, a moved-aside one included
    copy = str(tmp_path / "copy")
    shutil.copytree(out, copy, symlinks=True)
    moved = os.path.join(copy, "checkpoints", "step-000002.replaced")
    os.rename(os.path.join(copy, "checkpoints", "step-000002"), moved)
    assert checkpoint.find_resume("auto", copy) == os.path.join(moved, "state")
    # the layout before this one: OUT/state
    legacy = tmp_path / "legacy"
    shutil.copytree(os.path.join(step2, "state"), legacy / "state")
    assert checkpoint.find_resume("auto", str(legacy)) == str(legacy / "state")


# --- integration: train_grpo.py killed and relaunched ----------------------------------------------------

STEPS = 12


def grpo_args(model, rm, data, out):
    return [sys.executable, os.path.join(ROOT, "train_grpo.py"), "--model", model, "--reward-model", rm,
            "--data", data, "--out", out, "--prompts-per-step", 2, "--group-size", 4, "--micro-batch-size", 2,
            "--max-new-tokens", 12, "--max-prompt-len", 64, "--lr", 1e-3, "--eval-every", 0, "--template", "chat",
            "--steps", STEPS, "--save-every", 1, "--resume", "auto"]


def launch(cmd, log):
    """Start `cmd` from the repo root, one thread, both streams into the file `log`."""
    with open(log, "w") as f:
        return subprocess.Popen([str(c) for c in cmd], stdout=f, stderr=subprocess.STDOUT, cwd=ROOT,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})


def logged_steps(out):
    """The steps in OUT's metrics.jsonl, in order."""
    try:
        with open(os.path.join(out, "metrics.jsonl")) as f:
            return [json.loads(line)["step"] for line in f if line.strip()]
    except (FileNotFoundError, json.JSONDecodeError):  # mid-write or mid-replace: look again
        return []


def saving(out, after):
    """True while a save of a step later than `after` is being built (its .tmp folder exists)."""
    folder = os.path.join(out, "checkpoints")
    names = os.listdir(folder) if os.path.isdir(folder) else []
    return any(n.endswith(".tmp") and int(n[5:11]) > after for n in names)


def complete_step(out):
    """The step of OUT's last complete checkpoint (0: none)."""
    state = checkpoint.find_resume("auto", out)
    if state is None:
        return 0
    with open(os.path.join(state, "trainer_state.json")) as f:
        return json.load(f)["step"]


def wait_for(proc, cond, timeout=60):
    """Poll `cond` every millisecond until it holds (True) or the process ends (False)."""
    end = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.001)
    return False


def final_weights(out):
    from safetensors.torch import load_file
    return load_file(os.path.join(out, "latest", "policy", "model.safetensors"))


def test_killed_and_preempted_run_resumes_to_the_uninterrupted_result(llama_dir, llama_rm_dir, rl_prompts,
                                                                      tmp_path):
    """One chain of launches, each with `--resume auto`, each interrupted: SIGKILL once a save is being
    written (then a few ms later), SIGKILL at a random instant of a step or of start-up, SIGTERM mid-run
    (exit 0, that step saved), and a last launch runs to the end. Meanwhile the same command runs
    uninterrupted (in parallel, on the other core). Each launch must resume at the last complete step,
    metrics.jsonl must hold every step once, and the final weights must be the uninterrupted run's."""
    rng = random.Random(0)
    full, out = str(tmp_path / "full"), str(tmp_path / "chain")
    baseline = launch(grpo_args(llama_dir, llama_rm_dir, rl_prompts, full), tmp_path / "full.log")
    # what interrupts each launch: (signal, when)
    plan = [("KILL", "save", 0.0), ("TERM", "step", 0.0), ("KILL", "step", rng.uniform(0, 0.15)),
            ("KILL", "save", 0.005), ("KILL", "startup", rng.uniform(0.5, 4.0)), ("KILL", "save", 0.0),
            ("KILL", "step", rng.uniform(0, 0.15))]
    events, in_save = [], 0
    for i, (sig, when, delay) in enumerate(plan + [(None, None, 0)]):
        start, state = complete_step(out), checkpoint.find_resume("auto", out)
        frontier = max([start] + logged_steps(out))  # steps after it are this launch's new work
        log = tmp_path / f"launch-{i}.log"
        proc = launch(grpo_args(llama_dir, llama_rm_dir, rl_prompts, out), log)
        if when == "save":
            hit = wait_for(proc, lambda: saving(out, frontier))
        elif when == "step":
            hit = wait_for(proc, lambda: max(logged_steps(out), default=0) > frontier)
        else:
            hit = when == "startup"
        sent = hit and frontier + 1 < STEPS  # a signal during the last step would race the run's end
        if sent:
            time.sleep(delay)
            proc.send_signal(signal.SIGKILL if sig == "KILL" else signal.SIGTERM)
        rc = proc.wait(timeout=120)
        text = log.read_text()
        events.append((sig if sent else None, when, rc, start))
        if rc == 0 or max(logged_steps(out), default=0) > frontier:  # it got past start-up
            assert (f"resumed from {state} at step {start}\n" if start else "starting fresh") in text, \
                (i, start, text[-2000:])
        if rc == -signal.SIGKILL:
            in_save += saving(out, frontier)  # killed while this launch was writing a step
        elif sig == "TERM" and sent:
            n = max(logged_steps(out))
            assert rc == 0 and f"SIGTERM: saved step {n} to " in text and "relaunch with --resume auto" in text, \
                (i, rc, text[-2000:])
            assert os.readlink(os.path.join(out, "latest")) == f"checkpoints/step-{n:06d}" and complete_step(out) == n
        else:
            assert rc == 0, (i, rc, text[-3000:])
        if rc == 0 and complete_step(out) == STEPS:
            break
    assert complete_step(out) == STEPS, events
    assert baseline.wait(timeout=120) == 0, (tmp_path / "full.log").read_text()[-3000:]
    kills = [e for e in events if e[0] == "KILL" and e[2] == -signal.SIGKILL]
    assert len(kills) >= 3 and in_save >= 1, (events, in_save)  # some kill landed inside a save
    assert any(e[0] == "TERM" and e[2] == 0 for e in events), events
    assert logged_steps(out) == list(range(1, STEPS + 1))
    assert logged_steps(full) == list(range(1, STEPS + 1))
    a, b = final_weights(full), final_weights(out)
    assert a.keys() == b.keys()
    for k in a:
        assert_close_to_scale(b[k].float(), a[k].float(), 1e-6, k)
    assert sorted(os.listdir(os.path.join(out, "checkpoints"))) == [f"step-{s:06d}" for s in range(1, STEPS + 1)]


# --- bad input ------------------------------------------------------------------------------------------


def test_bad_checkpoint_flags_get_one_clear_message(llama_dir, llama_rm_dir, rl_prompts, tmp_path):
    """Every trainer: --resume of a folder with no checkpoint stops before any model loads, naming the
    folder; --keep-last -1 is refused by the parser. The runs go in parallel (each is mostly imports)."""
    empty = tmp_path / "empty"
    empty.mkdir()
    sft = tmp_path / "sft.jsonl"
    sft.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                            {"role": "assistant", "content": "yo"}]}) + "\n")
    rl = ["--model", llama_dir, "--reward-model", llama_rm_dir, "--data", rl_prompts, "--prompts-per-step", 2,
          "--micro-batch-size", 1, "--out", str(tmp_path / "out")]
    runs = {
        "grpo": ["train_grpo.py", *rl, "--resume", empty],
        "ppo": ["train_ppo.py", *rl, "--resume", empty],
        "sft": ["train_sft.py", "--model", llama_dir, "--data", sft, "--batch-size", 1, "--resume", empty],
        "dpo": ["train_dpo.py", "--model", llama_dir, "--data", rl_prompts, "--reward-fn", "rlmt.demo:reward",
                "--batch-size", 2, "--micro-batch-size", 1, "--resume", empty],
        "keep-last": ["train_grpo.py", *rl, "--keep-last", -1],
    }
    procs = {k: subprocess.Popen([sys.executable, *map(str, v)], cwd=ROOT, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
             for k, v in runs.items()}
    results = {k: (p.communicate(timeout=120)[1], p.returncode)[::-1] for k, p in procs.items()}
    for k in ("grpo", "ppo", "sft", "dpo"):
        rc, err = results[k]
        assert rc == 1 and err.strip().splitlines() == [
            f"error: --resume {empty}: no checkpoint there: no trainer_state.json in it, in its state/, or in a "
            "step of its checkpoints/ (give --resume auto, an OUT folder, OUT/checkpoints/step-NNNNNN or its "
            "state/)"], (k, rc, err[-2000:])
    rc, err = results["keep-last"]
    assert rc == 2 and "--keep-last: must be at least 0, got -1" in err, err[-2000:]


def test_truncate_after_drops_later_steps_and_a_torn_line(tmp_path):
    """On resume the log keeps each step up to the checkpoint once; a line cut off by a machine that died
    mid-write (not valid JSON) goes too, instead of failing the resume."""
    from rlmt import log
    lines = [json.dumps({"step": s, "loss": 0.1 * s}) for s in (1, 2, 3)] + ['{"step": 4, "lo']
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines))
    log.truncate_after(str(tmp_path), 2)
    assert [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2]
