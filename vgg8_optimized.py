"""VGG-8 on CIFAR-10 with Top-K Pruning (TKP).

Trains the reference's VGG-8 from scratch in two stages: `--epochs-stage1` epochs of
cross-entropy plus beta * L_aux (which pushes each 3x3 kernel's energy into its K largest
taps), then a hard Top-K mask, BatchNorm recalibration and `--epochs-stage2` epochs of
masked fine-tuning. Method and outputs: README.md, flags: --help; the method's fine print: DESIGN.md.

    pip install -r requirements.txt
    python vgg8_optimized.py                       # Top-1, the paper's defaults (100+100 epochs)
    python vgg8_optimized.py --dense-baseline      # same pipeline, no mask, no regularizer
    python vgg8_optimized.py --dry-run             # the whole pipeline on generated data, seconds
    torchrun --nproc_per_node 4 vgg8_optimized.py  # one process per GPU

Measured results: RESULTS.md; no full 200-epoch run has been measured yet.
"""

import torch.nn as nn

import tkp_common as tkp

# ---- arguments ---------------------------------------------------------------------------

def get_args_parser() -> tkp.ArgumentParser:
    return tkp.cnn_parser(
        "TKP: VGG-8 on CIFAR with Top-K spatial pruning", dataset="cifar10",
        pretrain_help="a dense VGG-8 checkpoint to start stage 1 from (state_dict, or our final.pt)",
        no_pretrain_help="ignore --pretrain-path and train from scratch (the default without it)",
        # the paper's table row for VGG-8 / CIFAR-10
        batch_train=128, batch_val=256, epochs_stage1=100, epochs_stage2=100,
        lr=1e-3, weight_decay=1e-4, beta=3000.0, alpha=3.0)


# ---- model -------------------------------------------------------------------------------

class VGG8(nn.Module):
    """The reference's VGG-8: four bias-free 3x3 convs (64, 64, pool, 128, 128, pool), each
    followed by BatchNorm and ReLU, then Linear(128*8*8, 256), ReLU, Dropout(0.5), Linear."""

    def __init__(self, num_classes: int = 10):
        super().__init__()

        def block(c_in, c_out):
            return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]

        self.features = nn.Sequential(*block(3, 64), *block(64, 64), nn.MaxPool2d(2),
                                      *block(64, 128), *block(128, 128), nn.MaxPool2d(2))
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(128 * 8 * 8, 256), nn.ReLU(inplace=True),
                                        nn.Dropout(0.5), nn.Linear(256, num_classes))
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
    """VGG-8 for --dataset's classes; from --pretrain-path when given, else from scratch."""
    return tkp.start_from_pretrain_path(VGG8(tkp.CIFAR_CLASSES[args.dataset]), args)


# ---- main --------------------------------------------------------------------------------

SCRIPT = tkp.cnn_script("vgg8", build_model)  # Top-K over every Conv2d; CIFAR at 32 px


def main(argv=None) -> dict:
    return tkp.run(get_args_parser().parse_args(argv), SCRIPT)


if __name__ == "__main__":
    tkp.cli(main)
