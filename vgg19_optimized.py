"""VGG-19 (with BatchNorm) on CIFAR-100 with Top-K Pruning (TKP).

Trains the CIFAR VGG-19 of the pruning literature in two stages: `--epochs-stage1` epochs of
cross-entropy plus beta * L_aux (which pushes each 3x3 kernel's energy into its K largest
taps), then a hard Top-K mask, BatchNorm recalibration and `--epochs-stage2` epochs of
masked fine-tuning. A copy of vgg8_optimized.py in which only the model section differs.
Method and outputs: README.md, flags: --help; the method's fine print: DESIGN.md.

    pip install -r requirements.txt
    python vgg19_optimized.py                          # Top-1 from scratch, 100+100 epochs
    python vgg19_optimized.py --pretrain-path dense.pt # Top-1 from a dense VGG-19 (the paper's setting)
    python vgg19_optimized.py --dense-baseline         # the dense baseline, same pipeline
    python vgg19_optimized.py --dataset cifar10        # CIFAR-10 instead
    python vgg19_optimized.py --dry-run                # the whole pipeline on generated data, seconds
    torchrun --nproc_per_node 4 vgg19_optimized.py     # one process per GPU

Defaults: the paper gives no hyperparameters for VGG-19, so these are the VGG-8 row of its
table (batch 128/256, 100+100 epochs, AdamW lr 1e-3, weight decay 1e-4, beta 3000, alpha 3).
The paper reports 73.50% dense -> 72.77% at Top-1 on CIFAR-100 with an 8.90x theoretical
speed-up; our MAC count gives 8.99x for the same mask (DESIGN.md §12 explains the difference).

Measured results: RESULTS.md; no full 200-epoch run has been measured yet.
"""

import torch.nn as nn

import tkp_common as tkp

# ---- arguments ---------------------------------------------------------------------------

def get_args_parser() -> tkp.ArgumentParser:
    return tkp.cnn_parser(
        "TKP: VGG-19 (BatchNorm) on CIFAR with Top-K spatial pruning", dataset="cifar100",
        pretrain_help="a dense VGG-19 checkpoint to start stage 1 from (state_dict, or our final.pt)",
        no_pretrain_help="ignore --pretrain-path and train from scratch (the default without it)",
        # the paper gives no row for VGG-19: these are its VGG-8 / CIFAR-10 hyperparameters
        batch_train=128, batch_val=256, epochs_stage1=100, epochs_stage2=100,
        lr=1e-3, weight_decay=1e-4, beta=3000.0, alpha=3.0)


# ---- model -------------------------------------------------------------------------------

# configuration E of Simonyan & Zisserman: output channels of each 3x3 conv, "M" = maxpool 2x2
VGG19_CONFIG = [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M",
                512, 512, 512, 512, "M", 512, 512, 512, 512, "M"]


class VGG19(nn.Module):
    """VGG-19 with BatchNorm as CIFAR pruning papers use it: configuration E's sixteen bias-free
    3x3 convs, each followed by BatchNorm and ReLU, five 2x2 max pools (32x32 -> 1x1), then a
    single Linear(512, classes).

    The single Linear is the CIFAR head of network slimming (Liu et al. 2017) and "Rethinking
    the value of network pruning" (Liu et al. 2019); kuangliu/pytorch-cifar uses the same
    network. ImageNet's 4096-4096 head was made for 7x7x512 features; on a 1x1x512 map it
    would add about 19M dense parameters and MACs that Top-K does not touch. (Network slimming
    replaces the fifth max pool by a 2x2 average pool: same parameters and MACs.)

    Init: Kaiming-normal (fan_out, relu) convs, BN weight 1 / bias 0, Linear N(0, 0.01)
    with zero bias, as in VGG-8."""

    def __init__(self, num_classes: int = 100, config: list = VGG19_CONFIG):
        super().__init__()
        layers, c_in = [], 3
        for v in config:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [nn.Conv2d(c_in, v, 3, padding=1, bias=False), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
                c_in = v
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(c_in, num_classes))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        return self.classifier(self.features(x))


def build_model(args) -> nn.Module:
    """VGG-19 for --dataset's classes; from --pretrain-path when given, else from scratch."""
    return tkp.start_from_pretrain_path(VGG19(tkp.CIFAR_CLASSES[args.dataset]), args)


# ---- main --------------------------------------------------------------------------------

SCRIPT = tkp.cnn_script("vgg19", build_model)  # Top-K over every Conv2d; CIFAR at 32 px


def main(argv=None) -> dict:
    return tkp.run(get_args_parser().parse_args(argv), SCRIPT)


if __name__ == "__main__":
    tkp.cli(main)
