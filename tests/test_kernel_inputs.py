"""The kernel layers refuse what they cannot compute, with a clear error, instead of
returning wrong numbers: inputs smaller than the kernel, tap indices outside the kernel,
biases of the wrong length, depthwise and dilated convolutions (issue 20, item 7)."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from tkp_lib import depthwise, tapgroup, topk_conv


def tap_group_layer(c_in=4, c_out=16, stride=1, padding=0, bias=True):
    conv = nn.Conv2d(c_in, c_out, 3, stride, padding, bias=bias)
    with torch.no_grad():
        conv.weight.mul_(torch.zeros(1, 1, 3, 3).index_fill_(-1, torch.tensor([1]), 1.0))  # column 1 only
    return tapgroup.TapGroupConv2d.from_conv(conv, 16, 3)


@pytest.fixture(scope="module")
def tg_kernel():
    if not tapgroup.kernel_available():
        pytest.skip("the tap-group kernel cannot be built here")


@pytest.mark.parametrize("stride, hw", [(2, 2), (3, 2), (1, 2), (2, 1)])
def test_tap_group_refuses_an_input_smaller_than_the_kernel(tg_kernel, stride, hw):
    m = tap_group_layer(stride=stride)
    with pytest.raises(RuntimeError, match="smaller than the kernel"):
        m(torch.randn(1, 4, hw, hw))


def test_tap_group_refuses_a_tap_outside_the_kernel(tg_kernel):
    m = tap_group_layer(padding=1)
    with torch.no_grad():
        m.taps[0, 0, 0] = 9  # a 3x3 kernel has taps 0..8
    with pytest.raises((RuntimeError, ValueError), match="tap"):
        m(torch.randn(1, 4, 8, 8))
    with pytest.raises(ValueError, match="tap"):
        m.forward_torch(torch.randn(1, 4, 8, 8))


def test_tap_group_torch_path_checks_its_taps_once_per_change(monkeypatch):
    """The torch path (any device) reads the taps' range back only when the taps change (on a
    GPU each read waits for the queued kernels): three calls, one check; an in-place change,
    one more; an in-place change to a bad tap is still refused."""
    m, x = tap_group_layer(padding=1), torch.randn(1, 4, 8, 8)
    reads, tensor_min = [], torch.Tensor.min

    def counted_min(t, *args, **kwargs):
        if t is m.taps:
            reads.append(1)
        return tensor_min(t, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "min", counted_min)
    for _ in range(3):
        m.forward_torch(x)
    assert len(reads) == 1
    with torch.no_grad():
        m.taps[0, 0, 0] = 4
    m.forward_torch(x)
    assert len(reads) == 2
    with torch.no_grad():
        m.taps[0, 0, 0] = 9  # a 3x3 kernel has taps 0..8
    with pytest.raises(ValueError, match="tap"):
        m.forward_torch(x)
    with torch.no_grad():
        m.taps[0, 0, 0] = 4
    m.forward_torch(x)
    m.taps = torch.full_like(m.taps, 9)  # a new tensor, assigned (version 0 like any new one): checked too
    with pytest.raises(ValueError, match="tap"):
        m.forward_torch(x)
    # a new tensor at the checked one's version, at an address Python gives out again (as id()
    # reports it for every object here): still a new tensor, still checked
    monkeypatch.setattr(tapgroup, "id", lambda obj: 1, raising=False)
    m.taps = torch.full_like(m.taps, 4)
    m.forward_torch(x)
    bad = torch.full_like(m.taps, 9)
    with torch.no_grad():
        while bad._version < m.taps._version:
            bad.add_(0)
    assert bad._version == m.taps._version
    m.taps = bad
    with pytest.raises(ValueError, match="tap"):
        m.forward_torch(x)


def test_tap_group_torch_path_runs_on_inference_tensors():
    """Buffers made under inference_mode (a layer built there, or moved with .to() there, as
    benchmarks/inference_latency.py does) keep no version counter: they are checked on every
    call instead, and a bad tap is still refused."""
    x = torch.randn(1, 4, 8, 8)
    with torch.inference_mode():
        built = tap_group_layer(padding=1)
        moved = tap_group_layer(padding=1).to(torch.float64).to(torch.float32)
        for m in (built, moved):
            assert m.taps.is_inference()
            ref = F.conv2d(x, m.dense_weight(), m.bias, 1, 1)
            for _ in range(2):
                assert torch.allclose(m.forward_torch(x), ref, atol=1e-5)
        built.taps[0, 0, 0] = 9
        with pytest.raises(ValueError, match="tap"):
            built.forward_torch(x)


def test_tap_group_op_refuses_channels_and_taps_out_of_range(tg_kernel):
    """tkp::tap_group_conv2d reads the padded input at each entry's (input channel, tap): any
    entry out of range, first, middle or last in the packed blocks, is refused."""
    m = tap_group_layer(c_in=5, c_out=40, padding=1)
    x = torch.randn(1, 5, 6, 6)
    weights, channels, taps, rb = m.packed()
    last = channels.numel() - 1
    for which, bad_values in (("channels", [5, -1, 1 << 30]), ("taps", [9, -1, 1 << 30])):
        for where in (0, last // 2, last):
            for bad in bad_values:
                ch, tp = channels.clone(), taps.clone()
                (ch if which == "channels" else tp).view(-1)[where] = bad
                with pytest.raises(RuntimeError, match="out of range"):
                    torch.ops.tkp.tap_group_conv2d(x, weights, ch, tp, None, 40, 3, 3, 1, 1, 1, 1, rb)
    y = torch.ops.tkp.tap_group_conv2d(x, weights, channels, taps, m.bias, 40, 3, 3, 1, 1, 1, 1, rb)
    assert torch.allclose(y, F.conv2d(x, m.dense_weight(), m.bias, 1, 1), atol=1e-5)


def test_depthwise_op_refuses_taps_out_of_range():
    """tkp::depthwise_topk2d reads the input at each (channel, kept tap): any tap out of range,
    first, middle or last, is refused."""
    if not depthwise.kernel_available():
        pytest.skip("the depthwise kernel cannot be built here")
    conv = nn.Conv2d(6, 6, 3, padding=1, groups=6)
    with torch.no_grad():
        conv.weight.mul_((torch.arange(9) % 4 == 0).float().reshape(3, 3))  # taps 0, 4, 8
    m = depthwise.DepthwiseTopKConv2d.from_conv(conv)
    x = torch.randn(1, 6, 8, 8)
    values, taps = m.values.float().contiguous(), m.taps.int().contiguous()
    for where in (0, taps.numel() // 2, taps.numel() - 1):
        for bad in (9, -1, 1 << 30):
            t = taps.clone()
            t.view(-1)[where] = bad
            with pytest.raises(RuntimeError, match="tap index out of range"):
                torch.ops.tkp.depthwise_topk2d(x, values, t, None, 3, 3, 1, 1, 1, 1, 0)
    y = torch.ops.tkp.depthwise_topk2d(x, values, taps, None, 3, 3, 1, 1, 1, 1, 0)
    assert torch.allclose(y, F.conv2d(x, m.dense_weight(), None, 1, 1, groups=6), atol=1e-5)


def test_tap_group_refuses_a_bias_of_the_wrong_length(tg_kernel):
    m = tap_group_layer(padding=1)
    m.bias = torch.zeros(15)
    with pytest.raises((RuntimeError, ValueError), match="bias"):
        m(torch.randn(1, 4, 8, 8))


@pytest.mark.parametrize("cls", ["topk", "tapgroup"])
@pytest.mark.parametrize("conv", [nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.Conv2d(16, 16, 3, groups=4),
                                  nn.Conv2d(16, 16, 3, padding=2, dilation=2),
                                  nn.Conv2d(16, 16, 3, padding=1, padding_mode="reflect")])
def test_from_conv_refuses_what_the_layers_do_not_compute(cls, conv):
    with torch.no_grad():
        conv.weight.mul_((torch.arange(9) == 4).float().reshape(3, 3))
    with pytest.raises(ValueError, match="groups|dilation|padding"):
        if cls == "topk":
            topk_conv.TopKConv2d.from_conv(conv)
        else:
            tapgroup.TapGroupConv2d.from_conv(conv, 16, 1)


def test_topk_op_refuses_tap_indices_and_channels_out_of_range():
    """tkp::topk_conv2d reads the input at each entry's tap (and, for the aligned tiles, its
    channel): any entry out of range, wherever it sits in the packed weights, is refused."""
    if not topk_conv.kernel_available():
        pytest.skip("the Top-K kernel cannot be built here")
    conv = nn.Conv2d(5, 8, 3, padding=1)
    x = torch.randn(1, 5, 6, 6)
    for tile in [(4, 4), (0, 4)]:
        m = topk_conv.TopKConv2d.from_conv(conv, tile)
        values, taps = m.packed()
        last = taps.numel() - 1
        bad_entries = [9, -1, 1 << 30] if tile[0] else [9, 5 * 256, -1, -256]  # aligned: channel * 256 + tap
        for where in (0, last // 2, last):
            for bad in bad_entries:
                t = taps.clone()
                t.view(-1)[where] = bad
                with pytest.raises(RuntimeError, match="tap index out of range"):
                    torch.ops.tkp.topk_conv2d(x, values, t, None, 8, 3, 3, 1, 1, 1, 1, *tile)
