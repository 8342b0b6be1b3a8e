"""A MobileNetV2-style CIFAR network with Top-K Pruning (TKP): a model a user brings.

Written as README "Adapt TKP to your model" says: a copy of vgg8_optimized.py in which only
the docstring, the defaults and the model differ. The model keeps MobileNetV2's structure
(Sandler et al., 2018) at small widths, so that tests run it in seconds: a 3x3 stem, then
inverted residual blocks (1x1 expand, BatchNorm, ReLU6; 3x3 depthwise, stride 2 where the
resolution halves; 1x1 linear projection, BatchNorm; a residual add where the shape allows),
a 1x1 conv to 128 channels, global average pooling, dropout and a Linear classifier. Top-K
prunes the stem and every depthwise kernel; the 1x1 convs stay dense.

    python tests/user_models/mobilenetv2_cifar.py --dry-run
    python tests/user_models/mobilenetv2_cifar.py --beta auto --topk 2

It lives in tests/user_models/ (not beside the engine, where a user's copy would sit) so that
the benchmarks' search for model scripts does not find it; the lines marked "test copy only"
let it run from here.
"""

import sys
from pathlib import Path

import torch.nn as nn

ROOT = str(Path(__file__).resolve().parents[2])  # test copy only: the engine's folder
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import tkp_common as tkp  # noqa: E402

# ---- arguments ---------------------------------------------------------------------------

def get_args_parser() -> tkp.ArgumentParser:
    return tkp.cnn_parser(
        "TKP: a MobileNetV2-style network on CIFAR with Top-K spatial pruning", dataset="cifar10",
        pretrain_help="a dense checkpoint of this model to start stage 1 from (state_dict, or our final.pt)",
        no_pretrain_help="ignore --pretrain-path and train from scratch (the default without it)",
        # the VGG-8 row, as a user starts (see README "Choosing --beta" and --beta auto)
        batch_train=128, batch_val=256, epochs_stage1=100, epochs_stage2=100,
        lr=1e-3, weight_decay=1e-4, beta=3000.0, alpha=3.0)


# ---- model -------------------------------------------------------------------------------

class ConvBNReLU(nn.Sequential):
    """Conv (bias-free, 'same' padding), BatchNorm, ReLU6."""

    def __init__(self, c_in, c_out, kernel_size=3, stride=1, groups=1):
        super().__init__(nn.Conv2d(c_in, c_out, kernel_size, stride, (kernel_size - 1) // 2, groups=groups,
                                   bias=False),
                         nn.BatchNorm2d(c_out), nn.ReLU6(inplace=True))


class InvertedResidual(nn.Module):
    """1x1 expand (skipped at expansion 1), 3x3 depthwise (with the stride), 1x1 linear
    projection; a residual add when the stride is 1 and the width does not change."""

    def __init__(self, c_in, c_out, stride, expand_ratio):
        super().__init__()
        hidden = c_in * expand_ratio
        self.use_residual = stride == 1 and c_in == c_out
        layers = [ConvBNReLU(c_in, hidden, 1)] if expand_ratio != 1 else []
        layers += [ConvBNReLU(hidden, hidden, 3, stride, groups=hidden),
                   nn.Conv2d(hidden, c_out, 1, bias=False), nn.BatchNorm2d(c_out)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x):
        return x + self.conv(x) if self.use_residual else self.conv(x)


class MobileNetV2(nn.Module):
    # expansion t, width c, blocks n, first stride s (CIFAR: stride-1 stem, three halvings)
    SETTINGS = [(1, 8, 1, 1), (6, 16, 2, 2), (6, 24, 2, 2), (6, 32, 2, 2), (6, 48, 1, 1)]

    def __init__(self, num_classes: int = 10, stem: int = 16, last: int = 128):
        super().__init__()
        layers, c_in = [ConvBNReLU(3, stem, 3, 1)], stem
        for t, c, n, s in self.SETTINGS:
            for i in range(n):
                layers.append(InvertedResidual(c_in, c, s if i == 0 else 1, t))
                c_in = c
        layers.append(ConvBNReLU(c_in, last, 1))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(last, num_classes))
        for m in self.modules():  # torchvision's MobileNetV2 initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        x = self.features(x)
        return self.classifier(x.mean((2, 3)))


def build_model(args) -> nn.Module:
    """MobileNetV2 for --dataset's classes; from --pretrain-path when given, else from scratch."""
    return tkp.start_from_pretrain_path(MobileNetV2(tkp.CIFAR_CLASSES[args.dataset]), args)


# ---- main --------------------------------------------------------------------------------

SCRIPT = tkp.cnn_script("mobilenetv2_cifar", build_model)  # Top-K over every Conv2d; CIFAR at 32 px


def main(argv=None) -> dict:
    return tkp.run(get_args_parser().parse_args(argv), SCRIPT)


if __name__ == "__main__":
    tkp.cli(main)
