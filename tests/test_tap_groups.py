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


def grouped_model(seed=0):
    """A dense conv, a depthwise conv, a depthwise conv with channel multiplier 2, and
    grouped convs whose conv groups hold 4 and 3 outputs."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3, bias=False),                 # 0: dense
                         nn.Conv2d(8, 8, 3, groups=8, bias=False),       # 1: depthwise
                         nn.Conv2d(8, 16, 3, groups=8, bias=False),      # 2: 2 outputs per input
                         nn.Conv2d(16, 8, 3, groups=2, bias=False),      # 3: 2 conv groups of 4 outputs
                         nn.Conv2d(8, 6, 3, groups=2, bias=False))       # 4: 2 conv groups of 3 outputs


def hand_mask_grouped(w: torch.Tensor, keep: int, share: int, conv_groups: int) -> torch.Tensor:
    """hand_mask within each conv group's outputs (they read the same inputs; other conv groups do not)."""
    per = w.shape[0] // conv_groups
    return torch.cat([hand_mask(w[c * per:(c + 1) * per], keep, share) for c in range(conv_groups)])


def test_depthwise_convs_keep_per_kernel_taps_and_grouped_convs_share_within_conv_groups():
    model = grouped_model()
    plan = topk_plan(model, 2, tap_group=4)
    assert plan.per_kernel == ["1"]  # only the depthwise conv: its outputs each read their own input
    shares = {t.name: (t.share, t.conv_groups) for t in plan.targets}
    assert shares == {"0.weight": (4, 1), "1.weight": (1, 1), "2.weight": (2, 8), "3.weight": (4, 2),
                      "4.weight": (3, 2)}
    assert plan.num_groups == sum(m.weight.shape[0] * m.weight.shape[1] for m in model)
    masks = compute_masks(model, plan)
    for i, conv in enumerate(model):
        w, mask = conv.weight.detach(), masks[f"{i}.weight"]
        share = min(4, conv.out_channels // conv.groups)
        assert torch.equal(mask, hand_mask_grouped(w, 2, share, conv.groups if share > 1 else 1)), i
        assert (mask.reshape(-1, 9).sum(-1) == 2).all()
    # the depthwise kernels choose their taps independently: exactly the paper's per-kernel mask
    dw = model[1].weight.detach()
    assert torch.equal(masks["1.weight"].reshape(-1, 9), group_ranks(dw.reshape(-1, 9).abs()) < 2)
    assert len({tuple(m.flatten().tolist()) for m in masks["1.weight"]}) > 1
    # grouped: the two conv groups of layer 3 choose apart, each shares over its 4 outputs
    m3 = masks["3.weight"]
    assert (m3[:4] == m3[:1]).all() and (m3[4:] == m3[4:5]).all() and not torch.equal(m3[0], m3[4])
    # without tap groups nothing changes: every target plain, nothing listed
    plain = topk_plan(model, 2)
    assert plain.per_kernel == [] and {(t.share, t.conv_groups) for t in plain.targets} == {(1, 1)}


def test_regularizer_of_grouped_convs_by_hand():
    model = grouped_model(seed=1)
    plan = topk_plan(model, 1, tap_group=4)
    reg = AuxRegularizer(model, plan, "exponential", alpha=3.0)
    expected = 0
    for conv in model:
        share = min(4, conv.out_channels // conv.groups)
        per = conv.out_channels // conv.groups if share > 1 else conv.out_channels
        expected = expected + sum(aux_by_hand(conv.weight[s:s + per], 1, share, 3.0, plan.num_groups)
                                  for s in range(0, conv.out_channels, per))
    expected.backward()
    grads = [m.weight.grad.clone() for m in model]
    model.zero_grad(set_to_none=True)
    value = reg.add_grad_(beta=1.5)
    assert float(value) == pytest.approx(float(expected.detach()), rel=1e-5)
    for conv, grad in zip(model, grads):
        torch.testing.assert_close(conv.weight.grad, 1.5 * grad, rtol=1e-5, atol=1e-7)
