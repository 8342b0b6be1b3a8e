"""--tap-group G: G consecutive output channels share their kept tap positions for each input
channel. Masks and regularizer against hand computations; invariants end to end."""

import itertools
import json

import pytest
import torch
import torch.nn as nn

import vgg8_optimized as vgg8
from tkp_lib.sparsity import AuxRegularizer, compute_masks, group_ranks, topk_plan

FAST = ["--epochs-stage1", "2", "--epochs-stage2", "2", "--batch-train", "16", "--batch-val", "16",
        "--num-workers", "0", "--bn-recal-batches", "2", "--progress-every", "0"]


def conv_model(out=10, inp=3, k=3, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(inp, out, k, bias=False))


def hand_mask(w: torch.Tensor, keep: int, share: int) -> torch.Tensor:
    """Loops: for each output group and input channel, the `keep` taps of largest summed w^2
    (ties to the lower tap index)."""
    out, inp = w.shape[:2]
    taps = w.shape[2] * w.shape[3]
    flat = w.reshape(out, inp, taps)
    mask = torch.zeros(out, inp, taps, dtype=torch.bool)
    for start in range(0, out, share):
        members = range(start, min(start + share, out))
        for i in range(inp):
            energy = [sum(float(flat[o, i, t]) ** 2 for o in members) for t in range(taps)]
            best = sorted(range(taps), key=lambda t: (-energy[t], t))[:keep]
            for o in members:
                mask[o, i, best] = True
    return mask.reshape(w.shape)


@pytest.mark.parametrize("share,keep", [(1, 1), (4, 1), (4, 2), (3, 4), (10, 1), (16, 2)])
def test_masks_share_taps_within_output_groups(share, keep):
    model = conv_model(out=10)
    plan = topk_plan(model, keep, tap_group=share)
    mask = compute_masks(model, plan)["0.weight"]
    w = model[0].weight.detach()
    assert torch.equal(mask, hand_mask(w, keep, share))
    assert (mask.reshape(10, 3, 9).sum(-1) == keep).all()  # exactly K per kernel
    if share == 1:  # the paper's TKP: each kernel's own K largest |w|
        ranks = group_ranks(w.reshape(-1, 9).abs())
        assert torch.equal(mask.reshape(-1, 9), ranks < keep)
    for start in range(0, 10, share):  # every kernel of a group (the last one smaller) alike
        group = mask[start:start + share]
        assert (group == group[:1]).all()


def test_ties_are_broken_the_same_way_everywhere():
    model = conv_model(out=4)
    with torch.no_grad():
        model[0].weight.fill_(1.0)
    mask = compute_masks(model, topk_plan(model, 2, tap_group=2))["0.weight"]
    assert mask.reshape(4, 3, 9)[:, :, :2].all() and not mask.reshape(4, 3, 9)[:, :, 2:].any()


def aux_by_hand(w: torch.Tensor, keep: int, share: int, alpha: float, num_groups: int) -> torch.Tensor:
    """L_aux of shared taps through torch.sort with autograd: each kernel's squared taps,
    ordered by the group energy of their position, weighted c[r] = exp(-alpha (r - K)) for r >= K."""
    out, inp = w.shape[:2]
    flat = w.reshape(out, inp, -1)
    total = w.new_zeros(())
    for start in range(0, out, share):
        members = list(range(start, min(start + share, out)))
        for i in range(inp):
            energy = (flat[members, i, :].detach() ** 2).sum(0)
            order = torch.sort(energy, descending=True, stable=True).indices
            for o in members:
                s = flat[o, i, order] ** 2
                ranks = torch.arange(len(s), dtype=torch.float32)
                c = torch.where(ranks >= keep, torch.exp(-alpha * (ranks - keep)), torch.zeros(()))
                total = total + (c * s).sum()
    return total / num_groups


@pytest.mark.parametrize("share,keep", [(1, 1), (4, 1), (3, 2)])
def test_regularizer_value_and_gradient_by_hand(share, keep):
    model = conv_model(out=7, inp=2)
    plan = topk_plan(model, keep, tap_group=share)
    assert plan.num_groups == 7 * 2  # normalised by kernels, as without groups
    reg = AuxRegularizer(model, plan, "exponential", alpha=3.0)
    w = model[0].weight
    expected = aux_by_hand(w, keep, share, 3.0, plan.num_groups)
    expected.backward()
    grad = w.grad.clone()
    w.grad = None
    value = reg.add_grad_(beta=2.0)
    assert float(value) == pytest.approx(float(expected.detach()), rel=1e-5)
    torch.testing.assert_close(w.grad, 2.0 * grad, rtol=1e-5, atol=1e-7)


def test_end_to_end_with_tap_groups_keeps_every_invariant(cifar10_root, tmp_path):
    out = tmp_path / "run"
    s = vgg8.main(["--data-root", str(cifar10_root), "--output-dir", str(out), "--tap-group", "24", *FAST])
    assert s["sparsity"] == "top-1-g24" and s["speedup_theoretical"] == pytest.approx(7.69, abs=0.01)
    final = torch.load(out / "final.pt", weights_only=True)
    for name, mask in final["masks"].items():
        w = final["model"][name]
        assert (w[~mask] == 0).all()
        assert (w.reshape(-1, 9).count_nonzero(1) <= 1).all()
        groups = list(range(0, mask.shape[0], 24))  # 64 = 24 + 24 + 16: a smaller last group
        for a, b in itertools.pairwise(groups + [mask.shape[0]]):
            assert (mask[a:b] == mask[a:a + 1]).all(), name
    saved = json.loads((out / "args.json").read_text())["args"]
    assert saved["tap_group"] == 24
