"""TKP quantization-aware training (stage 3, --qat): int8 that keeps the sparsity.

After stage 2, every trained Conv2d and Linear (pruned or not) trains with fake
quantization: int8 weights, per output channel and symmetric (a pruned zero stays exactly
zero, and zeros never stretch the scale), and 8-bit inputs, per tensor and affine (0..255,
as PyTorch quantizes activations), through torch.ao.quantization's FakeQuantize with
min/max observers. Layers keep their names and Parameters (their class is swapped for a
subclass), so masks, optimizer and checkpoints need no translation.

Owns: the fake-quantized layers, freezing, int8 export and load, and int8 sizes.
May import: torch only. Never the driver (tkp_common).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class _FakeQuantLayer:
    """Mixin for a Conv2d/Linear whose input and weight pass through FakeQuantize modules.
    Observers run in training mode only (and never once the layer is frozen)."""

    def train(self, mode: bool = True):
        super().train(mode)
        for fq in (self.input_fq, self.weight_fq):
            fq.enable_observer(mode and not bool(self.qat_frozen))
        return self


class QATConv2d(_FakeQuantLayer, nn.Conv2d):
    def forward(self, x):
        return self._conv_forward(self.input_fq(x), self.weight_fq(self.weight), self.bias)


class QATLinear(_FakeQuantLayer, nn.Linear):
    def forward(self, x):
        return F.linear(self.input_fq(x), self.weight_fq(self.weight), self.bias)


def prepare_qat(module: nn.Module) -> list[str]:
    """Give every trained Conv2d and Linear fake-quantized inputs and weights. Returns the
    layer names."""
    from torch.ao.quantization import FakeQuantize, MovingAverageMinMaxObserver, MovingAveragePerChannelMinMaxObserver
    names = []
    for name, layer in list(module.named_modules()):
        if (type(layer) not in (nn.Conv2d, nn.Linear) or not layer.weight.requires_grad
                or isinstance(layer, _FakeQuantLayer)):
            continue
        device = layer.weight.device
        # averaging_constant=1: each step's weight scale comes from that step's weights
        layer.add_module("weight_fq", FakeQuantize(observer=MovingAveragePerChannelMinMaxObserver,
                                                   averaging_constant=1.0, quant_min=-127, quant_max=127,
                                                   dtype=torch.qint8, qscheme=torch.per_channel_symmetric,
                                                   ch_axis=0).to(device))
        layer.add_module("input_fq", FakeQuantize(observer=MovingAverageMinMaxObserver, quant_min=0, quant_max=255,
                                                  dtype=torch.quint8, qscheme=torch.per_tensor_affine).to(device))
        layer.register_buffer("qat_frozen", torch.zeros((), dtype=torch.bool, device=device))
        with torch.no_grad():
            layer.weight_fq(layer.weight)  # sizes its per-channel buffers, so checkpoints load
        layer.__class__ = QATConv2d if isinstance(layer, nn.Conv2d) else QATLinear
        layer.train(layer.training)
        names.append(name)
    return names


def qat_layers(module: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in module.named_modules() if isinstance(m, _FakeQuantLayer)}


@torch.no_grad()
def freeze_qat(module: nn.Module) -> None:
    """Fix every scale: weight scales from the final weights, input scales as observed."""
    for layer in qat_layers(module).values():
        layer.weight_fq.enable_observer(True)
        layer.weight_fq(layer.weight)
        layer.qat_frozen.fill_(True)
        layer.weight_fq.disable_observer()
        layer.input_fq.disable_observer()


def strip_qat(module: nn.Module) -> None:
    """Back to plain Conv2d/Linear layers (the same Parameters)."""
    for layer in qat_layers(module).values():
        del layer.weight_fq, layer.input_fq, layer.qat_frozen
        layer.__class__ = nn.Conv2d if isinstance(layer, nn.Conv2d) else nn.Linear


@torch.no_grad()
def export_int8(module: nn.Module) -> dict:
    """{layer: int8 weight, per-channel scales, input scale and zero point} of a frozen model.
    int8 * scale (per output channel) reproduces the fake-quantized weight exactly."""
    out = {}
    for name, layer in qat_layers(module).items():
        scale = layer.weight_fq.scale.detach().float()
        shape = (-1,) + (1,) * (layer.weight.dim() - 1)
        # w * (1/scale), rounded half to even: what the fake-quant kernel computes
        q = torch.clamp(torch.round(layer.weight.detach().float() * (1.0 / scale.view(shape))), -127, 127)
        q = q.to(torch.int8)
        out[name] = {"weight_int8": q.cpu(), "weight_scale": scale.cpu(),
                     "input_scale": layer.input_fq.scale.detach().float().cpu(),
                     "input_zero_point": layer.input_fq.zero_point.detach().cpu()}
    return out


@torch.no_grad()
def load_int8(module: nn.Module, int8: dict) -> nn.Module:
    """A frozen fake-quant model from export_int8's output: weights de-quantized, input
    scales set. Its outputs are those of the model that was exported."""
    prepare_qat(module)
    layers = qat_layers(module)
    for name, q in int8.items():
        layer = layers[name]
        shape = (-1,) + (1,) * (layer.weight.dim() - 1)
        layer.weight.copy_(q["weight_int8"].float() * q["weight_scale"].view(shape))
        layer.input_fq.scale.resize_(q["input_scale"].shape).copy_(q["input_scale"])
        layer.input_fq.zero_point.resize_(q["input_zero_point"].shape).copy_(q["input_zero_point"])
    freeze_qat(module)
    return module


def int8_size_bytes(module: nn.Module, int8: dict, masks: dict) -> int:
    """Bytes of the pruned int8 model: a quantized weight as 1 byte per value (per kept value
    plus a 1-bit mask where pruned), 4 bytes per output-channel scale, 8 for its input's scale
    and zero point; every other parameter (biases, norms, embeddings) as fp32."""
    total = 0
    for name, p in module.named_parameters():
        if not p.requires_grad:  # frozen, training-only parameters (GoogLeNet's auxiliary heads)
            continue
        layer = name.removesuffix(".weight")
        if name.endswith(".weight") and layer in int8:
            values = int(masks[name].sum()) + math.ceil(p.numel() / 8) if name in masks else p.numel()
            total += values + 4 * p.shape[0] + 8
        else:
            total += 4 * p.numel()
    return total


@torch.no_grad()
def freeze_to_int8(module: nn.Module) -> dict:
    """End of stage 3: fix every scale, export the int8 weights, and give the model's weights
    their de-quantized values, so that the model is exactly the int8 model. Returns the export."""
    freeze_qat(module)
    int8 = export_int8(module)
    for name, q in int8.items():
        weight = module.get_submodule(name).weight
        shape = (-1,) + (1,) * (weight.dim() - 1)
        weight.copy_((q["weight_int8"].float() * q["weight_scale"].view(shape)).to(weight.device))
    return int8
