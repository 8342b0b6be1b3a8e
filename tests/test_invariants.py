"""DESIGN.md §4: from masking to the end of the run, pruned weights stay exactly zero, their
gradients are zero when the optimizer steps, and no group exceeds K non-zeros; in fp32,
bf16, fp16 with GradScaler (skipped steps included), gradient accumulation with a partial
tail, and torch.compile."""

import copy
import pickle

import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

import vgg8_optimized as vgg8
from tkp_lib.report import check_sparsity
from tkp_lib.runtime import Dist
from tkp_lib.sparsity import AuxRegularizer, Masker, compute_masks, topk_plan
from tkp_lib.train import build_trainer, train_one_epoch

K = 2


def small_net():
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                         nn.Flatten(), nn.Linear(32, 4))


def loader(n=28, batch=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 8, 8, generator=g)
    y = torch.randint(0, 4, (n,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=batch, shuffle=False)


def masked_trainer(model, amp_dtype=None, compiled=False, grad_accum=1, lr=1e-2):
    args = vgg8.get_args_parser().parse_args(["--lr", str(lr), "--grad-accum", str(grad_accum)])
    plan = topk_plan(model, K)
    masks = compute_masks(model, plan)
    masker = Masker(model, masks)
    masker.apply_()
    runner = torch.compile(model, dynamic=False) if compiled else model  # as tkp_common._wrap compiles
    t = build_trainer(runner, model, args=args, device=torch.device("cpu"), amp_dtype=amp_dtype,
                          min_lr=0.0, total_steps=100, dist=Dist(), masker=masker)
    seen = {"steps": 0}

    def grads_are_masked(opt, *_):
        seen["steps"] += 1
        for p, m in zip(masker.params, masks.values()):
            if p.grad is not None:
                assert (p.grad[~m] == 0).all(), "a pruned gradient reached the optimizer"

    t.optimizer.register_step_pre_hook(grads_are_masked)
    return t, plan, masks, seen


def assert_invariants(model, plan, masks, optimizer=None):
    check_sparsity(model, plan, masks)
    params = dict(model.named_parameters())
    for name, mask in masks.items():
        assert (params[name].detach()[~mask] == 0).all()
        assert torch.isfinite(params[name]).all()
        if optimizer is not None and params[name] in optimizer.state:
            state = optimizer.state[params[name]]
            assert (state["exp_avg"][~mask] == 0).all() and (state["exp_avg_sq"][~mask] == 0).all()


@pytest.mark.parametrize("amp_dtype", [None, torch.bfloat16], ids=["fp32", "bf16"])
def test_masks_hold_over_many_steps(amp_dtype):
    torch.manual_seed(0)
    model = small_net()
    t, plan, masks, seen = masked_trainer(model, amp_dtype)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for _ in range(5):
        train_one_epoch(t, loader())
        assert_invariants(model, plan, masks, t.optimizer)
    assert seen["steps"] == 35
    changed = [n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])]
    assert "0.weight" in changed and "3.weight" in changed  # kept taps really trained


def test_fp16_grad_scaler_with_skipped_steps():
    torch.manual_seed(0)
    model = small_net()
    t, plan, masks, seen = masked_trainer(model, torch.float16)
    # a scale this large overflows the fp16 backward: the first steps are skipped
    t.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**40, backoff_factor=2.0**-8)
    scales = []
    for _ in range(3):
        train_one_epoch(t, loader())
        scales.append(t.scaler.get_scale())
        assert_invariants(model, plan, masks, t.optimizer)
    assert scales[0] < 2.0**40, "no step was skipped: the test did not inject an overflow"
    assert t.optimizer.state, "no step was ever taken after the skips"


def test_masks_hold_when_the_optimizer_state_moves_pruned_weights():
    """Optimizer state from before the masks (momentum in every entry, as after dense steps or
    from a resumed checkpoint) moves pruned weights even with zero gradients: the masks are
    applied again after every step, so they stay exactly zero."""
    torch.manual_seed(0)
    model = small_net()
    t, plan, masks, seen = masked_trainer(model)
    g = torch.Generator().manual_seed(1)
    for p in (q for group in t.optimizer.param_groups for q in group["params"]):
        t.optimizer.state[p] = {"step": torch.tensor(10.0), "exp_avg": torch.randn(p.shape, generator=g),
                                "exp_avg_sq": torch.rand(p.shape, generator=g) + 0.1}
    train_one_epoch(t, loader())
    assert seen["steps"] == 7
    assert_invariants(model, plan, masks)


def test_partial_accumulation_tail_steps():
    torch.manual_seed(0)
    model = small_net()
    t, plan, masks, seen = masked_trainer(model, grad_accum=3)
    train_one_epoch(t, loader(n=28, batch=4))  # 7 micro-batches: groups of 3, 3 and 1
    assert seen["steps"] == 3 and t.step == 3
    assert_invariants(model, plan, masks, t.optimizer)


def test_accumulated_step_equals_one_big_batch():
    """Three micro-batches of 4 with --grad-accum 3 give the same update as one batch of 12."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 36, 4))  # no BatchNorm
    a, b = copy.deepcopy(net), copy.deepcopy(net)
    ta, *_ = masked_trainer(a, grad_accum=3)
    tb, *_ = masked_trainer(b, grad_accum=1)
    train_one_epoch(ta, loader(n=12, batch=4))
    train_one_epoch(tb, loader(n=12, batch=12))
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("amp_dtype", [None, torch.bfloat16])
def test_masks_hold_under_torch_compile(amp_dtype):
    """Compiled with static shapes, as the driver compiles: an epoch's smaller last batch gets
    a graph of its own and ends a shorter accumulation group (30 images in batches of 4,
    --grad-accum 3: groups of 3, 3 and 2 batches)."""
    torch.manual_seed(0)
    model = small_net()
    t, plan, masks, seen = masked_trainer(model, amp_dtype=amp_dtype, compiled=True, grad_accum=3)
    for _ in range(2):
        train_one_epoch(t, loader(n=30))
        assert_invariants(model, plan, masks, t.optimizer)
    assert seen["steps"] == 6


def test_regularizer_step_on_compiled_model_matches_eager():
    """Stage 1 under torch.compile takes the same steps as in eager mode."""
    torch.manual_seed(0)
    eager = small_net()
    compiled = copy.deepcopy(eager)
    args = vgg8.get_args_parser().parse_args(["--lr", "1e-2", "--beta", "50"])
    results = []
    for model, use_compile in ((eager, False), (compiled, True)):
        plan = topk_plan(model, 1)
        reg = AuxRegularizer(model, plan, "exponential", 3.0)
        t = build_trainer(torch.compile(model) if use_compile else model, model, args=args,
                              device=torch.device("cpu"), amp_dtype=None, min_lr=0.0, total_steps=10,
                              dist=Dist(), regularizer=reg, beta=args.beta)
        results.append(train_one_epoch(t, loader(n=8)))
    assert results[0]["train_aux"] > 0
    assert results[0]["train_aux"] == pytest.approx(results[1]["train_aux"], rel=1e-4)
    for pa, pb in zip(eager.parameters(), compiled.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-4, atol=1e-5)


def test_masked_model_deepcopies_and_pickles():
    model = small_net()
    masks = compute_masks(model, topk_plan(model, K))
    masker = Masker(model, masks)
    masker.apply_()
    clone = copy.deepcopy(model)
    restored = pickle.loads(pickle.dumps(model))
    for m in (clone, restored):
        assert all(torch.equal(a, b) for a, b in zip(model.parameters(), m.parameters()))
    assert set(pickle.loads(pickle.dumps(masks))) == set(masks)
    copy.deepcopy(masker)


def test_the_compiled_model_keeps_static_shapes(monkeypatch):
    """The training driver compiles with static shapes: an epoch's last, smaller batch gets a
    graph of its own, and no graph with a symbolic batch size (which would then serve every
    later full batch) is made."""
    import types

    import tkp_common as tkp
    graphs, compile_ = [], torch.compile

    def record(gm, example_inputs):  # whether the graph takes a symbolic size
        values = [n.meta.get("example_value") for n in gm.graph.nodes if n.op == "placeholder"]
        graphs.append(any(isinstance(v, torch.SymInt) or isinstance(v, torch.Tensor)
                          and any(isinstance(d, torch.SymInt) for d in v.shape) for v in values))
        return gm.forward

    monkeypatch.setattr(torch, "compile", lambda model, **kw: compile_(model, backend=record, **kw))
    torch._dynamo.reset()
    run = types.SimpleNamespace(module=small_net(), dist=Dist(), device=torch.device("cpu"), use_compile=True)
    model = tkp._wrap(run)
    for batch in (4, 4, 2, 4, 2):
        model(torch.randn(batch, 3, 8, 8))
    torch._dynamo.reset()
    assert graphs == [False, False]
