"""tkp_lib.tapgroup: the tap-group kernel (tkp::tap_group_conv2d) and its torch-ops fallback
against F.conv2d, detection of tap groups, and deployment of a VGG-8 trained with
--tap-group 32 (TapGroupConv2d layers where faster, same predictions, deploy.pt reloads)."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import tkp_deploy as D
from tkp_lib import deploy_layers, kernels
from tkp_lib import tapgroup as T

ROOT = Path(__file__).resolve().parents[1]


def grouped_conv(c_in, c_out, ks, stride, pad, k, group, gen, bias=True):
    """A Conv2d (kernel size ks: an int or (kh, kw)) whose groups of `group` outputs (smaller
    last group) share k random taps per input."""
    conv = nn.Conv2d(c_in, c_out, ks, stride, pad, bias=bias)
    w = conv.weight.data.reshape(c_out, c_in, -1)
    mask = torch.zeros_like(w)
    for o in range(0, c_out, group):
        idx = torch.rand(c_in, w.shape[-1], generator=gen).topk(k, -1).indices
        mask[o:o + group].scatter_(-1, idx.unsqueeze(0).expand(min(group, c_out - o), -1, -1), 1.0)
    conv.weight.data = (w * mask).reshape(conv.weight.shape)
    return conv


def max_rel(y, ref):
    return float(((y - ref).abs().max() / ref.abs().max().clamp_min(1e-12)).detach())


@pytest.fixture(scope="module")
def kernel():
    if not T.kernel_available():
        pytest.skip(f"the tap-group kernel cannot be built here: {kernels.problem('tap_group_conv')}")
    return T.tile_kinds()


def random_cases(n, seed):
    rng = torch.Generator().manual_seed(seed)

    def pick(options):
        return options[int(torch.randint(len(options), (1,), generator=rng))]

    fixed = [(1, 64, 64, 1, 1, 1, 32, 16), (3, 17, 40, 2, 2, 3, 16, 9), (1, 3, 19, 1, 0, 4, 8, 5),
             (2, 32, 64, 1, 1, 1, 32, 7), (1, 16, 32, 2, 1, 2, 32, 14)]
    rand = [(pick([1, 3]), pick([3, 5, 17, 32]), pick([8, 19, 40, 70]), pick([1, 2]), pick([0, 1, 2]),
             pick([1, 2, 3, 4]), pick([8, 16, 32]), pick([5, 7, 9, 14, 16])) for _ in range(n)]
    return fixed + rand


def test_kernel_and_fallback_match_conv2d_over_random_shapes(kernel):
    gen = torch.Generator().manual_seed(0)
    for i, (n, c_in, c_out, s, p, k, g, hw) in enumerate(random_cases(25, 1)):
        conv = grouped_conv(c_in, c_out, 3, s, p, k, g, gen, bias=i % 3 != 0)
        group, kk = T.tap_group_of(conv)
        assert kk <= k and group >= g or c_out <= group, (group, g, c_out)
        x = torch.randn(n, c_in, hw, hw + 1, generator=gen)
        ref = conv(x).detach()
        for tile in kernel:
            m = T.TapGroupConv2d.from_conv(conv, group, kk, tile)
            assert max_rel(m(x), ref) < 1e-5, (i, tile)
        assert max_rel(m.forward_torch(x), ref) < 1e-5
        assert torch.equal(m.dense_weight(), conv.weight.detach())


def test_a_tile_this_build_lacks_runs_on_the_default(kernel):
    """AVX-512 and AVX2 builds compile different tiles: one named by a deploy.pt written
    elsewhere runs on the group's default tile."""
    gen = torch.Generator().manual_seed(3)
    conv = grouped_conv(16, 64, 3, 1, 1, 1, 32, gen)
    x = torch.randn(2, 16, 9, 9, generator=gen)
    m = T.TapGroupConv2d.from_conv(conv, 32, 1, tile=(48, 5))
    assert (48, 5) not in kernel and m.kernel_tile() == T.default_tile(32)
    assert max_rel(m(x), conv(x).detach()) < 1e-5


def test_epilogue_residual_relu_pool_and_threads(kernel):
    """The tiles add the residual and apply ReLU in their registers and store straight to the
    output, or to the pool's buffer: 48 outputs leave the last block of 32 part empty, whose
    residual is read and output written only in its first 16 channels."""
    gen = torch.Generator().manual_seed(2)
    conv = grouped_conv(32, 48, 3, 1, 1, 1, 16, gen)
    old = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            for n, hw in ((1, 12), (3, 13), (2, 7), (1, 14)):  # 7 and 14 wide: rows walked one by one
                x = torch.randn(n, 32, hw, hw, generator=gen)
                r = torch.randn(n, 48, hw, hw, generator=gen)
                for pool in (0, 2):
                    ref = torch.relu(conv(x) + r).detach()
                    ref = F.max_pool2d(ref, 2) if pool else ref
                    for tile in kernel:
                        m = T.TapGroupConv2d.from_conv(conv, 16, 1, tile)
                        m.relu, m.pool = True, pool
                        assert max_rel(m(x, r), ref) < 1e-5, (threads, n, hw, pool, tile)
                    assert max_rel(m.forward_torch(x, r), ref) < 1e-5
    finally:
        torch.set_num_threads(old)


def test_whole_image_and_split_units_over_threads_match_conv2d(kernel):
    """At 2 threads a batch of at least 8 images is shared out image by image (every block
    of an image in one unit), a smaller one by (image, block, rows); 80 outputs make 3
    blocks, the last one partly empty. Batch sizes 1-9, 1 and 2 threads."""
    gen = torch.Generator().manual_seed(4)
    conv = grouped_conv(64, 80, 3, 1, 1, 1, 32, gen)
    m = T.TapGroupConv2d.from_conv(conv, 32, 1, next(t for t in kernel if t[0] == 32))
    old = torch.get_num_threads()
    try:
        for n in range(1, 10):
            x = torch.randn(n, 64, 16, 16, generator=gen)
            ref = conv(x).detach()
            for threads in (1, 2):
                torch.set_num_threads(threads)
                assert max_rel(m(x), ref) < 1e-5, (n, threads)
    finally:
        torch.set_num_threads(old)


def test_non_square_kernels_strides_and_paddings_match_conv2d(kernel):
    """1x3, 3x5 and 5x3 kernels with unequal strides and paddings: each entry reads its tap's
    phase, row and column of the padded input, whichever the tap's (dy, dx)."""
    gen = torch.Generator().manual_seed(4)
    for (kh, kw), stride, pad, hw in (((1, 3), (1, 2), (0, 1), (7, 9)), ((3, 5), (2, 1), (1, 2), (9, 8)),
                                      ((5, 3), (2, 3), (2, 0), (11, 10))):
        conv = grouped_conv(24, 40, (kh, kw), stride, pad, 2, 16, gen)
        x = torch.randn(2, 24, *hw, generator=gen)
        ref = conv(x).detach()
        for tile in kernel:
            m = T.TapGroupConv2d.from_conv(conv, 16, 2, tile)
            assert max_rel(m(x), ref) < 1e-5, (kh, kw, stride, pad, tile)


def test_wide_inputs_and_every_walk_match_conv2d(kernel):
    """256 and 512 input channels (the padded buffer gets one cache line more per pixel),
    and planes on which the tiles walk across rows, row by row and by pairs of rows (7x7,
    an odd last row), with the epilogue, at 1 and 2 threads."""
    gen = torch.Generator().manual_seed(3)
    old = torch.get_num_threads()
    try:
        for c_in, n, hw, stride, pool in ((256, 1, 7, 1, 0), (512, 2, 7, 1, 2), (256, 1, 9, 2, 0), (64, 3, 5, 1, 0),
                                          (48, 1, 11, 1, 2)):
            conv = grouped_conv(c_in, 64, 3, stride, 1, 2, 32, gen)
            x = torch.randn(n, c_in, hw, hw, generator=gen)
            y = conv(x).detach()
            r = torch.randn(y.shape, generator=gen)
            ref = F.max_pool2d(torch.relu(y + r), 2) if pool else torch.relu(y + r)
            for threads in (1, 2):
                torch.set_num_threads(threads)
                for tile in kernel:
                    m = T.TapGroupConv2d.from_conv(conv, 32, 2, tile)
                    m.relu, m.pool = True, pool
                    assert max_rel(m(x, r), ref) < 1e-5, (c_in, n, hw, stride, pool, threads, tile)
    finally:
        torch.set_num_threads(old)


def test_inner_tiles_and_the_copied_border_match_conv2d(kernel):
    """At stride 1 the inner tiles read the image itself and only the border is copied into
    the padded buffer, which each thread keeps from call to call: before every call a stride-2
    layer fills that buffer with an input a thousand times larger, whose values any border
    read left uncopied would pick up; kernels of 1 to 5 rows and columns, paddings 0 to 2, odd
    sizes, 1 and 2 threads (the 48x45 input in units of rows on both)."""
    gen = torch.Generator().manual_seed(5)
    old = torch.get_num_threads()
    try:
        for (kh, kw), pad, hw in (((3, 3), (1, 1), (12, 13)), ((5, 5), (2, 2), (14, 12)), ((1, 3), (0, 1), (6, 15)),
                                  ((3, 5), (1, 0), (11, 17)), ((3, 3), (0, 0), (10, 10)), ((5, 3), (2, 1), (13, 9)),
                                  ((3, 3), (1, 1), (48, 45))):
            conv = grouped_conv(24, 40, (kh, kw), 1, pad, 2, 16, gen)
            x = torch.randn(2, 24, *hw, generator=gen)
            ref = conv(x).detach()
            loud_conv = nn.Conv2d(24, 40, 3, 2, 1)
            loud = 1000 * torch.randn(1, 24, 2 * hw[0] + 8, 2 * hw[1] + 8, generator=gen)  # pads 4 planes of it
            for threads in (1, 2):
                torch.set_num_threads(threads)
                for tile in kernel:
                    m = T.TapGroupConv2d.from_conv(conv, 16, 2, tile)
                    T.TapGroupConv2d.from_conv(loud_conv, 16, 2, tile)(loud)
                    assert max_rel(m(x), ref) < 1e-5, (kh, kw, pad, hw, threads, tile)
    finally:
        torch.set_num_threads(old)


def test_rows_end_in_short_tiles_that_match_conv2d(kernel):
    """Where a tile's RB positions do not divide a row's OW outputs, the walk by rows can end
    each row in RB - OW % RB tiles of RB - 1 (16 columns of 6: 6 + 5 + 5, none dropped), taken
    where it computes fewer positions than the other walks: every tile and remainder, stride 1
    (inner tiles; the thread's buffer filled loud before each call) and 2, with a residual and
    ReLU or a pool."""
    walk = T.kernel().walk  # (c, h, w, kh, kw, sh, sw, ph, pw, B, RB) -> [walk, columns of a row's tiles...]
    if (16, 6) in kernel:
        assert walk(64, 16, 16, 3, 3, 1, 1, 1, 1, 16, 6) == [1, 6, 5, 5]
        # 30 columns paired, measured faster than 28 by rows in 6 + 6 + 6 + 5 + 5
        assert walk(64, 28, 28, 3, 3, 1, 1, 1, 1, 16, 6) == [2] + [3] * 10
    gen = torch.Generator().manual_seed(6)
    loud_conv = nn.Conv2d(8, 40, 3, 2, 1)
    short_rows = 0
    for b, rb in kernel:
        for ow in range(rb + 1, 3 * rb + 1) if rb >= 4 else ():
            for stride in (1, 2):
                conv = grouped_conv(8, 40, 3, stride, 1, 2, 16, gen)
                x = torch.randn(1, 8, 5 * stride, ow * stride, generator=gen)
                plan = walk(8, *x.shape[2:], 3, 3, stride, stride, 1, 1, b, rb)
                if plan[0] == 1 and rb - 1 in plan:
                    assert sum(plan[1:]) == ow and set(plan[1:]) <= {rb, rb - 1}, (b, rb, ow, plan)
                    short_rows += 1
                y = conv(x).detach()
                r = torch.randn(y.shape, generator=gen)
                pool = ow % 2 == 0
                ref = F.max_pool2d(torch.relu(y), 2) if pool else torch.relu(y + r)
                m = T.TapGroupConv2d.from_conv(conv, 16, 2, (b, rb))
                m.relu, m.pool = True, int(pool) * 2
                T.TapGroupConv2d.from_conv(loud_conv, 16, 2, (b, rb))(1000 * torch.randn(1, 8, 30, 6 * rb + 8))
                assert max_rel(m(x, None if pool else r), ref) < 1e-5, (b, rb, ow, stride, plan)
    assert short_rows >= 10


def test_outputs_come_from_a_bounded_cache_of_freed_ones(kernel):
    """Outputs of 256 KiB or more come from a cache of freed ones (csrc/outputs.h): a freed
    output's memory serves the next output of its size, never one while it is alive; it stays
    an ordinary resizable tensor; at most 16 freed buffers and 256 MiB are kept, and
    kernels.free_cached_outputs() frees them, leaving the outputs in use alone."""
    gen = torch.Generator().manual_seed(6)
    mod = T.kernel()
    conv = grouped_conv(16, 64, 3, 1, 1, 1, 32, gen)
    m = T.TapGroupConv2d.from_conv(conv, 32, 1)
    x = torch.randn(2, 16, 32, 32, generator=gen)  # outputs of 512 KiB
    first = m(x)
    second = m(2 * x)
    assert first.data_ptr() != second.data_ptr()
    assert max_rel(first, conv(x).detach()) < 1e-5 and max_rel(second, conv(2 * x).detach()) < 1e-5
    kept = first.data_ptr()
    del first
    cached = mod.output_cache()[0]  # first's buffer among them (the oldest dropped if 16 were kept)
    third = m(3 * x)
    assert third.data_ptr() == kept and mod.output_cache()[0] == cached - 1, "the freed output was not reused"
    assert max_rel(third, conv(3 * x).detach()) < 1e-5 and max_rel(second, conv(2 * x).detach()) < 1e-5
    in_memory = third.permute(0, 2, 3, 1).flatten().clone()  # channels_last: NHWC order
    third.resize_(4, 64, 32, 32)  # a storage torch can grow, its values kept
    assert third.shape == (4, 64, 32, 32) and torch.equal(third.flatten()[:in_memory.numel()], in_memory)
    del second, third
    outputs = [m(torch.randn(n, 16, 32, 32, generator=gen)) for n in range(1, 21)]  # 20 sizes, 256 KiB to 5 MiB
    del outputs
    assert mod.output_cache()[0] == 16
    big = [m(torch.randn(300, 16, 32, 32, generator=gen)) for _ in range(4)]  # 75 MiB each
    del big
    buffers, held = mod.output_cache()
    assert buffers <= 16 and held <= 256 * 2**20
    live = m(x)
    expected = live.clone()
    del live
    live = m(x)  # an output from the cache, still in use while the cache is released
    spare = m(2 * x)
    del spare  # one buffer kept at least
    held = mod.output_cache()[1]
    assert kernels.free_cached_outputs() >= held > 0 and mod.output_cache() == [0, 0]  # (and the other kernels')
    assert torch.equal(live, expected) and max_rel(m(x), conv(x).detach()) < 1e-5  # a live one untouched


@pytest.mark.parametrize("kind", ["tapgroup", "topk", "depthwise"])
def test_the_layers_call_arguments_follow_its_buffers_and_epilogue(kind):
    """Each kernel layer's forward reuses the arguments it built with the packed weights: a
    bias changed in place (also by load_state_dict, and after .to() gave the layer new
    buffers), the ReLU and the pool switched after the first call all take effect."""
    from tkp_lib import depthwise, topk_conv
    gen = torch.Generator().manual_seed(7)
    if kind == "tapgroup":
        conv = grouped_conv(16, 40, 3, 1, 1, 1, 16, gen)
        make, available = (lambda: T.TapGroupConv2d.from_conv(conv, 16, 1)), T.kernel_available()
    elif kind == "topk":
        conv = grouped_conv(16, 40, 3, 1, 1, 2, 1, gen)
        make, available = (lambda: topk_conv.TopKConv2d.from_conv(conv)), topk_conv.kernel_available()
    else:
        conv = nn.Conv2d(16, 16, 3, 1, 1, groups=16)
        make, available = (lambda: depthwise.DepthwiseTopKConv2d.from_conv(conv)), depthwise.kernel_available()
    if not available:
        pytest.skip(f"the {kind} kernel cannot be built here")
    m = make()
    x = torch.randn(2, 16, 12, 12, generator=gen)
    y = m(x)
    assert max_rel(y, conv(x).detach()) < 1e-5
    n = y.shape[1]
    m.bias.sub_(0.2)  # outputs of both signs
    assert torch.allclose(m(x), y - 0.2, atol=1e-5) and (y - 0.2).min() < 0 < (y - 0.2).max()
    m.relu = True
    assert torch.allclose(m(x), torch.relu(y - 0.2), atol=1e-5)
    m.pool = 2
    assert torch.allclose(m(x), F.max_pool2d(torch.relu(y - 0.2), 2), atol=1e-5)
    m.relu, m.pool = False, 0
    m.load_state_dict({**m.state_dict(), "bias": torch.zeros(n)})
    assert torch.allclose(m(x), y - conv.bias.detach().reshape(1, -1, 1, 1), atol=1e-5)
    m.double().float()
    m.bias.add_(2.0)
    assert torch.allclose(m(x), y - conv.bias.detach().reshape(1, -1, 1, 1) + 2, atol=1e-5)


def test_detection():
    gen = torch.Generator().manual_seed(3)
    assert T.tap_group_of(grouped_conv(8, 64, 3, 1, 1, 1, 16, gen)) == (16, 1)
    assert T.tap_group_of(grouped_conv(8, 70, 3, 1, 1, 2, 32, gen)) == (32, 2)
    free = nn.Conv2d(8, 64, 3)  # the paper's mask: every kernel its own taps
    with torch.no_grad():
        w = free.weight.reshape(64, 8, 9)
        w.mul_(torch.zeros_like(w).scatter_(-1, w.abs().topk(1, -1).indices, 1.0))
    assert T.tap_group_of(free) is None
    assert T.tap_group_of(nn.Conv2d(8, 64, 3)) is None  # dense


def test_fallback_runs_in_bfloat16():
    gen = torch.Generator().manual_seed(4)
    conv = grouped_conv(16, 40, 3, 2, 1, 2, 16, gen)
    m = T.TapGroupConv2d.from_conv(conv, 16, 2).to(torch.bfloat16)
    x = torch.randn(2, 16, 10, 10, generator=gen)
    y = m(x.to(torch.bfloat16)).float()
    assert max_rel(y, conv(x).detach()) < 3e-2


@pytest.fixture(scope="module")
def grouped_final(tmp_path_factory):
    out = tmp_path_factory.mktemp("vgg8_g32")
    proc = subprocess.run([sys.executable, str(ROOT / "vgg8_optimized.py"), "--dry-run", "--tap-group", "32",
                           "--output-dir", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return out / "final.pt"


def test_vgg8_tap_group_deploys_and_reloads(grouped_final, tmp_path):
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = tmp_path / "deploy.pt"
        report = D.main([str(grouped_final), "--output", str(out), "--batch-sizes", "1,8", "--repeats", "3"])
    finally:
        torch.set_num_threads(old)
    pruned = [r for r in report["layers"] if r["k"] < 9]
    assert pruned and report["check"]["ok"] and report["check"]["top1_identical"]
    kinds = {r["deploy"] for r in pruned}
    if T.kernel_available():
        assert "tapgroup" in kinds, [(r["name"], r["deploy"], r["why"]) for r in pruned]
        fused = [m for m in D.load(out).modules() if isinstance(m, T.TapGroupConv2d)]
        assert any(m.relu for m in fused) and any(m.pool == 2 for m in fused)  # VGG's ReLU and pools folded
        assert all(r["group"] == 32 for r in pruned if r["deploy"] == "tapgroup")
    code = ("import torch, tkp_deploy as D; gm = D.load(r'%s'); "
            "print(sum(type(m).__name__ == 'TapGroupConv2d' for m in gm.modules())); "
            "print(gm(torch.zeros(2, 3, 32, 32)).shape[0])" % out)
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.split()
    assert int(lines[-2]) == sum(r["deploy"] == "tapgroup" for r in pruned) and lines[-1] == "2"
    reloaded, reference = D.load(out), D.load(out)
    x = torch.randn(4, 3, 32, 32)
    assert torch.equal(reloaded(x).argmax(1), reference(x).argmax(1))


def test_fallback_module_gives_the_same_predictions(grouped_final):
    model, input_shape, _ = D.rebuild_model(str(grouped_final))
    folded = deploy_layers.fold_batchnorm(model).eval()
    x = torch.randn(8, *input_shape)
    ref = folded(x).detach()
    for name, conv in list(folded.named_modules()):
        gk = T.tap_group_of(conv)
        if gk is not None:
            m = T.TapGroupConv2d.from_conv(conv, *gk)
            m.forward = m.forward_torch  # the torch-ops path, as where the kernel is unavailable
            deploy_layers._set_module(folded, name, m)
    assert any(isinstance(m, T.TapGroupConv2d) for m in folded.modules())
    y = folded(x).detach()
    assert max_rel(y, ref) < 1e-4 and torch.equal(y.argmax(1), ref.argmax(1))


def test_tap_group_network_runs_channels_last_from_its_input(kernel):
    gen = torch.Generator().manual_seed(5)
    model = nn.Sequential(grouped_conv(3, 32, 3, 1, 1, 9, 32, gen), nn.ReLU(),
                          grouped_conv(32, 32, 3, 1, 1, 1, 16, gen), nn.ReLU(), nn.MaxPool2d(2),
                          grouped_conv(32, 48, 3, 2, 1, 2, 16, gen), nn.Flatten(),
                          nn.Linear(48 * 4 * 4, 10)).eval()
    gm = deploy_layers.fold_batchnorm(model)
    records = [{"name": "2", "deploy": "tapgroup", "group": 16, "group_k": 1, "tile": list(kernel[0])},
               {"name": "5", "deploy": "tapgroup", "group": 16, "group_k": 2, "tile": list(kernel[-1])}]
    deployed = deploy_layers.apply_layers(gm, records, (3, 16, 16))
    methods = [n.target for n in deployed.graph.nodes if n.op == "call_method"]
    assert methods[:3] == ["permute", "contiguous", "permute"]  # converted once, at the input
    assert deployed.get_submodule("0").weight.is_contiguous(memory_format=torch.channels_last)  # dense conv too
    seen = []
    hooks = [m.register_forward_pre_hook(lambda m, a: seen.append(a[0].is_contiguous(
        memory_format=torch.channels_last))) for m in deployed.modules() if isinstance(m, T.TapGroupConv2d)]
    x = torch.randn(2, 3, 16, 16, generator=gen)
    y = deployed(x)
    for h in hooks:
        h.remove()
    assert seen == [True, True]
    assert max_rel(y, model(x).detach()) < 1e-5


def test_nchw_kernels_are_timed_in_the_channels_last_network_they_join(kernel, monkeypatch):
    """A network with tap-group masks runs channels_last, so a layer that falls back to the
    (NCHW) Top-K kernel is timed on channels_last input with its output converted back."""
    gen = torch.Generator().manual_seed(5)
    stem = nn.Conv2d(3, 16, 3, padding=1)  # per-kernel Top-1 taps: the Top-K kernel's
    with torch.no_grad():
        w = stem.weight.flatten(2)
        stem.weight.copy_((w * F.one_hot(w.abs().argmax(-1), 9)).reshape_as(stem.weight))
    net = nn.Sequential(stem, nn.ReLU(), grouped_conv(16, 32, 3, 1, 1, 1, 16, gen))
    flags = []
    real = deploy_layers.time_layer
    monkeypatch.setattr(deploy_layers, "time_layer", lambda *a: flags.append(a[-1]) or real(*a))
    deploy_layers.choose_layers(deploy_layers.trace(net), (3, 8, 8), [1], repeats=1, log=lambda s: None)
    assert flags and all(flags)
    flags.clear()
    deploy_layers.choose_layers(deploy_layers.trace(nn.Sequential(stem)), (3, 8, 8), [1], repeats=1,
                                log=lambda s: None)
    assert flags == [False]

    seen = []

    class Spy(nn.Module):  # an NCHW kernel layer that notes the layout it is given
        def forward(self, x):
            seen.append(x.is_contiguous(memory_format=torch.channels_last))
            return stem(x).contiguous()

    for channels_last in (False, True):
        seen.clear()
        _, timings = deploy_layers.time_layer(stem, lambda t: Spy(), (1, 3, 8, 8), [1], 1, [None], channels_last)
        assert seen and all(s == channels_last for s in seen) and timings[1]["kernel_ms"] > 0
