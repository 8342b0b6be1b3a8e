"""DenseNet-121 (ImageNet-pretrained) on CIFAR-100 at 224 px with Top-K Pruning (TKP).

Fine-tunes torchvision's DenseNet-121, its classifier replaced for 100 classes, in two
stages: cross-entropy plus beta * L_aux, then a hard Top-K mask on every Conv2d (the 7x7
stem too, unless --exclude-layers features.conv0 keeps it dense; the 1x1 convolutions are
never pruned), BatchNorm recalibration and masked fine-tuning. Method, flags and outputs:
README.md; the method's fine print: DESIGN.md.

    pip install -r requirements.txt
    python densenet_optimized.py                      # Top-1, the paper's defaults (100+100 epochs)
    python densenet_optimized.py --dense-baseline     # same pipeline, no mask, no regularizer
    python densenet_optimized.py --dry-run            # the whole pipeline on generated data
    torchrun --nproc_per_node 4 densenet_optimized.py

Offline: --pretrain-path FILE takes a copy of torchvision's densenet121-a639ec97.pth.
Measured results: RESULTS.md; no full run has been measured yet.
"""

import re

import torch.nn as nn
import torchvision.models as tvm

import tkp_common as tkp

WEIGHTS = tvm.DenseNet121_Weights.IMAGENET1K_V1


# ---- arguments ---------------------------------------------------------------------------

def get_args_parser() -> tkp.ArgumentParser:
    return tkp.cnn_parser(
        "TKP: ImageNet-pretrained DenseNet-121 on CIFAR with Top-K spatial pruning", dataset="cifar100", img_size=224,
        pretrain_help="local DenseNet-121 weights (torchvision's ImageNet file, or a state_dict with "
                      "this run's class count) instead of downloading them",
        # the paper's table row for DenseNet-121 / CIFAR-100
        batch_train=256, batch_val=512, epochs_stage1=100, epochs_stage2=100,
        lr=1e-3, weight_decay=1e-4, beta=3000.0, alpha=3.0)


# ---- model -------------------------------------------------------------------------------

# torchvision's DenseNet files name some keys "...denselayer1.norm.1.weight"; the modules
# are now called "norm1". torchvision renames them on load (torchvision.models.densenet); so
# do we, for files read from --pretrain-path or the hub cache.
OLD_KEY = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$")


def build_model(args) -> nn.Module:
    model = tvm.densenet121(weights=None)
    model.classifier = nn.Linear(model.classifier.in_features, tkp.CIFAR_CLASSES[args.dataset])
    if tkp.loads_imagenet_weights(args):
        state, source = tkp.pretrained_state(args.pretrain_path, WEIGHTS)
        state = {OLD_KEY.sub(r"\1\2", k): v for k, v in state.items()}
        # ImageNet's 1000-class classifier is not loaded; one with this run's class count is
        tkp.load_weights(model, state, source, replaceable=("classifier",))
    return model


# ---- main --------------------------------------------------------------------------------

# Top-K over every Conv2d (the 7x7 stem too); CIFAR upscaled to --img-size, ImageNet statistics
SCRIPT = tkp.cnn_script("densenet121", build_model, upscaled=True, pretrained=tkp.loads_imagenet_weights)


def main(argv=None) -> dict:
    return tkp.run(get_args_parser().parse_args(argv), SCRIPT)


if __name__ == "__main__":
    tkp.cli(main)
