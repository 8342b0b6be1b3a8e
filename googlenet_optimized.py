"""GoogLeNet (ImageNet-pretrained) on CIFAR-100 at 224 px with Top-K Pruning (TKP).

Fine-tunes torchvision's GoogLeNet, its classifiers replaced for 100 classes, in two stages:
cross-entropy plus beta * L_aux, then a hard Top-K mask on every Conv2d (the 7x7 stem too,
unless --exclude-layers conv1 keeps it dense), BatchNorm recalibration and masked
fine-tuning. Method and outputs: README.md, flags: --help; the method's fine print: DESIGN.md.

    pip install -r requirements.txt
    python googlenet_optimized.py                     # Top-1, the paper's defaults (100+100 epochs)
    python googlenet_optimized.py --dense-baseline    # same pipeline, no mask, no regularizer
    python googlenet_optimized.py --dry-run           # the whole pipeline on generated data
    torchrun --nproc_per_node 4 googlenet_optimized.py

Offline: --pretrain-path FILE takes a copy of torchvision's googlenet-1378be20.pth.
Measured results: RESULTS.md; no full run has been measured yet.
"""

import torch.nn as nn
import torchvision.models as tvm

import tkp_common as tkp

WEIGHTS = tvm.GoogLeNet_Weights.IMAGENET1K_V1
HEADS = ("fc", "aux1.fc2", "aux2.fc2")  # the classifiers replaced for --dataset's classes


# ---- arguments ---------------------------------------------------------------------------

def get_args_parser() -> tkp.ArgumentParser:
    return tkp.cnn_parser(
        "TKP: ImageNet-pretrained GoogLeNet on CIFAR with Top-K spatial pruning", dataset="cifar100", img_size=224,
        pretrain_help="local GoogLeNet weights (torchvision's ImageNet file, or a state_dict with "
                      "this run's class count) instead of downloading them",
        # the paper's table row for GoogLeNet / CIFAR-100
        batch_train=256, batch_val=512, epochs_stage1=100, epochs_stage2=100,
        lr=1e-3, weight_decay=1e-4, beta=3000.0, alpha=3.0)


# ---- model -------------------------------------------------------------------------------

def build_model(args) -> nn.Module:
    """torchvision's GoogLeNet with its auxiliary heads built (as the reference has them) but
    out of the loss and frozen. transform_input follows the weights: the ImageNet weights
    expect torchvision to re-map ImageNet-normalised input to the [-1, 1] scaling they were
    trained with; a model trained from scratch uses the input as it comes."""
    model = tvm.googlenet(weights=None, aux_logits=True, transform_input=not args.no_pretrain,
                          init_weights=args.no_pretrain)
    replace_heads(model, tkp.CIFAR_CLASSES[args.dataset])
    if tkp.loads_imagenet_weights(args):
        state, source = tkp.pretrained_state(args.pretrain_path, WEIGHTS)
        # ImageNet's 1000-class heads are not loaded; heads with this run's class count are
        tkp.load_weights(model, state, source, replaceable=HEADS)
    model.aux_logits = False  # forward returns the main logits only
    for head in (model.aux1, model.aux2):
        head.requires_grad_(False)  # not in the loss: no gradient, no weight decay, no DDP sync
    return model


def replace_heads(model, num_classes: int) -> None:
    """New Linear classifiers for `num_classes` (main and both auxiliary heads)."""
    for parent, name in ((model, "fc"), (model.aux1, "fc2"), (model.aux2, "fc2")):
        setattr(parent, name, nn.Linear(getattr(parent, name).in_features, num_classes))


# ---- main --------------------------------------------------------------------------------

# Top-K over every Conv2d (the 7x7 stem too); CIFAR upscaled to --img-size, ImageNet statistics
SCRIPT = tkp.cnn_script("googlenet", build_model, upscaled=True, pretrained=tkp.loads_imagenet_weights)


def main(argv=None) -> dict:
    return tkp.run(get_args_parser().parse_args(argv), SCRIPT)


if __name__ == "__main__":
    tkp.cli(main)
