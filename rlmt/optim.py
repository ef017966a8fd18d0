"""The optimizer step every trainer takes, and the learning-rate schedule of the SFT and DPO recipes.

    norm, stepped = optim.step(policy, opt, args.grad_clip)   # clip, then step unless the norm is NaN/inf
    skipped.update(stepped, step, norm)                        # counts (skipped_steps); warns
    skipped.check(step)                                        # after logging: too many in a row ends the run
    optim.set_lr(opt, optim.cosine_lr(step, total, base_lr, warmup_frac))

The rate is a pure function of the step, so resuming needs nothing but the step.
"""

import math
import sys

import torch

from rlmt import dist


def step(model, optimizer, max_norm):
    """Clip `model`'s gradient norm to `max_norm` and step `optimizer`, unless the norm is not finite (a
    NaN or inf anywhere in the gradients, e.g. a bf16 overflow): then the weights and the AdamW moments
    stay as they are (verl skips such steps too). Gradients are cleared either way. The norm is reduced
    over all ranks, so every rank takes the same decision. -> (norm before clipping, stepped)."""
    norm = dist.clip_grad_norm(model, max_norm)
    stepped = bool(torch.isfinite(norm))
    if stepped:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return norm, stepped


class SkippedSteps:
    """Optimizer steps skipped for a non-finite gradient norm: `total` over the run (logged as
    skipped_steps, kept in the training state) and how many came in a row. `check` ends the run after
    `limit` in a row, since the same weights would most likely give the same NaN again."""

    def __init__(self, limit, total=0):
        self.limit, self.total, self.in_a_row = limit, total, 0

    def update(self, stepped, step, norm):
        """Book optimizer step `step` (1-based), taken or skipped (then with a warning on rank 0)."""
        if stepped:
            self.in_a_row = 0
            return
        self.total, self.in_a_row = self.total + 1, self.in_a_row + 1
        if dist.is_main():
            print(f"warning: step {step}: gradient norm {float(norm)}, optimizer step skipped", file=sys.stderr)

    def check(self, step):
        """Exit with one message once `limit` steps in a row were skipped (every rank sees the same norm)."""
        if self.in_a_row >= self.limit:
            sys.exit(f"error: step {step}: {self.in_a_row} optimizer steps in a row skipped for a non-finite "
                     f"gradient norm ({self.total} in the run); the weights are those before step "
                     f"{step - self.in_a_row + 1}. Lower --lr, try --dtype float32 to rule out a bf16 overflow, "
                     "or raise --max-skipped-steps")


def cosine_lr(step, total_steps, base_lr, warmup_frac=0.0):
    """The learning rate of optimizer step `step` (0-based) out of `total_steps`.

        warmup (the first ceil(warmup_frac · total) steps):  base · (step + 1) / warmup
        then:                                                base · ½ (1 + cos(π · progress)),
                                                             progress = (step − warmup) / (total − warmup)

    The first step already moves (lr > 0) and the last one does not reach zero; `step` past the end
    gives 0. warmup_frac in [0, 1)."""
    if not 0 <= warmup_frac < 1:
        raise ValueError(f"warmup_frac must be in [0, 1), got {warmup_frac}")
    warmup = math.ceil(warmup_frac * total_steps)
    if step < warmup:
        return base_lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total_steps - warmup)
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def set_lr(optimizer, lr):
    """Write `lr` into every parameter group (the schedule is applied by hand, one line per step)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
