"""What every trainer (GRPO, PPO, SFT, DPO) does around its step, written once: resume, the step range and
its progress bar, the log writers, the save on schedule or on a scheduler's SIGTERM, the end-of-run report.

    run = loop.Run(args, models, optimizers, exports, device, total_steps, "grpo")
    for step in run.steps():
        ...                                       # the algorithm, in the script
        run.skipped.update(stepped, step + 1, grad_norm)
        run.log(step + 1, log.reduce_metrics(metrics), samples, postfix)
        run.end_of_step(step + 1)                 # save when due; on SIGTERM save and exit 0
    run.finish(policy=..., state=...)

The step is the only position a run has: a step's data is a function of it (batching.step_indices), so a
resumed run needs nothing else.
"""

import os

from tqdm import tqdm

from rlmt import checkpoint, dist, log, optim, preflight


class Run:
    """One training run's scaffolding. models / optimizers: {name: module / optimizer}, as checkpoint.save
    takes them; exports: {name: (model, tokenizer, dtype)} written as HF folders at each save; total: the
    run's steps (the lr schedule's length); --stop-after N (SFT, DPO) ends this process after step N."""

    def __init__(self, args, models, optimizers, exports, device, total, desc):
        self.args, self.models, self.optimizers, self.exports = args, models, optimizers, exports
        self.total, self.desc = total, desc
        self.end = min(total, getattr(args, "stop_after", None) or total)
        self.skipped = optim.SkippedSteps(args.max_skipped_steps)
        # preflight has already checked --resume; here the state is loaded into the models
        self.start, self.skipped.total = resume(args, preflight.resume_state(args), models, optimizers)
        main = dist.is_main()
        self.tb = log.tensorboard(args.out) if main else None
        self.wb = log.wandb(args) if main else None  # --wandb PROJECT, else None
        self.preemption = checkpoint.Preemption(device)  # SIGTERM: save at the end of the step, exit 0
        self.bar = None

    def steps(self):
        """The steps this process runs, 0-based, with a progress bar on rank 0."""
        self.bar = tqdm(range(self.start, self.end), initial=self.start, total=self.total,
                        disable=not dist.is_main(), desc=self.desc, dynamic_ncols=True)
        return self.bar

    def log(self, step, metrics, samples=(), postfix=None):
        """Rank 0 writes step `step` (1-based) of reduced `metrics` (floats) and its sample rows; every rank
        then stops if too many optimizer steps in a row were skipped (after the log, so it shows the norms)."""
        if dist.is_main():
            log.log_step(self.args.out, step, metrics, samples, self.tb, self.wb)
            self.bar.set_postfix(postfix if postfix is not None else log.progress_postfix(metrics))
        self.skipped.check(step)

    def save(self, step):
        a = self.args
        checkpoint.save(a.out, step, self.models, self.optimizers,
                        {"step": step, "skipped_steps": self.skipped.total, "args": vars(a)},
                        exports=self.exports, keep_last=a.keep_last)

    def end_of_step(self, step):
        """After step `step` (1-based): save every --save-every steps and at the last one; on SIGTERM (any
        rank) save this step too and exit 0. A collective: every rank calls it."""
        due = (self.args.save_every and step % self.args.save_every == 0) or step == self.end
        if due:
            self.save(step)
        if step < self.end and self.preemption.requested():
            if not due:
                self.save(step)
            self.preemption.stop(step, self.args.out)

    def finish(self, plot_keys=None, **outputs):
        """End of the run: rank 0 draws the curve of `plot_keys` (None: log.REWARD_KEYS) and prints where
        every output went (outputs: name=sub-folder of the last checkpoint, e.g. policy="policy"); W&B is
        closed."""
        if dist.is_main():
            latest = os.path.join(self.args.out, checkpoint.LATEST)
            paths = {k: os.path.join(latest, v) for k, v in outputs.items()}
            log.report(self.args.out, plot_keys or log.REWARD_KEYS, **paths)
        if self.wb is not None:
            self.wb.finish()


def resume(args, state_dir, models, optimizers):
    """Load `state_dir` (resume_state's answer; None: start fresh) into the built, sharded models and their
    optimizers, and drop what a killed run logged after that step -> (step, optimizer steps skipped so far)."""
    step, skipped = 0, 0
    if state_dir:
        state = checkpoint.load_state(state_dir, models, optimizers)
        step, skipped = state["step"], state.get("skipped_steps", 0)
    if args.resume and dist.is_main():
        log.truncate_after(args.out, step)
        print(f"resumed from {state_dir} at step {step}" if state_dir else
              f"--resume auto: no checkpoint in {args.out}, starting fresh")
    return step, skipped
