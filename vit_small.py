"""ViT-Small (or any timm ViT) on ImageNet-1k with N:M sparsity (TKP, 2:4 by default).

Fine-tunes a pretrained timm Vision Transformer in two stages: cross-entropy plus
beta * L_aux over every block of M consecutive weights of the attention (qkv, proj) and MLP
(fc1, fc2) Linears, then a hard N:M mask and masked fine-tuning. The patch embedding and
the classifier head are never pruned. Method and outputs: README.md, flags: --help; the method's fine print: DESIGN.md.

    pip install -r requirements.txt
    python vit_small.py --data-path /data/imagenet                 # ViT-S/16, 2:4, 30+30 epochs
    python vit_small.py --data-path /data/imagenet --sparsity-type dense   # the baseline
    python vit_small.py --data-path /data/imagenet \\
        --model vit_base_patch16_224.augreg2_in21k_ft_in1k             # ViT-B/16, no code change
    python vit_small.py --dry-run                                  # whole pipeline, generated data, 64 px
    torchrun --nproc_per_node 8 vit_small.py --data-path /data/imagenet

--data-path holds train/ and val/, each with one folder per class (ImageFolder layout).
Offline: --pretrained-path FILE (timm's weights file for --model) or --no-pretrained.
Measured results: RESULTS.md; no full run has been measured yet.
"""

import argparse
from pathlib import Path

import timm
import torch
import torch.nn as nn
from timm.data import create_transform, resolve_data_config

import tkp_common as tkp

# --target-layers names -> the Linear modules of each timm ViT block
TARGETS = {"qkv": ("attn.qkv",), "proj": ("attn.proj",), "mlp": ("mlp.fc1", "mlp.fc2")}


# ---- arguments ---------------------------------------------------------------------------

def target_layers(text: str) -> list[str]:
    names = tkp.comma_list(text)
    unknown = [n for n in names if n not in TARGETS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"choose from {','.join(TARGETS)}, got {text!r}")
    return names


def get_args_parser() -> tkp.ArgumentParser:
    p = tkp.base_parser("TKP: a timm Vision Transformer on ImageNet with N:M sparsity")
    g = p.add_argument_group("N:M sparsity")
    g.add_argument("--sparsity-type", type=tkp.nm_pattern, default="2:4",
                   help="keep N of every M consecutive weights ('2:4', '1:4', '4:8', ...) or 'dense'")
    g.add_argument("--target-layers", type=target_layers, default="qkv,proj,mlp",
                   help="comma-separated subset of qkv,proj,mlp")
    g = p.add_argument_group("model and data")
    g.add_argument("--model", default="vit_small_patch16_224.augreg_in21k_ft_in1k", help="timm model name")
    g.add_argument("--num-classes", type=tkp.int_range(2), default=1000, help="class folders under train/")
    g.add_argument("--img-size", type=tkp.int_range(16), default=224,
                   help="input resolution (timm resizes the position embeddings of pretrained weights)")
    g.add_argument("--pretrained", dest="pretrained", action="store_true", default=True,
                   help="start from timm's pretrained weights (downloaded from the Hugging Face hub)")
    g.add_argument("--no-pretrained", dest="pretrained", action="store_false", help="train from scratch")
    g.add_argument("--pretrained-path", default=None,
                   help="local weights file for --model (loaded by timm), for offline machines")
    g.add_argument("--data-path", default="./data/imagenet", help="folder with train/ and val/ (ImageFolder)")
    g.add_argument("--batch-size", dest="batch_train", type=tkp.int_range(1), help="training batch per process")
    g.add_argument("--batch-val", type=tkp.int_range(1), default=None, help="validation batch (default: --batch-size)")
    g.add_argument("--checkpoint-dir", dest="output_dir", type=tkp.path_arg,
                   help="the reference's name for --output-dir")
    # the paper's table row for ViT-S/16 / ImageNet-1k
    p.set_defaults(batch_train=256, epochs_stage1=30, epochs_stage2=30, lr=1e-4, weight_decay=0.05,
                   beta=1000.0, alpha=2.0)
    return p


# ---- model -------------------------------------------------------------------------------

def starts_pretrained(args) -> bool:
    """Whether build_model loads pretrained weights (not under --dry-run, nor under --eval,
    whose weights come from the checkpoint)."""
    return args.pretrained and not (args.dry_run or args.eval)


def build_model(args) -> nn.Module:
    if not timm.is_model(args.model):
        raise tkp.TKPError(f"timm has no model {args.model!r}; list them with "
                           f"python -c \"import timm; print(timm.list_models('vit_*', pretrained=True))\"")
    kwargs = dict(num_classes=args.num_classes, img_size=args.img_size)
    if not starts_pretrained(args):
        return timm.create_model(args.model, **kwargs)
    if args.pretrained_path:
        if not Path(args.pretrained_path).is_file():
            raise tkp.TKPError(f"--pretrained-path {args.pretrained_path} does not exist")
        kwargs["pretrained_cfg_overlay"] = dict(file=args.pretrained_path)
    before = torch.get_rng_state()  # the random init that timm draws before it loads the file
    try:  # timm loads the file, drops a classifier of another class count, resizes pos. embeddings
        with tkp.weights_only_loads():  # safetensors from the hub; a .pth (or old timm) never runs code
            model = timm.create_model(args.model, pretrained=True, **kwargs)
    except Exception as e:
        source = args.pretrained_path or "the Hugging Face hub"
        raise tkp.TKPError(f"could not load pretrained weights for {args.model} from {source} "
                           f"({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}); "
                           f"offline, pass --pretrained-path FILE (timm's weights file for this model) "
                           f"or train from scratch with --no-pretrained") from None
    if args.pretrained_path:
        after = torch.get_rng_state()
        torch.set_rng_state(before)
        init = timm.create_model(args.model, **kwargs).state_dict()  # the same draws, nothing loaded
        torch.set_rng_state(after)
        check_weights_came_from(model, init, args.pretrained_path, args.model)
    return model


def check_weights_came_from(model: nn.Module, init: dict, path: str, name: str) -> None:
    """timm loads a file leniently where the class count differs (a warning for keys that do
    not fit, the rest left as initialised): most of the model's randomly initialised tensors
    outside the head and the position embedding must differ from that init (`init`), else one line. Weights
    that are not finite are refused too (the first epoch would end as a non-finite loss)."""
    state = model.state_dict()
    bad = next((k for k, v in state.items() if v.is_floating_point() and not v.isfinite().all()), None)
    if bad is not None:
        raise tkp.TKPError(f"--pretrained-path {path}: its {bad} is not finite (NaN or inf); pass a good weights file")
    own = [k for k in state if not k.startswith(("head", "pos_embed")) and state[k].is_floating_point()
           and (init[k] != init[k].flatten()[0]).any()]  # drawn at random, not a constant such as LayerNorm's 1
    kept = [k for k in own if torch.equal(state[k], init[k])]
    if len(kept) > len(own) // 2:
        raise tkp.TKPError(f"--pretrained-path {path} does not fit --model {name}: {len(kept)} of its {len(own)} "
                           f"weight tensors (e.g. {kept[0]}) kept their random init; pass timm's weights file for "
                           f"{name}, or --no-pretrained")


def build_plan(model, args) -> tkp.Plan:
    if args.sparsity_type == "dense":
        return tkp.Plan("dense")
    n, m = (int(v) for v in args.sparsity_type.split(":"))
    suffixes = [s for name in args.target_layers for s in TARGETS[name]]
    names = [name for name, mod in model.named_modules()
             if isinstance(mod, nn.Linear) and name.startswith("blocks.")
             and any(name.endswith("." + s) for s in suffixes)]
    plan = tkp.nm_plan(model, n, m, names)
    if not plan.targets:
        raise tkp.TKPError(f"--sparsity-type {args.sparsity_type}: none of the targeted layers has an input "
                           f"width divisible by {m} ({'; '.join(plan.skipped[:2])}); choose another M")
    return plan


# ---- data --------------------------------------------------------------------------------

def build_data(args):
    """ImageNet in ImageFolder layout, with timm's transforms for the model's data config:
    RandAugment rand-m9-mstd0.5-inc1 and random erasing 0.25 (pixel) for training; the
    model's crop_pct and interpolation for validation. The data sets give RandAugment's
    posterize at 0 bits the black image of Pillow < 13 (newer Pillow raises) and skip
    unreadable files with a warning (tkp_lib.data)."""
    config = resolve_data_config({"input_size": (3, args.img_size, args.img_size)},
                                 pretrained_cfg=timm.models.get_pretrained_cfg(args.model).to_dict())
    train_tf = create_transform(**config, is_training=True, auto_augment="rand-m9-mstd0.5-inc1",
                                re_prob=0.25, re_mode="pixel")
    val_tf = create_transform(**config, is_training=False)
    if args.dry_run:
        return tkp.fake_splits(args, args.img_size, args.num_classes, train_tf, val_tf)
    root = Path(args.data_path)
    train, val = tkp.image_folder(root, "train", train_tf), tkp.image_folder(root, "val", val_tf)
    if train.classes != val.classes:
        raise tkp.TKPError(f"train/ has {len(train.classes)} classes and val/ {len(val.classes)}, or their "
                           f"names differ; both need the same class folders")
    if len(train.classes) != args.num_classes:
        raise tkp.TKPError(f"{root / 'train'} has {len(train.classes)} class folders; pass "
                           f"--num-classes {len(train.classes)}")
    return train, val


# ---- main --------------------------------------------------------------------------------

SCRIPT = tkp.Script(name="vit", build_model=build_model, build_data=build_data, build_plan=build_plan,
                    input_shape=lambda args: (3, args.img_size, args.img_size),
                    dataset_name=lambda args: "imagenet" if args.num_classes == 1000 else Path(args.data_path).name,
                    pretrained=starts_pretrained, min_lr_ratio=0.01, topk_metrics=(1, 5), conv_net=False)


DRY_RUN_IMG_SIZE = 64  # --dry-run without --img-size: 16 patches, a check of the install in seconds


def main(argv=None) -> dict:
    args = get_args_parser().parse_args(argv)
    if args.batch_val is None:
        args.batch_val = args.batch_train
    if args.dry_run and "img_size" not in args.explicit_flags:
        args.img_size = DRY_RUN_IMG_SIZE
    return tkp.run(args, SCRIPT)


if __name__ == "__main__":
    tkp.cli(main)
