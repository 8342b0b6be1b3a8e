"""GoogLeNet (ImageNet-pretrained) on CIFAR-100 at 224 px with Top-K Pruning (TKP).

Fine-tunes torchvision's GoogLeNet, its classifiers replaced for 100 classes, in two stages:
cross-entropy plus beta * L_aux, then a hard Top-K mask on every Conv2d (the 7x7 stem too,
unless --exclude-layers conv1 keeps it dense), BatchNorm recalibration and masked
fine-tuning. Method, flags and outputs: README.md; the contract: SPEC.md.

    pip install -r requirements.txt
    python googlenet_optimized.py                     # Top-1, the paper's defaults (100+100 epochs)
    python googlenet_optimized.py --dense-baseline    # same pipeline, no mask, no regularizer
    python googlenet_optimized.py --dry-run           # the whole pipeline on generated data
    torchrun --nproc_per_node 4 googlenet_optimized.py

Offline: --pretrain-path FILE takes a copy of torchvision's googlenet-1378be20.pth.
Measured results: see README.md ("Results"); no full run has been measured yet.
"""

import torch.nn as nn
import torchvision.models as tvm

import tkp_common as tkp

WEIGHTS = tvm.GoogLeNet_Weights.IMAGENET1K_V1
HEADS = ("fc", "aux1.fc2", "aux2.fc2")  # the classifiers replaced for --dataset's classes


# ---- arguments ---------------------------------------------------------------------------

def get_args_parser() -> tkp.ArgumentParser:
    p = tkp.base_parser("TKP: ImageNet-pretrained GoogLeNet on CIFAR with Top-K spatial pruning")
    tkp.add_topk_args(p)
    g = p.add_argument_group("model and data")
    g.add_argument("--dataset", choices=["cifar10", "cifar100"], default="cifar100")
    g.add_argument("--data-root", default="./data", help="folder that holds (or receives) CIFAR")
    g.add_argument("--img-size", type=tkp.int_range(32), default=224, help="training and validation crop size")
    g.add_argument("--pretrain-path", default=None,
                   help="local GoogLeNet weights (torchvision's ImageNet file, or a state_dict with "
                        "this run's class count) instead of downloading them")
    g.add_argument("--no-pretrain", action="store_true", help="train from scratch")
    # the paper's table row for GoogLeNet / CIFAR-100
    p.set_defaults(batch_train=256, batch_val=512, epochs_stage1=100, epochs_stage2=100,
                   lr=1e-3, weight_decay=1e-4, beta=3000.0, alpha=3.0)
    return p


# ---- model -------------------------------------------------------------------------------

def starts_pretrained(args) -> bool:
    """Whether build_model loads ImageNet weights (not under --dry-run, nor under --eval,
    whose weights come from the checkpoint)."""
    return not (args.no_pretrain or args.dry_run or args.eval)


def build_model(args) -> nn.Module:
    """torchvision's GoogLeNet with its auxiliary heads built (as the reference has them) but
    out of the loss and frozen. transform_input follows the weights: the ImageNet weights
    expect torchvision to re-map ImageNet-normalised input to the [-1, 1] scaling they were
    trained with; a model trained from scratch uses the input as it comes."""
    model = tvm.googlenet(weights=None, aux_logits=True, transform_input=not args.no_pretrain,
                          init_weights=args.no_pretrain)
    replace_heads(model, tkp.CIFAR_CLASSES[args.dataset])
    if starts_pretrained(args):
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


def build_plan(model, args) -> tkp.Plan:
    return tkp.topk_plan(model, args.topk, args.exclude_layers, dense=args.dense_baseline)


# ---- data --------------------------------------------------------------------------------

def build_data(args):
    return tkp.cifar_splits(args, *tkp.upscaled_cifar_transforms(args.img_size))


# ---- main --------------------------------------------------------------------------------

SCRIPT = tkp.Script(name="googlenet", build_model=build_model, build_data=build_data, build_plan=build_plan,
                    input_shape=lambda args: (3, args.img_size, args.img_size),
                    dataset_name=lambda args: args.dataset, pretrained=starts_pretrained)


def main(argv=None) -> dict:
    args = get_args_parser().parse_args(argv)
    return tkp.run(args, SCRIPT)


if __name__ == "__main__":
    tkp.cli(main)
