"""ResNet-56 on CIFAR-10 with Top-K Pruning (TKP).

Trains the CIFAR ResNet-56 of He et al. (2016) in two stages: `--epochs-stage1` epochs of
cross-entropy plus beta * L_aux (which pushes each 3x3 kernel's energy into its K largest
taps), then a hard Top-K mask, BatchNorm recalibration and `--epochs-stage2` epochs of
masked fine-tuning. A copy of vgg8_optimized.py in which only the model section differs.
Method and outputs: README.md, flags: --help; the method's fine print: DESIGN.md.

    pip install -r requirements.txt
    python resnet56_optimized.py                          # Top-1 from scratch, 100+100 epochs
    python resnet56_optimized.py --pretrain-path dense.pt # Top-1 from a dense ResNet-56 (the paper's setting)
    python resnet56_optimized.py --dense-baseline         # the dense baseline, same pipeline
    python resnet56_optimized.py --dataset cifar100       # CIFAR-100 instead
    python resnet56_optimized.py --dry-run                # the whole pipeline on generated data, seconds
    torchrun --nproc_per_node 4 resnet56_optimized.py     # one process per GPU

Defaults: the paper gives no hyperparameters for ResNet-56, so these are the VGG-8 row of its
table (batch 128/256, 100+100 epochs, AdamW lr 1e-3, weight decay 1e-4, beta 3000, alpha 3).
The paper reports 93.58% dense -> 91.80% at Top-1 on CIFAR-10 with an 8.83x theoretical
speed-up; our MAC count gives 9.00x for the same mask (DESIGN.md §12 explains the difference).

Measured results: RESULTS.md; no full 200-epoch run has been measured yet.
"""

import torch.nn as nn
import torch.nn.functional as F

import tkp_common as tkp

# ---- arguments ---------------------------------------------------------------------------

def get_args_parser() -> tkp.ArgumentParser:
    return tkp.cnn_parser(
        "TKP: ResNet-56 on CIFAR with Top-K spatial pruning", dataset="cifar10",
        pretrain_help="a dense ResNet-56 checkpoint to start stage 1 from (state_dict, our final.pt, "
                      "or an akamaster/pytorch_resnet_cifar10 resnet56 .th file)",
        no_pretrain_help="ignore --pretrain-path and train from scratch (the default without it)",
        # the paper gives no row for ResNet-56: these are its VGG-8 / CIFAR-10 hyperparameters
        batch_train=128, batch_val=256, epochs_stage1=100, epochs_stage2=100,
        lr=1e-3, weight_decay=1e-4, beta=3000.0, alpha=3.0)


# ---- model -------------------------------------------------------------------------------

class ZeroPadShortcut(nn.Module):
    """Option A shortcut of He et al.: subsample by `stride` and zero-pad the new channels
    (half before, half after, as akamaster/pytorch_resnet_cifar10 does). No parameters."""

    def __init__(self, stride: int, extra_channels: int):
        super().__init__()
        self.stride, self.extra = stride, extra_channels

    def forward(self, x):
        x = x[:, :, ::self.stride, ::self.stride]
        return F.pad(x, (0, 0, 0, 0, self.extra // 2, self.extra - self.extra // 2))


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN, plus the shortcut, then ReLU."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = ZeroPadShortcut(stride, c_out - c_in) if stride != 1 or c_in != c_out else nn.Identity()

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet56(nn.Module):
    """The CIFAR ResNet-56 of He et al. (2016, section 4.2), 6n+2 layers with n = 9: a 3x3
    stem conv (16 channels), three stages of 9 basic blocks at 16/32/64 channels (32x32,
    16x16, 8x8; the first block of stages 2 and 3 has stride 2), global average pool, Linear.

    Shortcuts are option A (identity, zero-padded channels where the width doubles), as in He
    et al.'s CIFAR experiments: the model is then the published one (0.85M parameters, 125.5M
    MACs at 32x32) and every convolution is a 3x3 that Top-K prunes. Option B would add two
    1x1 projection convs (+0.26M MACs), which Top-K never prunes. Module names are those of
    akamaster/pytorch_resnet_cifar10, the common PyTorch version, so its dense checkpoints
    (`module.`-prefixed, under 'state_dict') fit --pretrain-path as they are.

    Init: Kaiming-normal (fan_out, relu) convs, BN weight 1 / bias 0, PyTorch's default Linear."""

    def __init__(self, num_classes: int = 10, blocks_per_stage: int = 9):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        stages, c_in = [], 16
        for c_out, stride in ((16, 1), (32, 2), (64, 2)):
            blocks = []
            for i in range(blocks_per_stage):
                blocks.append(BasicBlock(c_in, c_out, stride if i == 0 else 1))
                c_in = c_out
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.linear = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.linear(F.adaptive_avg_pool2d(x, 1).flatten(1))


def build_model(args) -> nn.Module:
    """ResNet-56 for --dataset's classes; from --pretrain-path when given, else from scratch."""
    return tkp.start_from_pretrain_path(ResNet56(tkp.CIFAR_CLASSES[args.dataset]), args)


# ---- main --------------------------------------------------------------------------------

SCRIPT = tkp.cnn_script("resnet56", build_model)  # Top-K over every Conv2d; CIFAR at 32 px


def main(argv=None) -> dict:
    return tkp.run(get_args_parser().parse_args(argv), SCRIPT)


if __name__ == "__main__":
    tkp.cli(main)
