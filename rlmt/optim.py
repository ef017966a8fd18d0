"""The learning-rate schedule of the SFT and DPO recipes: linear warmup, then cosine decay to zero.

The rate is a pure function of the step, so resuming needs nothing but the step.
"""

import math


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
