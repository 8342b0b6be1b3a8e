"""tkp_deploy: the Top-K kernel against F.conv2d, deployment of every CNN script's final.pt,
the dense fallback without a kernel, and deploy.pt read back in a fresh process."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import tkp_deploy as D
from tkp_lib import deploy_layers, kernels, topk_conv

ROOT = Path(__file__).resolve().parents[1]

# (script, extra dry-run flags): every CNN script, at 32 px
CNN_SCRIPTS = {
    "vgg8": [], "resnet56": [], "vgg19": [],
    "googlenet": ["--img-size", "32", "--no-pretrain"], "densenet": ["--img-size", "32", "--no-pretrain"],
}


def topk_weight(c_out, c_in, kh, kw, k, gen, zero_kernels=0.0):
    """A random weight keeping the k largest |w| of each kernel; a fraction of all-zero kernels."""
    w = torch.randn(c_out, c_in, kh * kw, generator=gen)
    keep = torch.zeros_like(w, dtype=torch.bool).scatter_(2, w.abs().topk(k, dim=2).indices, True)
    w = w * keep * (torch.rand(c_out, c_in, 1, generator=gen) >= zero_kernels)
    return w.reshape(c_out, c_in, kh, kw)


@pytest.fixture(scope="module")
def kernel():
    if not topk_conv.kernel_available():
        pytest.skip(f"the Top-K kernel cannot be built here: {topk_conv.kernel_problem()}")
    return topk_conv.tile_kinds()


def relative_error(y, ref):
    return float((y - ref).detach().abs().max() / ref.detach().abs().max().clamp_min(1e-12))


# ---- the kernel -------------------------------------------------------------------------------

def test_kernel_matches_conv2d_over_random_shapes(kernel):
    gen = torch.Generator().manual_seed(0)
    rng = torch.Generator().manual_seed(1)

    def pick(options):
        return options[int(torch.randint(len(options), (1,), generator=rng))]

    cases = [  # (batch, c_in, c_out, kernel, stride, padding, K, H, W) fixed corners, then random ones
        (1, 3, 64, (3, 3), 1, 1, 1, 32, 32), (3, 17, 5, (7, 7), 2, 3, 8, 23, 19), (1, 5, 17, (7, 7), 1, 0, 3, 9, 12),
        (3, 64, 64, (3, 3), 1, 1, 2, 32, 32),  # more than one image group per call
        (1, 1, 1, (3, 3), 2, 2, 1, 1, 1), (2, 5, 3, (1, 3), 1, 1, 2, 6, 7),
    ]
    for _ in range(60):
        kh, kw = pick([(3, 3), (7, 7), (5, 5), (3, 1)])
        p = pick([0, 1, 2, 3])
        cases.append((pick([1, 3]), pick([3, 5, 17, 32]), pick([1, 5, 16, 17]), (kh, kw), pick([1, 2, 2, 3]), p,
                      pick(list(range(1, min(8, kh * kw - 1) + 1))), pick([max(1, kh - 2 * p), 8, 13, 20]),
                      pick([max(1, kw - 2 * p), 8, 15, 21])))
    for n, c_in, c_out, (kh, kw), stride, pad, k, h, w in cases:
        h, w = max(h, kh - 2 * pad), max(w, kw - 2 * pad)
        weight = topk_weight(c_out, c_in, kh, kw, k, gen, zero_kernels=0.2)
        conv = nn.Conv2d(c_in, c_out, (kh, kw), stride, pad, bias=bool(torch.rand(1, generator=rng) < 0.5))
        with torch.no_grad():
            conv.weight.copy_(weight)
        x = torch.randn(n, c_in, h, w, generator=gen)
        ref = conv(x)
        tile = pick(kernel)
        m = topk_conv.TopKConv2d.from_conv(conv, tile)
        assert m.k <= k
        y = m(x)
        assert y.shape == ref.shape
        assert relative_error(y, ref) < 1e-5, (n, c_in, c_out, kh, kw, stride, pad, k, h, w, tile)


def test_every_tile_matches_conv2d_where_the_last_tile_ends_early(kernel):
    """Each call computes the flat positions up to the last output only (not the padding rows
    after the last image): every compiled tile, at plane sizes whose last tile is cut short,
    one and several images, strides 1 and 2, against F.conv2d."""
    gen = torch.Generator().manual_seed(11)
    for n, c, ks, stride, pad, hw in [(1, 9, 3, 1, 1, 7), (1, 6, 3, 1, 1, 8), (3, 5, 3, 1, 1, 5), (2, 4, 3, 2, 1, 9),
                                      (1, 3, 5, 1, 2, 11)]:
        conv = nn.Conv2d(c, c + 2, ks, stride, pad)
        with torch.no_grad():
            conv.weight.copy_(topk_weight(c + 2, c, ks, ks, 1, gen))
        x = torch.randn(n, c, hw, hw, generator=gen)
        ref = conv(x)
        for tile in kernel:
            m = topk_conv.TopKConv2d.from_conv(conv, tile)
            assert relative_error(m(x), ref) < 1e-5, (n, c, ks, stride, hw, tile)


def test_copies_per_kernel_column_match_conv2d(kernel, monkeypatch):
    """Tiles (M, S, 1) read, at stride 1, one copy of the input per kernel column whose rows are
    Wo rounded up to 8 floats, without padding columns: every such tile against F.conv2d at
    kernels 1x1 to 7x7 and 1x3 / 3x1, paddings from 0 to past the kernel's half, widths on and
    either side of multiples of 8, one and many images (several groups per call), with a
    residual, ReLU and the 2x2 pool, on 1 and 2 threads; and at stride 2, where they run as
    (M, S, 0)."""
    gen = torch.Generator().manual_seed(12)
    columns = [t for t in kernel if t[2] == 1]
    real, asked = topk_conv.kernel(), []  # the kernel's last argument on every call: columns

    class Spy:
        def __getattr__(self, name):
            return getattr(real, name)

        def topk_conv2d(self, *args):
            asked.append(args[-1])
            return real.topk_conv2d(*args)

    monkeypatch.setattr(topk_conv, "kernel", Spy)
    assert columns and all(t[0] > 0 for t in columns)
    threads = torch.get_num_threads()
    cases = [  # (n, c_in, c_out, (kh, kw), stride, (ph, pw), k, h, w, residual + relu + pool)
        (1, 9, 7, (3, 3), 1, (1, 1), 1, 8, 8, False), (2, 5, 6, (3, 3), 1, (1, 1), 2, 7, 9, True),
        (1, 4, 5, (1, 1), 1, (0, 0), 1, 5, 16, False), (3, 6, 4, (1, 3), 1, (0, 1), 2, 6, 17, True),
        (2, 3, 5, (3, 1), 1, (2, 0), 1, 9, 15, False), (1, 5, 3, (5, 5), 1, (3, 4), 3, 6, 7, True),
        (2, 7, 9, (7, 7), 1, (3, 3), 8, 11, 24, False), (1, 6, 5, (3, 3), 1, (0, 0), 1, 10, 10, True),
        (40, 16, 8, (3, 3), 1, (1, 1), 1, 16, 16, True),  # more than one group of images
        (2, 5, 6, (3, 3), 2, (1, 1), 2, 13, 12, False),
    ]
    try:
        for n_threads in (1, 2):
            torch.set_num_threads(n_threads)
            for n, c_in, c_out, (kh, kw), stride, pad, k, h, w, extras in cases:
                conv = nn.Conv2d(c_in, c_out, (kh, kw), stride, pad)
                with torch.no_grad():
                    conv.weight.copy_(topk_weight(c_out, c_in, kh, kw, k, gen, zero_kernels=0.2))
                x = torch.randn(n, c_in, h, w, generator=gen)
                ref = conv(x)
                r = torch.randn(ref.shape, generator=gen) if extras else None
                if extras:
                    ref = F.max_pool2d(F.relu(ref + r), 2)
                for tile in columns:
                    m = topk_conv.TopKConv2d.from_conv(conv, tile)
                    m.relu, m.pool = extras, 2 if extras else 0
                    assert m.kernel_tile() == tile
                    assert relative_error(m(x, r), ref) < 1e-5, (n_threads, n, c_in, kh, kw, stride, pad, h, w, tile)
                    assert asked[-1:] == [1], tile  # the kernel was asked for the copies
                    # and lays the input out as copies: kw planes whose rows are Wo rounded up to 8
                    wo = (w + 2 * pad[1] - kw) // stride + 1
                    layout = real.geometry(c_in, h, w, kh, kw, stride, stride, *pad, 16 * tile[1], 1)
                    assert layout == ([1, kw, -(-wo // 8) * 8] if stride == 1 else [0, stride * stride, layout[2]])
    finally:
        torch.set_num_threads(threads)


def test_aligned_tiles_match_conv2d(kernel):
    """Tiles (0, S): one output at a time, sums grouped by tap at aligned positions."""
    gen = torch.Generator().manual_seed(10)
    aligned = [t for t in kernel if t[0] == 0]
    assert aligned
    for n, c_in, c_out, ks, stride, pad, k, hw in [(1, 16, 5, 3, 1, 1, 1, 9), (2, 7, 9, 3, 2, 1, 3, 13),
                                                    (1, 5, 3, 7, 1, 3, 8, 11), (3, 17, 4, 5, 3, 2, 2, 20),
                                                    (1, 64, 8, 3, 1, 1, 2, 32)]:
        conv = nn.Conv2d(c_in, c_out, ks, stride, pad)
        with torch.no_grad():
            conv.weight.copy_(topk_weight(c_out, c_in, ks, ks, k, gen, zero_kernels=0.3))
        x = torch.randn(n, c_in, hw, hw + 1, generator=gen)
        for tile in aligned:
            m = topk_conv.TopKConv2d.from_conv(conv, tile)
            m.relu = bool(n % 2)
            assert relative_error(m(x), F.relu(conv(x)) if m.relu else conv(x)) < 1e-5, (n, c_in, ks, stride, tile)


def test_a_tile_this_build_lacks_runs_on_the_default(kernel):
    """A deploy.pt names the tile measured fastest where it was written; AVX-512 and AVX2
    builds compile different tiles, so a foreign one runs on DEFAULT_TILE, not an error."""
    gen = torch.Generator().manual_seed(5)
    conv = nn.Conv2d(16, 24, 3, padding=1)
    conv.weight.data = topk_weight(24, 16, 3, 3, 1, gen)
    x = torch.randn(2, 16, 9, 9, generator=gen)
    m = topk_conv.TopKConv2d.from_conv(conv, tile=(9, 9))
    assert (9, 9) not in kernel and m.kernel_tile() == topk_conv.DEFAULT_TILE
    with torch.no_grad():
        assert relative_error(m(x), conv(x)) <= 1e-5
    m.set_tile(kernel[0])
    assert m.kernel_tile() == kernel[0]
    with torch.no_grad():
        assert relative_error(m(x), conv(x)) <= 1e-5
        # found during tracing too: torch.compile of a fresh layer, one graph
        fresh = topk_conv.TopKConv2d.from_conv(conv, tile=(9, 9))
        assert relative_error(torch.compile(fresh, fullgraph=True, backend="eager")(x), conv(x)) <= 1e-5


def test_kernel_all_zero_weights_give_the_bias(kernel):
    conv = nn.Conv2d(5, 7, 3, padding=1)
    with torch.no_grad():
        conv.weight.zero_()
    m = topk_conv.TopKConv2d.from_conv(conv)
    assert m.k == 0
    x = torch.randn(2, 5, 6, 6)
    assert torch.allclose(m(x), conv(x))


def test_kernel_epilogue_residual_relu_pool(kernel):
    gen = torch.Generator().manual_seed(2)
    for n, c, h, w in [(1, 16, 32, 32), (3, 5, 9, 7), (2, 17, 8, 8)]:
        conv = nn.Conv2d(c, c, 3, padding=1)
        with torch.no_grad():
            conv.weight.copy_(topk_weight(c, c, 3, 3, 1, gen))
        x, res = torch.randn(n, c, h, w, generator=gen), torch.randn(n, c, h, w, generator=gen)
        m = topk_conv.TopKConv2d.from_conv(conv)
        m.relu, m.pool = True, 2
        assert relative_error(m(x, res), F.max_pool2d(F.relu(conv(x) + res), 2)) < 1e-5
        m.relu, m.pool = False, 0
        assert relative_error(m(x, res), conv(x) + res) < 1e-5


@pytest.mark.parametrize("c, hw", [(32, 16), (64, 32)])  # one group of images split; four groups in parallel
def test_kernel_uses_torch_threads_and_stays_exact(kernel, c, hw):
    gen = torch.Generator().manual_seed(3)
    conv = nn.Conv2d(c, c, 3, padding=1, bias=False)
    with torch.no_grad():
        conv.weight.copy_(topk_weight(c, c, 3, 3, 2, gen))
    m = topk_conv.TopKConv2d.from_conv(conv)
    x = torch.randn(4, c, hw, hw, generator=gen)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = m(x)
        torch.set_num_threads(2)
        two = m(x)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)  # each output is summed in the same order whatever the split
    assert relative_error(one, conv(x)) < 1e-5


def test_batches_shared_out_over_threads_stay_exact(kernel):
    """At 2 threads the batch is cut into a multiple of 2 groups of images with their sizes
    differing by one (64 channels at 24x24: at most 3 images fit a group, so 7 images become
    4 groups of 1-2); at 1 thread into full groups and what is left. Every batch size from 1
    to 9, each output the same at 1 and 2 threads and equal to conv2d."""
    gen = torch.Generator().manual_seed(5)
    conv = nn.Conv2d(64, 64, 3, padding=1)
    with torch.no_grad():
        conv.weight.copy_(topk_weight(64, 64, 3, 3, 1, gen))
    m = topk_conv.TopKConv2d.from_conv(conv)
    before = torch.get_num_threads()
    try:
        for n in range(1, 10):
            x = torch.randn(n, 64, 24, 24, generator=gen)
            torch.set_num_threads(1)
            one = m(x)
            torch.set_num_threads(2)
            assert torch.equal(m(x), one), n
            assert relative_error(one, conv(x)) < 1e-5, n
    finally:
        torch.set_num_threads(before)


def test_dense_weight_rebuilds_the_conv_exactly():
    gen = torch.Generator().manual_seed(4)
    conv = nn.Conv2d(6, 4, 3, padding=1)
    with torch.no_grad():
        conv.weight.copy_(topk_weight(4, 6, 3, 3, 2, gen))
    m = topk_conv.TopKConv2d.from_conv(conv)
    assert m.values.shape == (4, 6, 2) and m.taps.dtype == torch.uint8
    assert torch.equal(m.dense_weight(), conv.weight.detach())
    assert topk_conv.kernel_takes(conv) is None
    dense = nn.Conv2d(6, 4, 3, padding=1)
    assert topk_conv.kernel_takes(dense) == "dense"
    grouped = nn.Conv2d(6, 6, 3, groups=2)
    assert "groups" in topk_conv.kernel_takes(grouped)


# ---- deployment of every CNN script's final.pt --------------------------------------------------

@pytest.fixture(scope="module")
def finals(tmp_path_factory):
    """Each CNN script's final.pt from a dry run (Top-1), two dry runs at a time."""
    base = tmp_path_factory.mktemp("finals")
    names, paths = list(CNN_SCRIPTS), {}
    for i in range(0, len(names), 2):
        procs = {}
        for name in names[i:i + 2]:
            cmd = [sys.executable, str(ROOT / f"{name}_optimized.py"), "--dry-run", "--output-dir", str(base / name),
                   *CNN_SCRIPTS[name]]
            procs[name] = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                           env={**os.environ, "OMP_NUM_THREADS": "1"})
        for name, proc in procs.items():
            log, _ = proc.communicate(timeout=600)
            assert proc.returncode == 0, f"{name} dry run failed:\n{log[-3000:]}"
            paths[name] = base / name / "final.pt"
    return paths


@pytest.fixture
def one_thread():
    """Deployment runs with --threads 1 (on a busy machine two OpenMP threads can each wait
    for the other for milliseconds per operation); torch's setting is restored after."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("name", list(CNN_SCRIPTS))
def test_deploy_matches_the_masked_model(kernel, finals, name, tmp_path, one_thread):
    out, report_path = tmp_path / "deploy.pt", tmp_path / "deploy.json"
    report = D.main([str(finals[name]), "--output", str(out), "--threads", "1", "--batch-sizes", "1", "--repeats", "1",
                     "--tiles", "4x4,2x8", "--verify-batch", "8", "--json", str(report_path)])
    assert report["check"]["ok"] and report["check"]["max_rel_error"] <= 1e-4
    assert json.loads(report_path.read_text())["layers"]
    pruned = [r for r in report["layers"] if r["why"] not in ("dense",)]
    assert pruned and all(r["k"] == 1 for r in pruned)  # dry runs are Top-1
    decided = [r for r in report["layers"] if r["deploy"] == "topk"]
    assert all(r["timings"][1]["kernel_ms"] < r["timings"][1]["dense_ms"] for r in decided)

    model, input_shape, script = D.rebuild_model(str(finals[name]))
    assert script == f"{name}_optimized.py"
    deployed = D.load(out)
    assert not deployed.training
    x = torch.randn(8, *input_shape, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        y, ref = deployed(x), model(x)
    assert relative_error(y, ref) <= 1e-4
    assert torch.equal(y.argmax(1), ref.argmax(1))
    spec = torch.load(out, weights_only=True)
    kinds = {m["type"] for m in spec["modules"].values()}
    assert "BatchNorm2d" not in kinds or name == "densenet"  # DenseNet's BN-before-conv stays
    assert ("TopKConv2d" in kinds) == bool(decided)


def test_epilogues_fold_into_the_topk_layer(kernel):
    class Block(nn.Module):  # conv-bn-add-relu (ResNet) and conv-bn-relu-pool (VGG)
        def __init__(self):
            super().__init__()
            self.conv1, self.bn1 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
            self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
            self.pool = nn.MaxPool2d(2)

        def forward(self, x):
            y = F.relu(self.bn1(self.conv1(x)) + x)
            return self.pool(torch.relu(self.bn2(self.conv2(y))))

    gen = torch.Generator().manual_seed(6)
    model = Block().eval()
    with torch.no_grad():
        for conv, bn in ((model.conv1, model.bn1), (model.conv2, model.bn2)):
            conv.weight.copy_(topk_weight(8, 8, 3, 3, 1, gen))
            bn.running_mean.normal_(generator=gen)
            bn.running_var.uniform_(0.5, 2.0, generator=gen)
            bn.weight.normal_(generator=gen)
    gm = deploy_layers.fold_batchnorm(model)
    records = [{"name": n, "deploy": "topk", "tile": [4, 4]} for n in ("conv1", "conv2")]
    deployed = deploy_layers.apply_layers(gm, records, (8, 16, 16))
    ops = [(n.op, n.target) for n in deployed.graph.nodes]
    assert ops == [("placeholder", "x"), ("call_module", "conv1"), ("call_module", "conv2"), ("output", "output")]
    assert (deployed.conv1.relu, deployed.conv1.pool, deployed.conv2.relu, deployed.conv2.pool) == (True, 0, True, 2)
    x = torch.randn(2, 8, 16, 16, generator=gen)
    with torch.no_grad():
        assert relative_error(deployed(x), model(x)) < 1e-5


class _Pos(nn.Module):  # a position embedding of one image added to the output
    def __init__(self):
        super().__init__()
        self.c1, self.pos = nn.Conv2d(3, 8, 3, padding=1), nn.Parameter(torch.randn(1, 8, 8, 8))

    def forward(self, x):
        return F.relu(self.c1(x) + self.pos)


class _Gate(nn.Module):  # a per-channel gate, shaped like the output where that is 1x1
    def __init__(self):
        super().__init__()
        self.c1, self.g = nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.Conv2d(3, 8, 1)

    def forward(self, x):
        return F.relu(self.c1(x) + self.g(F.adaptive_avg_pool2d(x, 1)))


class _WriteBetween(nn.Module):  # an in-place ReLU on the conv's input before the add
    def __init__(self):
        super().__init__()
        self.c1, self.c2, self.act = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(True)

    def forward(self, x):
        x = self.c1(x)
        out = self.c2(x)
        return out + self.act(x)


class _AddInto(nn.Module):  # the conv's output added into its input, which is returned
    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        x = F.relu(self.c1(x))
        x.add_(self.c2(x))
        return x


class _Residual(nn.Module):  # what is folded: += into the conv's output, and conv(y) + y
    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        y = self.c1(x)
        y += x
        return self.c2(y) + y


@pytest.mark.parametrize("cls, shape, other_shape, folded", [
    (_Pos, (3, 8, 8), None, 0), (_Gate, (3, 2, 2), (3, 6, 6), 0), (_WriteBetween, (3, 8, 8), (3, 5, 7), 0),
    (_AddInto, (3, 8, 8), (3, 5, 7), 0), (_Residual, (8, 8, 8), (8, 5, 7), 2)])
def test_an_add_folds_into_a_layer_only_where_nothing_changes(kernel, cls, shape, other_shape, folded):
    """A user's add is folded into the layer before it only where the result is the same for
    every batch and input size: not an operand broadcast over the batch (shaped like the
    output for one image) or over a 1x1 output, not across an in-place write to the layer's
    input, not an add_ into the other operand; a residual into the layer's output is."""
    torch.manual_seed(3)
    model = cls().eval()
    gen = torch.Generator().manual_seed(4)
    records = []
    with torch.no_grad():
        for name, m in model.named_children():
            if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3):
                m.weight.copy_(topk_weight(m.out_channels, m.in_channels, 3, 3, 1, gen))
                records.append({"name": name, "deploy": "topk", "tile": [4, 4]})
    deployed = deploy_layers.apply_layers(deploy_layers.fold_batchnorm(model), records, shape)
    layers = [n for n in deployed.graph.nodes if n.op == "call_module" and isinstance(
        deployed.get_submodule(n.target), topk_conv.TopKConv2d)]
    assert sum(len(n.args) == 2 for n in layers) == folded
    for s in [shape] + ([other_shape] if other_shape else []):
        for b in (1, 3):
            x = torch.randn(b, *s, generator=gen)
            with torch.no_grad():
                assert relative_error(deployed(x.clone()), model(x.clone())) < 1e-5, (s, b)


class _MyConv(nn.Conv2d):  # a user's subclass that computes as nn.Conv2d does
    pass


class _Standardized(nn.Conv2d):  # one that does not: weight standardization in its forward
    def forward(self, x):
        c = self.weight - self.weight.mean((1, 2, 3), keepdim=True)
        return F.conv2d(x, c * (c.pow(2).mean((1, 2, 3), keepdim=True) + 1e-5).rsqrt(), self.bias, self.stride,
                        self.padding)


def test_a_conv2d_subclass_deploys_as_a_conv2d_where_it_computes_as_one(kernel):
    """`class MyConv(nn.Conv2d): pass` is deployed like any Conv2d (its BatchNorm folded, the
    kernel chosen, counted in the summary); a subclass with a forward of its own is traced
    through into its functions and stays dense; the outputs match the model either way."""
    torch.manual_seed(5)
    model = nn.Sequential(_MyConv(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                          _Standardized(8, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1)).eval()
    gen = torch.Generator().manual_seed(6)
    with torch.no_grad():
        for m in (model[0], model[5]):
            m.weight.copy_(topk_weight(8, m.in_channels, 3, 3, 1, gen))
        model[1].running_mean.normal_(generator=gen)
        model[1].running_var.uniform_(0.5, 2.0, generator=gen)
    gm = deploy_layers.fold_batchnorm(model)
    assert type(gm.get_submodule("0")) is nn.Conv2d and not any(isinstance(m, nn.BatchNorm2d) for m in gm.modules())
    assert type(model[0]) is _MyConv and model[0].weight.shape == (8, 3, 3, 3)  # the user's model untouched
    records = deploy_layers.choose_layers(gm, (3, 8, 8), [1], repeats=1, log=lambda s: None)
    assert [r["name"] for r in records] == ["0", "5"]
    deployed = deploy_layers.apply_layers(gm, [{**r, "deploy": "topk", "tile": [4, 4]} for r in records], (3, 8, 8))
    assert isinstance(deployed.get_submodule("0"), topk_conv.TopKConv2d)
    x = torch.randn(3, 3, 8, 8, generator=gen)
    with torch.no_grad():
        assert relative_error(deployed(x), model(x)) < 1e-5


def test_a_layer_without_kept_taps_gives_its_bias_on_every_tile(kernel):
    """K = 0 (every weight of a layer pruned to zero, as a damaged or fully pruned final.pt
    has it): every tile, the aligned ones included, returns the bias."""
    conv = nn.Conv2d(4, 6, 3, padding=1)
    with torch.no_grad():
        conv.weight.zero_()
    x = torch.randn(2, 4, 8, 8)
    for tile in topk_conv.tile_kinds():
        m = topk_conv.TopKConv2d.from_conv(conv, tile)
        with torch.no_grad():
            assert m.k == 0 and torch.allclose(m(x), conv(x)), tile


def test_the_op_has_a_shape_function_for_torch_export(kernel):
    for stride, tile in ((2, topk_conv.DEFAULT_TILE), (1, (4, 4, 1))):  # the copies per column: stride 1
        conv = nn.Conv2d(4, 6, 3, stride=stride, padding=1)
        with torch.no_grad():
            conv.weight.copy_(topk_weight(6, 4, 3, 3, 1, torch.Generator().manual_seed(9)))
        m = topk_conv.TopKConv2d.from_conv(conv, tile)
        m.relu, m.pool = True, 2
        x = torch.randn(2, 4, 16, 16)
        exported = torch.export.export(m, (x,))
        op, = [n for n in exported.graph.nodes if "topk_conv2d" in str(n.target)]
        columns = op.args[17] if len(op.args) > 17 else op.kwargs.get("columns", 0)  # 0: the default, left out
        assert columns == tile[2]  # columns reaches the registered op
        assert torch.allclose(exported.module()(x), m(x))
        assert torch.allclose(torch.compile(m, fullgraph=True, backend="eager")(x), F.max_pool2d(F.relu(conv(x)), 2),
                              atol=1e-5)


def test_tiles_timed_per_layer_and_the_tiles_flag(kernel):
    """Copies per kernel column are timed at stride 1 only (elsewhere (M, S, 1) runs as
    (M, S, 0), timed once); --tiles names tiles this build has, MxS meaning MxSx0."""
    wide, strided = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 3, stride=2, padding=1)
    assert topk_conv.tiles_for(wide) == kernel and any(t[2] == 1 for t in kernel)
    assert topk_conv.tiles_for(strided) == [t for t in kernel if t[2] == 0]
    assert topk_conv.tiles_for(strided, [(4, 4, 1), (4, 4)]) == [(4, 4, 0)]
    assert topk_conv.tiles_for(wide, [(4, 4, 1), (4, 4)]) == [(4, 4, 1), (4, 4, 0)]
    assert D.tile_list("4x4,2x8x1") == [(4, 4, 0), (2, 8, 1)]
    D.check_tiles([(4, 4, 0), (4, 4, 1)])
    with pytest.raises(D.DeployError, match="--tiles 4x4x2 not compiled in"):
        D.check_tiles([(4, 4, 2)])
    with pytest.raises(D.DeployError, match="--tiles 4x4x2 not compiled in"):
        import_benchmark().main(["--shapes", "8@8", "--tiles", "4x4x2"])


def import_benchmark():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import deploy_latency
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    return deploy_latency


def test_benchmark_times_each_node_on_its_own_inputs():
    class Net(nn.Module):  # in-place nodes, a method, a function, a module
        def __init__(self):
            super().__init__()
            self.conv, self.act = nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(inplace=True)

        def forward(self, x):
            y = self.act(self.conv(x))
            y.add_(x.mean(1, keepdim=True))
            return F.relu_(torch.cat([y, x], 1).flatten(1) - 0.5)

    gm = torch.fx.symbolic_trace(Net())
    x = torch.randn(2, 3, 6, 6)
    calls = import_benchmark().node_calls(gm, x)
    assert list(calls) == [n.name for n in gm.graph.nodes if n.op.startswith("call_")]
    for name, (fn, out) in calls.items():  # each alone gives what it gave in the run
        assert torch.equal(fn(), out), name
    assert torch.equal(list(calls.values())[-1][1], gm(x))


def test_benchmark_runs_end_to_end(kernel, one_thread, tmp_path):
    deploy_latency = import_benchmark()
    out = tmp_path / "latency.json"
    result = deploy_latency.main(["--script", "vgg8", "--topk", "2", "--threads", "1", "--batch-sizes", "1,2",
                                  "--repeats", "1", "--min-round-ms", "0.5", "--tiles", "4x4", "--no-compile",
                                  "--json", str(out)])
    run, = result["runs"]
    assert run["check"]["ok"] and [r["k"] for r in run["layers"]] == [2, 2, 2, 2]
    assert set(run["layers"][0]["batches"]) == {1, 2} and set(run["whole"]) == {1, 2}
    assert {"dense_eager_ms", "dense_channels_last_ms", "deploy_eager_ms", "speedup"} <= set(run["whole"][1])
    assert json.loads(out.read_text())["runs"][0]["whole"]["2"]["best_deploy"] == "deploy_eager"
    parts = run["parts"][2]  # every node of the deployed graph timed alone, and the whole
    assert {"features_0", "features_3", "classifier_1", "classifier_4"} <= set(parts["nodes"])
    assert "x" not in parts["nodes"] and "output" not in parts["nodes"]
    assert parts["whole_ms"] > sum(sorted(parts["nodes"].values())[-2:]) / 2  # the whole, not a node


def test_several_thread_counts_add_the_scaling_measurement(kernel, one_thread, tmp_path, monkeypatch):
    """With --threads 1,2 the benchmark ends with time_scaling over both runs' deployed models
    (stubbed here: no timing in the test), printed and in the JSON; with one count it does not."""
    deploy_latency = import_benchmark()
    got = []

    def fake_scaling(dense, deployed, input_shape, batches, timing):
        got.append(sorted(deployed))
        return {1: {"ms": {}, "dense_ms": {1: 2.0, 2: 1.0}, "speedup": {1: 4.0, 2: 3.8}, "share": {1: 1.0, 2: 0.95}}}

    monkeypatch.setattr(deploy_latency, "time_scaling", fake_scaling)
    monkeypatch.setattr(deploy_latency, "format_scaling", lambda r: "scaling line")
    args = ["--script", "vgg8", "--topk", "1", "--batch-sizes", "1", "--repeats", "1", "--min-round-ms", "0.5",
            "--tiles", "4x4", "--no-compile"]
    result = deploy_latency.main(args + ["--threads", "1,2", "--json", str(tmp_path / "two.json")])
    assert got == [[1, 2]] and [r["threads"] for r in result["runs"]] == [1, 2]
    assert json.loads((tmp_path / "two.json").read_text())["scaling"]["1"]["share"]["2"] == 0.95
    assert "scaling" not in deploy_latency.main(args + ["--threads", "1"]) and got == [[1, 2]]


def test_thread_scaling_runs_each_model_at_its_thread_count():
    """time_scaling times dense and each run's deployed model at that run's thread count, all
    interleaved: every call sees torch.get_num_threads() of its name, the speed-ups and shares
    are those of its own figures, and the caller's thread count is restored."""
    deploy_latency = import_benchmark()
    seen = {}

    class Recorder(nn.Module):
        def __init__(self, tag):
            super().__init__()
            self.tag, self.conv = tag, nn.Conv2d(3, 4, 3)

        def forward(self, x):
            key = (self.tag, torch.get_num_threads(), x.is_contiguous(memory_format=torch.channels_last))
            seen[key] = seen.get(key, 0) + 1
            return self.conv(x)

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        r = deploy_latency.time_scaling(Recorder("dense"), {1: Recorder(1), 2: Recorder(2)}, (3, 8, 8), [2],
                                        {"repeats": 2, "min_round_s": 0.0005})
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    assert {(tag, t) for tag, t, _ in seen} == {("dense", 1), ("dense", 2), (1, 1), (2, 2)}
    assert {cl for tag, _, cl in seen if tag == "dense"} == {False, True}  # NCHW and channels_last
    s = r[2]
    for t in (1, 2):
        assert s["dense_ms"][t] == min(s["ms"][f"dense_eager@{t}"], s["ms"][f"dense_channels_last@{t}"])
        assert s["speedup"][t] == s["dense_ms"][t] / s["ms"][f"deploy_eager@{t}"]
    assert s["share"] == {1: 1.0, 2: s["speedup"][2] / s["speedup"][1]}
    assert "share of the 1-thread speed-up: 2 threads" in deploy_latency.format_scaling(r)
    # each round of a model at a thread count begins after one untimed call at that count
    calls = []
    torch.set_num_threads(1)
    try:
        deploy_latency._at_threads(2, lambda: calls.append(torch.get_num_threads()))
        assert calls == [2] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_benchmark_whole_figure_is_the_whole_graph(monkeypatch):
    """time_parts' "whole_ms" is the time of one call of the whole graph, its "nodes" those of
    the nodes alone: checked with the timer replaced by one that runs each function once and
    answers a figure of its own per name (no timing in the test)."""
    deploy_latency = import_benchmark()
    gm = torch.fx.symbolic_trace(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(64, 2)))
    whole_calls, fired, ran, figures = [], [], {}, {}
    gm.register_forward_hook(lambda *_: whole_calls.append(1))  # the graph module's own forward only
    for name, sub in gm.named_children():
        sub.register_forward_hook(lambda *_, name=name: fired.append(name))

    def fake_median_ms(fns, **kwargs):
        for name, fn in fns.items():
            fired.clear()
            fn()
            ran[name], figures[name] = list(fired), float(len(figures) + 1)
        return dict(figures)

    monkeypatch.setattr(deploy_latency.kernels, "median_ms", fake_median_ms)
    parts = deploy_latency.time_parts(gm, torch.randn(1, 3, 6, 6), {"repeats": 1, "min_round_s": 0.001})
    assert whole_calls == [1]  # the timed whole (node_calls runs the graph in an Interpreter)
    assert parts["whole_ms"] == figures[" whole"] and " whole" not in parts["nodes"]
    assert parts["nodes"] == {n.name: figures[n.name] for n in gm.graph.nodes if n.op.startswith("call_")}
    assert ran["_0"] == ["0"] and ran["_3"] == ["3"] and ran[" whole"] == ["0", "1", "2", "3"]  # each its own


# ---- without a kernel, and deploy.pt in a fresh process -----------------------------------------

def run_python(code: str, env_extra: dict | None = None) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def test_without_a_compiler_deployment_falls_back_to_dense(finals, tmp_path):
    out = tmp_path / "deploy.pt"
    stdout = run_python(
        "import sys, tkp_deploy as D; "
        f"r = D.main([{str(finals['vgg8'])!r}, '--output', {str(out)!r}, '--threads', '1', '--batch-sizes', '1', "
        "'--repeats', '1', "
        "'--verify-batch', '4']); "
        "assert all(l['deploy'] == 'dense' and l['why'] in ('kernel unavailable', 'dense') for l in r['layers']); "
        "assert r['kernel'].startswith('unavailable')",
        {"TKP_DEPLOY_NO_KERNEL": "1"})
    reasons = [ln for ln in stdout.splitlines() if "kernel is unavailable" in ln]
    assert reasons == ["tkp_deploy: the Top-K kernel is unavailable (TKP_DEPLOY_NO_KERNEL is set); Top-K layers "
                       "run as dense convolutions"]
    spec = torch.load(out, weights_only=True)
    assert "TopKConv2d" not in {m["type"] for m in spec["modules"].values()}


def test_a_failing_build_falls_back_with_one_line(monkeypatch, capsys):
    from torch.utils import cpp_extension

    def broken_build(**kwargs):
        raise RuntimeError("Error building extension 'tkp_topk_conv':\n[1/2] c++ -MMD ...\n"
                           "topk_conv.cpp:31:2: error: #error \"the Top-K kernel needs a CPU with AVX-512\"\n"
                           "ninja: build stopped: subcommand failed.")

    monkeypatch.setattr(kernels, "_builds", {})  # as in a process that has not tried yet
    monkeypatch.setattr(cpp_extension, "load", broken_build)
    assert not topk_conv.kernel_available()
    assert not topk_conv.kernel_available()  # answered once, not retried
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 and "#error" in lines[0] and "AVX-512" in lines[0], lines
    conv = nn.Conv2d(4, 6, 3, padding=1)
    with torch.no_grad():
        conv.weight.copy_(topk_weight(6, 4, 3, 3, 2, torch.Generator().manual_seed(7)))
    m = topk_conv.TopKConv2d.from_conv(conv)
    m.relu = True
    x = torch.randn(2, 4, 8, 8)
    assert torch.allclose(m(x), F.relu(conv(x)), atol=1e-6)  # the dense path


def test_a_deployed_model_that_fails_ends_in_one_line_and_writes_nothing(kernel, finals, tmp_path, one_thread,
                                                                         monkeypatch):
    """Should a deployed model raise where the masked one runs (a deployment fault), the check
    reports it (verify's "error") and tkp_deploy ends with a DeployError naming it, no file written."""
    class Broken(nn.Module):
        def forward(self, x):
            raise RuntimeError("tkp::topk_conv2d: residual must be shaped like the output")

    check = deploy_layers.verify(Broken(), nn.Flatten(), torch.randn(2, 3, 4, 4))
    assert not check["ok"] and "residual must be shaped" in check["error"]
    monkeypatch.setattr(D, "apply_layers", lambda *args: Broken())
    out = tmp_path / "deploy.pt"
    with pytest.raises(D.DeployError, match=r"the deployed model fails \(tkp::topk_conv2d: residual"):
        D.main([str(finals["vgg8"]), "--output", str(out), "--threads", "1", "--batch-sizes", "1", "--repeats", "1",
                "--tiles", "4x4", "--verify-batch", "2"])
    assert not out.exists()


def test_deploy_pt_loads_in_a_fresh_process(kernel, finals, tmp_path, one_thread):
    out = tmp_path / "deploy.pt"
    D.main([str(finals["resnet56"]), "--output", str(out), "--threads", "1", "--batch-sizes", "1", "--repeats", "1",
            "--tiles", "4x4", "--verify-batch", "4"])
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(8))
    torch.save(x, tmp_path / "x.pt")
    with torch.no_grad():
        torch.save(D.load(out)(x), tmp_path / "y.pt")
    check = (
        "import sys, torch; "
        f"spec = torch.load({str(out)!r}, weights_only=True); assert spec['format'] == 'tkp-deploy-2'; "
        "import tkp_deploy; "
        f"m = tkp_deploy.load({str(out)!r}); x = torch.load({str(tmp_path / 'x.pt')!r}); "
        f"y = torch.load({str(tmp_path / 'y.pt')!r}); "
        "z = m(x); "
        "assert not m.training and z.shape == y.shape and float((z - y).abs().max()) <= 1e-5 * float(y.abs().max()); "
        "training = [k for k in sys.modules if k == 'tkp_common' or k.endswith('_optimized') or k in "
        "('tkp_lib.train', 'tkp_lib.data', 'tkp_lib.sparsity', 'tkp_lib.qat', 'tkp_lib.report')]; "
        "assert not training, training; from tkp_lib import topk_conv; print('ok', topk_conv.kernel_available())")
    assert run_python(check).split()[-2:] == ["ok", "True"]
    # a deploy.pt tuned on a CPU with other vector instructions may name tiles this build lacks:
    # they run on the default tile
    spec = torch.load(out, weights_only=True)
    topk = [m for m in spec["modules"].values() if m["type"] == "TopKConv2d"]
    assert topk and all(m["config"]["tile"] == [4, 4, 0] for m in topk)
    for m in topk:
        m["config"]["tile"] = [9, 9]  # in no build
    torch.save(spec, tmp_path / "foreign.pt")
    # files written before the copies per kernel column name tiles (M, S): they run as (M, S, 0);
    # a compiled-in tile other than the default, which any unknown tile would fall back to
    other = next(t for t in topk_conv.tile_kinds() if t[0] > 0 and t[2] == 0 and t != topk_conv.DEFAULT_TILE)
    for m in topk:
        m["config"]["tile"] = list(other[:2])
    torch.save(spec, tmp_path / "older.pt")
    with torch.no_grad():
        assert torch.equal(D.load(tmp_path / "foreign.pt")(x), D.load(out)(x))
        older = D.load(tmp_path / "older.pt")
        assert relative_error(older(x), D.load(out)(x)) < 1e-5
        assert {m.kernel_tile() for m in older.modules() if isinstance(m, topk_conv.TopKConv2d)} == {other}
    # and where the kernel cannot be built, the same file runs its Top-K layers densely
    stdout = run_python(check.replace("print('ok', topk_conv.kernel_available())", "print('ok')"),
                        {"TKP_DEPLOY_NO_KERNEL": "1"})
    assert stdout.strip().splitlines()[-1] == "ok" and "kernel is unavailable" in stdout
