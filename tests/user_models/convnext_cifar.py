"""A tiny ConvNeXt on CIFAR with Top-K Pruning (TKP): a model a user brings.

Written as README "Adapt TKP to your model" says: a copy of vgg8_optimized.py in which only
the docstring, the defaults and the model differ. The model keeps ConvNeXt's structure
(Liu et al., 2022; facebookresearch/ConvNeXt) at small widths, so that tests run it in
seconds: a 2x2 stride-2 patchify stem and channels-first LayerNorm; three stages of blocks
(7x7 depthwise conv; permute to channels-last; nn.LayerNorm, Linear 4x expansion, GELU,
Linear; layer-scale gamma; permute back; residual add), 2x2 stride-2 downsampling convs
between the stages, global mean pooling, LayerNorm and a Linear head. Top-K prunes the 7x7
depthwise kernels and the 2x2 stem and downsampling kernels; the Linears stay dense.

    python tests/user_models/convnext_cifar.py --dry-run
    python tests/user_models/convnext_cifar.py --beta auto --topk 4

It lives in tests/user_models/ (not beside the engine, where a user's copy would sit) so that
the benchmarks' search for model scripts does not find it; the lines marked "test copy only"
let it run from here.
"""

import sys
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = str(Path(__file__).resolve().parents[2])  # test copy only: the engine's folder
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import tkp_common as tkp  # noqa: E402

# ---- arguments ---------------------------------------------------------------------------

def get_args_parser() -> tkp.ArgumentParser:
    return tkp.cnn_parser(
        "TKP: a tiny ConvNeXt on CIFAR with Top-K spatial pruning", dataset="cifar10",
        pretrain_help="a dense checkpoint of this model to start stage 1 from (state_dict, or our final.pt)",
        no_pretrain_help="ignore --pretrain-path and train from scratch (the default without it)",
        # the VGG-8 row, as a user starts (see README "Choosing --beta" and --beta auto)
        batch_train=128, batch_val=256, epochs_stage1=100, epochs_stage2=100,
        lr=1e-3, weight_decay=1e-4, beta=3000.0, alpha=3.0)


# ---- model -------------------------------------------------------------------------------

class LayerNorm(nn.Module):
    """LayerNorm over the channels of (N, C, H, W) ('channels_first') or (N, H, W, C)
    ('channels_last') tensors, as the ConvNeXt repository writes it."""

    def __init__(self, normalized_shape, eps=1e-6, data_format="channels_last"):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(normalized_shape))
        self.bias = nn.Parameter(torch.zeros(normalized_shape))
        self.eps, self.data_format = eps, data_format
        self.normalized_shape = (normalized_shape,)

    def forward(self, x):
        if self.data_format == "channels_last":
            return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        x = (x - u) / torch.sqrt(s + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class Block(nn.Module):
    """dwconv 7x7 -> permute -> LayerNorm -> Linear(4x) -> GELU -> Linear -> gamma -> permute, + input."""

    def __init__(self, dim, layer_scale_init_value=1e-6):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(layer_scale_init_value * torch.ones(dim))

    def forward(self, x):
        shortcut = x
        x = self.dwconv(x).permute(0, 2, 3, 1)  # (N, C, H, W) -> (N, H, W, C)
        x = self.pwconv2(self.act(self.pwconv1(self.norm(x))))
        x = (self.gamma * x).permute(0, 3, 1, 2)
        return shortcut + x


class ConvNeXt(nn.Module):
    def __init__(self, num_classes: int = 10, depths=(1, 1, 2), dims=(16, 32, 64)):
        super().__init__()
        self.downsample_layers = nn.ModuleList(
            [nn.Sequential(nn.Conv2d(3, dims[0], kernel_size=2, stride=2),
                           LayerNorm(dims[0], data_format="channels_first"))]  # 32 px -> 16
            + [nn.Sequential(LayerNorm(dims[i], data_format="channels_first"),
                             nn.Conv2d(dims[i], dims[i + 1], kernel_size=2, stride=2)) for i in range(len(dims) - 1)])
        self.stages = nn.ModuleList(nn.Sequential(*[Block(d) for _ in range(n)]) for d, n in zip(dims, depths))
        self.norm = nn.LayerNorm(dims[-1], eps=1e-6)
        self.head = nn.Linear(dims[-1], num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        for down, stage in zip(self.downsample_layers, self.stages):
            x = stage(down(x))
        return self.head(self.norm(x.mean((-2, -1))))  # global mean pooling, (N, C)


def build_model(args) -> nn.Module:
    """ConvNeXt for --dataset's classes; from --pretrain-path when given, else from scratch."""
    return tkp.start_from_pretrain_path(ConvNeXt(tkp.CIFAR_CLASSES[args.dataset]), args)


# ---- main --------------------------------------------------------------------------------

SCRIPT = tkp.cnn_script("convnext_cifar", build_model)  # Top-K over every Conv2d; CIFAR at 32 px


def main(argv=None) -> dict:
    return tkp.run(get_args_parser().parse_args(argv), SCRIPT)


if __name__ == "__main__":
    tkp.cli(main)
