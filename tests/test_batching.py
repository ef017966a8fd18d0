"""Micro-batches by a token budget (rlmt.batching) and their metrics, by hand."""

import pytest
import torch

from conftest import ROOT, run_script
from rlmt import batching, dist, log


def test_plan_first_fit_decreasing():
    # longest first: 9 opens [9], 7 opens [7], 5 opens [5], 3 joins 7 (10), 2 joins 5 (7), 1 joins 9 (10)
    lengths = [3, 9, 1, 5, 7, 2]
    assert batching.plan(lengths, 10) == [[1, 2], [0, 4], [3, 5]]
    for mb in batching.plan(lengths, 10):
        assert sum(lengths[i] for i in mb) <= 10
    assert sorted(i for mb in batching.plan(lengths, 4) for i in mb) == list(range(6))  # every unit once
    assert batching.plan([12, 3], 10) == [[0], [1]]  # longer than the budget: a micro-batch of its own
    assert batching.plan([1, 1, 1, 1, 1], 100, max_rows=2) == [[0, 1], [2, 3], [4]]
    assert batching.plan([], 10) == []
    with pytest.raises(ValueError):
        batching.plan([1], 0)


def test_balance_by_tokens():
    # longest first, each to the lightest rank: 9 -> r0, 7 -> r1, 5 -> r1 (7 < 9), 3 -> r0 (9 < 12), 2 -> r0
    lengths = [3, 9, 2, 5, 7]
    assert batching.balance(lengths, 2) == [[0, 1, 2], [3, 4]]
    loads = [sum(lengths[i] for i in r) for r in batching.balance(lengths, 2)]
    assert loads == [14, 12]  # a slice by index ([3, 9] | [2, 5, 7]) would give 12 | 14, [3, 9, 2] | ... 14 | 12
    assert batching.balance([5, 5, 5], 3) == [[0], [1], [2]]
    assert all(batching.balance([1] * 8, 3))  # no rank left without units


def test_micro_batches_one_process_and_pad_frac():
    dist.init()
    micro = batching.micro_batches([4, 6, 3], 10)
    assert micro == [[0, 1], [2]]
    assert batching.micro_batches([4, 6, 3], 10, among=[2, 0]) == [[0, 2]]  # indices into lengths
    assert batching.pad_frac([4, 6, 3], micro) == 0.0
    assert batching.pad_frac([4, 6, 3], micro + [[]]) == pytest.approx(1 / 14)  # an empty pass: one stand-in
    m = batching.metrics([4, 6, 3], micro + [[]], seconds=2.0, world=2)
    assert m["n_micro"] == 3 and m["train_tokens_per_s"] == pytest.approx(13 / 2 * 2)


def test_step_mean_weighs_by_tokens():
    """Per-micro-batch means weighted by their tokens = the step's mean; an empty micro-batch (weight 0,
    its mean 0/0) counts for nothing; *_max takes the maximum."""
    stats = [({"kl": torch.tensor(1.0), "ratio_max": torch.tensor(1.5)}, torch.tensor(3.0)),
             ({"kl": torch.tensor(2.0), "ratio_max": torch.tensor(1.2)}, torch.tensor(1.0)),
             ({"kl": torch.tensor(float("nan")), "ratio_max": torch.tensor(0.0)}, torch.tensor(0.0))]
    out = log.step_mean(stats)
    assert out["kl"].item() == pytest.approx((3 * 1 + 2) / 4) and out["ratio_max"].item() == 1.5


def test_mini_batches_keep_groups_whole_and_do_not_depend_on_the_ranks():
    assert batching.mini_batches(8, 2, 2) == [[0, 1, 4, 5], [2, 3, 6, 7]]
    assert batching.mini_batches(3, 1, 1) == [[0, 1, 2]]
    whole = batching.mini_batches(16, 2, 2)  # 8 prompts x 2 samples in one process
    for world in (2, 4):  # each rank holds a contiguous slice of 16 / world rows
        share = 16 // world
        for rank in range(world):
            mine = batching.mini_batches(share, 2, 2)
            for k in range(2):
                assert [rank * share + i for i in mine[k]] == [i for i in whole[k] if i // share == rank]


STEP_MEAN_SCRIPT = '''
import json, sys
import torch, torch.distributed as tdist
sys.path.insert(0, {root!r})
from rlmt import log
tdist.init_process_group("gloo")
rank = tdist.get_rank()
# rank 0: one micro-batch of 3 tokens (kl 1); rank 1: 1 token (kl 5) and an empty one
stats = [[({{"kl": torch.tensor(1.0), "ratio_max": torch.tensor(1.5)}}, torch.tensor(3.0))],
         [({{"kl": torch.tensor(5.0), "ratio_max": torch.tensor(2.5)}}, torch.tensor(1.0)),
          ({{"kl": torch.tensor(float("nan")), "ratio_max": torch.tensor(0.0)}}, torch.tensor(0.0))]][rank]
m = log.reduce_metrics({{**log.step_mean(stats), "reward_mean": torch.tensor([0.0, 1.0][rank]),
                         "diff_max": torch.tensor([7.0, 2.0][rank])}})
open({out!r} + str(rank), "w").write(json.dumps(m))
tdist.destroy_process_group()
'''


def test_step_mean_and_reduce_over_two_ranks(tmp_path):
    """2 gloo ranks holding different token counts: the step's kl is the token-weighted mean over both
    ranks ((3·1 + 5) / 4 = 2), not the mean of the rank means (3); every *_max is the maximum over ranks;
    other metrics are averaged."""
    import json
    script = tmp_path / "step_mean.py"
    script.write_text(STEP_MEAN_SCRIPT.format(root=ROOT, out=str(tmp_path / "rank")))
    run_script(script, nproc=2)
    for rank in range(2):
        m = json.loads((tmp_path / f"rank{rank}").read_text())
        assert m == {"kl": pytest.approx(2.0), "ratio_max": 2.5, "reward_mean": 0.5, "diff_max": 7.0}, m
