"""Masks (DESIGN.md §1) and the auxiliary regularizer (§2) against hand computations."""

import math

import pytest
import torch
import torch.nn as nn

import tkp_common as tkp
from tkp_lib.sparsity import AuxRegularizer, compute_masks, group_ranks, topk_plan


def brute_force_topk(kernel: torch.Tensor, k: int) -> set:
    """Indices of the k largest |w|, ties to the lower index, by plain Python."""
    vals = kernel.abs().flatten().tolist()
    order = sorted(range(len(vals)), key=lambda i: (-vals[i], i))
    return set(order[:k])


@pytest.mark.parametrize("k", [1, 2, 4, 8])
def test_topk_mask_keeps_exactly_the_k_largest(k):
    torch.manual_seed(0)
    conv = nn.Conv2d(5, 7, 3)
    plan = topk_plan(nn.Sequential(conv), k)
    mask = compute_masks(nn.Sequential(conv), plan)["0.weight"]
    assert mask.dtype == torch.bool and mask.shape == conv.weight.shape
    for o in range(7):
        for i in range(5):
            kept = set(torch.nonzero(mask[o, i].flatten()).flatten().tolist())
            assert kept == brute_force_topk(conv.weight[o, i], k)


def test_ties_are_broken_towards_the_lower_index_deterministically():
    w = torch.tensor([[1.0, -1.0, 1.0, 0.5], [0.0, 0.0, 0.0, 0.0], [2.0, 3.0, -3.0, 3.0]])
    assert group_ranks(w.abs()).tolist() == [[0, 1, 2, 3], [0, 1, 2, 3], [3, 0, 1, 2]]
    # many exact ties in a large tensor: the same mask every time, and the brute-force answer
    big = torch.randint(-2, 3, (4096, 9)).float()
    first = group_ranks(big.abs()) < 2
    for _ in range(3):
        assert torch.equal(first, group_ranks(big.abs()) < 2)
    for row in range(0, 4096, 97):
        assert set(torch.nonzero(first[row]).flatten().tolist()) == brute_force_topk(big[row], 2)


def test_topk_plan_leaves_small_kernels_dense_but_counts_them():
    model = nn.Sequential(nn.Conv2d(3, 4, 7), nn.Conv2d(4, 6, 1), nn.Conv2d(6, 2, 3), nn.Linear(2, 2))
    plan = topk_plan(model, 1)
    assert [t.name for t in plan.targets] == ["0.weight", "2.weight"]
    assert [(t.group, t.keep) for t in plan.targets] == [(49, 1), (9, 1)]
    assert plan.num_groups == 3 * 4 + 4 * 6 + 6 * 2  # every conv kernel, the 1x1 ones included
    assert topk_plan(model, 9).targets[0].name == "0.weight"  # 7x7 stem still pruned at K=9
    excluded = topk_plan(model, 1, ["0"])
    assert [t.name for t in excluded.targets] == ["2.weight"]
    assert excluded.num_groups == 4 * 6 + 6 * 2  # excluded layers are not counted
    assert topk_plan(model, 1, dense=True).targets == []
    with pytest.raises(tkp.TKPError, match="no Conv2d named nope"):
        topk_plan(model, 1, ["nope"])


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (4, 8)])
def test_nm_mask_pattern(n, m):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(16, 6), nn.Linear(6, 4))
    plan = tkp.nm_plan(model, n, m, ["0", "1"])
    assert [t.name for t in plan.targets] == ["0.weight"]
    assert plan.skipped and "not a multiple" in plan.skipped[0]
    assert plan.num_groups == 6 * 16 // m
    mask = compute_masks(model, plan)["0.weight"]
    blocks = mask.reshape(6, 16 // m, m)
    assert (blocks.sum(-1) == n).all()
    w = model[0].weight.detach().reshape(6, 16 // m, m)
    for r in range(6):
        for b in range(16 // m):
            assert set(torch.nonzero(blocks[r, b]).flatten().tolist()) == brute_force_topk(w[r, b], n)


def reference_aux(model, plan, reg_type, alpha):
    """L_aux by DESIGN.md §2, through torch.sort with autograd (the reference's way)."""
    params = dict(model.named_parameters())
    total = 0.0
    for t in plan.targets:
        s = params[t.name].reshape(-1, t.group).pow(2).sort(dim=1, descending=True).values
        r = torch.arange(t.group, dtype=torch.float32)
        c = torch.ones(t.group) if reg_type == "l2" else torch.exp(-alpha * (r - t.keep))
        c[: t.keep] = 0
        total = total + (s * c).sum()
    return total / plan.num_groups


def test_regularizer_values_by_hand():
    # one 3x3 conv with a single kernel, one 1x1 conv with 2 kernels (counted, never penalised)
    model = nn.Sequential(nn.Conv2d(1, 1, 3, bias=False), nn.Conv2d(1, 2, 1, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([3.0, -1.0, 0.0, 2.0, 0.0, 0.0, 0.0, 0.5, 0.0]).view(1, 1, 3, 3))
    plan = topk_plan(model, 1)
    assert plan.num_groups == 3
    # sorted squares: 9, 4, 1, 0.25, 0...; K = 1
    l2 = AuxRegularizer(model, plan, "l2", 0.0).add_grad_(0.0).item()
    assert l2 == pytest.approx((4 + 1 + 0.25) / 3)
    expo = AuxRegularizer(model, plan, "exponential", 2.0).add_grad_(0.0).item()
    assert expo == pytest.approx((4 * 1 + 1 * math.exp(-2) + 0.25 * math.exp(-4)) / 3)
    # K = 2 keeps 9 and 4
    plan2 = topk_plan(model, 2)
    assert AuxRegularizer(model, plan2, "l2", 0.0).add_grad_(0.0).item() == pytest.approx(1.25 / 3)


@pytest.mark.parametrize("reg_type", ["l2", "exponential"])
def test_regularizer_value_and_gradient_match_autograd_through_sort(reg_type):
    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 1), nn.Conv2d(8, 4, 5), nn.Conv2d(4, 4, 3))
    plan = topk_plan(model, 2)
    ref = reference_aux(model, plan, reg_type, 3.0)
    ref_grads = torch.autograd.grad(ref, [p for _, p in model.named_parameters()], allow_unused=True)
    beta = 7.0
    value = AuxRegularizer(model, plan, reg_type, 3.0).add_grad_(beta)
    assert value.item() == pytest.approx(ref.item(), rel=1e-5)
    for (name, p), g in zip(model.named_parameters(), ref_grads):
        expected = torch.zeros_like(p) if g is None else beta * g
        got = torch.zeros_like(p) if p.grad is None else p.grad
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7, msg=name)


def test_nm_regularizer_by_hand():
    lin = nn.Linear(4, 1, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[0.5, -2.0, 1.0, 0.1]]))
    model = nn.Sequential(lin)
    plan = tkp.nm_plan(model, 2, 4, ["0"])
    # squares sorted: 4, 1, 0.25, 0.01; N = 2 keeps 4 and 1; alpha = 2
    value = AuxRegularizer(model, plan, "exponential", 2.0).add_grad_(0.0).item()
    assert value == pytest.approx(0.25 + 0.01 * math.exp(-2))
