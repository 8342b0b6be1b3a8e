"""CLIP (open_clip, ViT-B/16 by default) with N:M sparsity in both towers (TKP, 2:4 by default).

Fine-tunes a pretrained open_clip CLIP model in two stages the way CLIP pretrains (FLYP,
Goyal et al. 2022): each training image is paired with a prompt of its class name in a
random ImageNet template, and both towers are trained with the symmetric contrastive loss
at the model's own temperature, plus beta * L_aux over every block of M consecutive weights
of the attention (packed in_proj_weight, out_proj) and MLP (c_fc, c_proj) weights of both
towers; then a hard N:M mask and masked fine-tuning. Embeddings, the patch embedding and the
final projections are never pruned. Evaluation is zero-shot top-1/top-5: the classifier is
rebuilt from the (pruned) text tower before every evaluation. Method and outputs: README.md;
flags: --help; what is pruned, FLYP and the zero-shot evaluation: DESIGN.md §13.

    pip install -r requirements.txt
    python clip_vit.py --data-path /data/imagenet --one-shot       # masks from the pretrained weights, no training
    python clip_vit.py --data-path /data/imagenet                  # 2:4 in both towers, 5+5 epochs
    python clip_vit.py --data-path /data/imagenet --sparsity-type dense    # the baseline (FLYP alone)
    python clip_vit.py --dry-run                                   # whole pipeline, generated data, a tiny CLIP
    torchrun --nproc_per_node 8 clip_vit.py --data-path /data/imagenet --batch-size 32

--data-path holds train/ and val/, each with one folder per class (ImageFolder layout).
Offline: --pretrained-path FILE (open_clip's weights file for --model) or --no-pretrained.
Measured results: none yet (RESULTS.md); the default hyperparameters are FLYP's
ImageNet learning rate and weight decay, and the ViT script's beta and alpha, untuned here.
"""

import argparse
import copy
import json
import logging
import re
from pathlib import Path

import open_clip
import torch
import torch.nn as nn
import torch.nn.functional as F

import tkp_common as tkp

# --target-layers: the pruned weights of each open_clip residual block, and the towers
KINDS = {"attn": ("attn.in_proj_weight", "attn.out_proj.weight"), "mlp": ("mlp.c_fc.weight", "mlp.c_proj.weight")}
TOWERS = ("vision", "text")
BLOCK_WEIGHT = re.compile(r"(?:^|\.)resblocks\.\d+\.(.+)$")
TEMPLATES = {"openai": open_clip.OPENAI_IMAGENET_TEMPLATES, "simple": open_clip.SIMPLE_IMAGENET_TEMPLATES}
WNID = re.compile(r"n\d{8}")
DRY_RUN_CLASSES = 4
# --dry-run without --model: a CLIP of open_clip's own classes with two blocks per tower, 64 px
# images, CLIP's tokenizer (3.8M parameters, 3.2M of them the token embedding); open_clip's smallest
# named model, ViT-S-32-alt (43M), made the dry run write 750 MB of checkpoints
DRY_RUN_MODEL = "tiny-dry-run"
DRY_RUN_CONFIG = {"embed_dim": 64,
                  "vision_cfg": {"image_size": 64, "layers": 2, "width": 128, "patch_size": 16, "head_width": 32},
                  "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}}


# ---- arguments ---------------------------------------------------------------------------

def target_layers(text: str) -> list[str]:
    names = tkp.comma_list(text)
    unknown = [n for n in names if n not in (*KINDS, *TOWERS)]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"choose from {','.join((*KINDS, *TOWERS))}, got {text!r}")
    return names


def get_args_parser() -> tkp.ArgumentParser:
    p = tkp.base_parser("TKP: an open_clip CLIP model with N:M sparsity in both towers, zero-shot on ImageNet")
    g = p.add_argument_group("N:M sparsity")
    g.add_argument("--sparsity-type", type=tkp.nm_pattern, default="2:4",
                   help="keep N of every M consecutive weights ('2:4', '1:4', '4:8', ...) or 'dense'")
    g.add_argument("--target-layers", type=target_layers, default="attn,mlp,vision,text",
                   help="comma-separated: attn and/or mlp (the weights of each block), vision and/or text (the "
                        "towers); a group left out means all of it, e.g. 'mlp' = the MLPs of both towers")
    g.add_argument("--one-shot", action="store_true",
                   help="no training: zero-shot before, masks from the starting weights, zero-shot after")
    g = p.add_argument_group("model and data")
    g.add_argument("--model", default="ViT-B-16", help="open_clip model name, or the path of a model-config JSON")
    g.add_argument("--pretrained", default="openai", metavar="TAG",
                   help="open_clip's pretrained weights for --model (downloaded from the Hugging Face hub)")
    g.add_argument("--no-pretrained", dest="pretrained", action="store_const", const=None, help="random init")
    g.add_argument("--pretrained-path", default=None,
                   help="local open_clip weights file for --model (offline machines)")
    g.add_argument("--data-path", default="./data/imagenet", help="folder with train/ and val/ (ImageFolder)")
    g.add_argument("--classnames", default=None, metavar="FILE",
                   help="class names, one per line, in the sorted order of the class folders (default: "
                        "open_clip's ImageNet names for ImageNet-1k's wnid folders, else the folder names)")
    g.add_argument("--templates", choices=list(TEMPLATES), default="openai",
                   help="prompt templates: open_clip's 80 OpenAI ImageNet templates, or its 7 simple ones")
    g.add_argument("--batch-size", dest="batch_train", type=tkp.int_range(1), help="training batch per process")
    g.add_argument("--batch-val", type=tkp.int_range(1), default=None, help="validation batch (default: --batch-size)")
    # FLYP's ImageNet learning rate and weight decay; beta and alpha as for the ViT (untuned)
    p.set_defaults(batch_train=256, epochs_stage1=5, epochs_stage2=5, lr=1e-5, weight_decay=0.1,
                   beta=1000.0, alpha=2.0)
    return p


# ---- model -------------------------------------------------------------------------------

class ZeroShot(nn.Module):
    """What TKP adds to an open_clip CLIP model. The model's class is swapped for a subclass
    of it (ZeroShotCLIP), so its parameters and state_dict keep open_clip's names and a
    final.pt loads into a fresh open_clip model. `model(images)` gives zero-shot logits
    against `classifier` (one row per class, rebuilt from the text tower by
    `rebuild_classifier`); `model(images, labels, draws)` gives FLYP's logits, each image
    against the prompts of the batch's labels (template i = floor(draw * templates)).
    Prompts and classifier are non-persistent buffers, rebuilt on every process from the
    same weights, so DDP does not broadcast them."""

    def attach_prompts(self, classnames: list[str], prompts: torch.Tensor, embed_dim: int) -> None:
        """prompts: token ids (classes, templates, context)."""
        self.classnames = list(classnames)
        self.register_buffer("prompts", prompts, persistent=False)
        self.register_buffer("classifier", torch.zeros(len(classnames), embed_dim), persistent=False)
        self._ddp_params_and_buffers_to_ignore = ["prompts", "classifier"]

    def forward(self, images: torch.Tensor, labels: torch.Tensor | None = None, draws: torch.Tensor | None = None):
        image = F.normalize(self.encode_image(images), dim=-1)
        scale = self.logit_scale.exp().clamp(max=100)  # open_clip caps the temperature at 100
        if labels is None:
            return scale * image @ self.classifier.t()
        templates = self.prompts.shape[1]
        chosen = (draws * templates).long().clamp(max=templates - 1)
        text = F.normalize(self.encode_text(self.prompts[labels, chosen]), dim=-1)
        return scale * image @ text.t()

    @torch.no_grad()
    def rebuild_classifier(self, prompts_per_pass: int = 1024) -> None:
        """Each class's row: the mean of its prompts' normalised text embeddings, normalised
        (CLIP's zero-shot recipe, as open_clip.build_zero_shot_classifier)."""
        training = self.training
        self.eval()
        classes, templates, _ = self.prompts.shape
        step = max(1, prompts_per_pass // templates)
        for start in range(0, classes, step):
            tokens = self.prompts[start:start + step]
            text = F.normalize(self.encode_text(tokens.flatten(0, 1)).float(), dim=-1)
            per_class = text.view(len(tokens), templates, -1).mean(1)
            self.classifier[start:start + len(tokens)] = F.normalize(per_class, dim=-1)
        self.train(training)


class ZeroShotCLIP(ZeroShot, open_clip.CLIP):
    pass


class ZeroShotCustomTextCLIP(ZeroShot, open_clip.CustomTextCLIP):
    pass


ZERO_SHOT = {open_clip.CLIP: ZeroShotCLIP, open_clip.CustomTextCLIP: ZeroShotCustomTextCLIP}


def is_config_file(args) -> bool:
    """Whether --model is an architecture config of its own (a JSON file, or the dry run's),
    not an open_clip model name: no pretrained tags, CLIP's own tokenizer."""
    return args.model.endswith(".json") or args.model == DRY_RUN_MODEL


def model_config(args) -> dict:
    """open_clip's architecture config: of the model name, or read from --model's JSON file
    (a bare config such as open_clip's model_configs/*.json, or an open_clip_config.json)."""
    if args.model == DRY_RUN_MODEL:
        return copy.deepcopy(DRY_RUN_CONFIG)
    if not is_config_file(args):
        cfg = open_clip.get_model_config(args.model)
        if cfg is None:
            raise tkp.TKPError(f"open_clip has no model {args.model!r}; list them with python -c \"import open_clip; "
                               f"print(open_clip.list_models())\", or pass a model-config JSON file")
        return cfg
    path = Path(args.model)
    try:
        cfg = json.loads(path.read_text())
    except OSError as e:
        raise tkp.TKPError(f"--model {path}: cannot read it ({e.strerror})") from None
    except ValueError as e:
        raise tkp.TKPError(f"--model {path} is not JSON ({e})") from None
    cfg = cfg.get("model_cfg", cfg) if isinstance(cfg, dict) else cfg
    if not isinstance(cfg, dict) or not {"embed_dim", "vision_cfg", "text_cfg"} <= set(cfg):
        raise tkp.TKPError(f"--model {path} is not an open_clip model config (it needs embed_dim, vision_cfg, "
                           f"text_cfg)")
    return cfg


def tag_config(args) -> dict:
    """open_clip's config of the --pretrained tag for --model ({} for none or a config file)."""
    if args.pretrained and not is_config_file(args):
        return open_clip.get_pretrained_cfg(args.model, args.pretrained) or {}
    return {}


def starts_pretrained(args) -> bool:
    """Whether build_model loads pretrained weights (not under --dry-run, nor under --eval,
    whose weights come from the checkpoint)."""
    return args.pretrained is not None and not (args.dry_run or args.eval)


def new_clip(cfg: dict, quick_gelu: bool) -> nn.Module:
    """A randomly initialised open_clip model of the architecture config `cfg`."""
    cfg = dict(cfg)
    custom = cfg.pop("custom_text", False) or "hf_model_name" in cfg["text_cfg"]
    cfg["quick_gelu"] = quick_gelu or cfg.get("quick_gelu", False)
    try:
        return (open_clip.CustomTextCLIP if custom else open_clip.CLIP)(**cfg)
    except TypeError as e:
        raise tkp.TKPError(f"not an open_clip CLIP model config ({e})") from None


def create_clip(args, cfg: dict) -> nn.Module:
    """The open_clip model, with the weights of --pretrained-path or the --pretrained tag, or
    random. QuickGELU follows the tag's config (OpenAI's weights were trained with it)."""
    quick_gelu = tag_config(args).get("quick_gelu", False)
    if not starts_pretrained(args):
        return new_clip(cfg, quick_gelu)
    if is_config_file(args):
        if not args.pretrained_path:
            what = "the dry run's model" if args.model == DRY_RUN_MODEL else "a config file"
            raise tkp.TKPError(f"--model {args.model} is {what}, which has no pretrained tags: pass "
                               f"--pretrained-path FILE or --no-pretrained")
        model = new_clip(cfg, quick_gelu)
        load_clip_weights(args, lambda: open_clip.load_checkpoint(model, args.pretrained_path))
        return model
    if not args.pretrained_path and not tag_config(args):
        raise tkp.TKPError(f"open_clip has no weights {args.pretrained!r} for {args.model}; choose from "
                           f"{', '.join(open_clip.list_pretrained_tags_by_model(args.model)) or 'none'}, or pass "
                           f"--pretrained-path FILE or --no-pretrained")
    return load_clip_weights(args, lambda: open_clip.create_model(
        args.model, pretrained=args.pretrained_path or args.pretrained, force_quick_gelu=quick_gelu))


def load_clip_weights(args, load):
    """`load()`, with a failed download or an unreadable file as one line (huggingface_hub's
    retry warnings and open_clip's error log are held back while it runs: the line says it)."""
    if args.pretrained_path and not Path(args.pretrained_path).is_file():
        raise tkp.TKPError(f"--pretrained-path {args.pretrained_path} does not exist")
    before = logging.root.manager.disable
    logging.disable(logging.CRITICAL)
    try:
        with tkp.weights_only_loads():  # safetensors from the hub; a .pt/.bin file never runs code
            return load()
    except Exception as e:  # noqa: BLE001 - network, hub, file and key errors alike
        source = args.pretrained_path or f"open_clip's tag {args.pretrained!r} (the Hugging Face hub)"
        hub = tag_config(args).get("hf_hub", "")
        detail = (str(e).splitlines() or [""])[0]
        detail = detail if len(detail) <= 160 else detail[:157] + "..."
        raise tkp.TKPError(f"could not load pretrained weights for {args.model} from {source} "
                           f"({type(e).__name__}: {detail}); offline, pass --pretrained-path FILE (open_clip's "
                           f"weights file for this model{f', from the hub repo {hub}' if hub else ''}) or train "
                           f"from scratch with --no-pretrained") from None
    finally:
        logging.disable(before)


def tokenizer_for(args, cfg: dict):
    if not is_config_file(args):
        return open_clip.get_tokenizer(args.model)
    if cfg["text_cfg"].get("hf_tokenizer_name"):
        raise tkp.TKPError(f"--model {args.model}: Hugging Face tokenizers are not supported; use CLIP's own")
    return open_clip.SimpleTokenizer(context_length=cfg["text_cfg"].get("context_length", 77))


def build_model(args) -> nn.Module:
    """The open_clip model as a ZeroShot subclass, with the prompts of every class and template
    (--dry-run: 4 classes, 2 templates)."""
    cfg = model_config(args)
    model = create_clip(args, cfg)
    if type(model) not in ZERO_SHOT:
        raise tkp.TKPError(f"--model {args.model} builds a {type(model).__name__}; only CLIP two-tower models "
                           f"are supported")
    model.__class__ = ZERO_SHOT[type(model)]
    names, templates = class_names(args), TEMPLATES[args.templates][:2 if args.dry_run else None]
    prompts = tokenizer_for(args, cfg)([t(c) for c in names for t in templates])
    vocab = cfg["text_cfg"].get("vocab_size", 49408)
    if int(prompts.max()) >= vocab:
        raise tkp.TKPError(f"--model {args.model}: its text vocab_size {vocab} is smaller than the tokenizer's; "
                           f"use 49408 for CLIP's tokenizer")
    model.attach_prompts(names, prompts.view(len(names), len(templates), -1), cfg["embed_dim"])
    return model


def build_plan(model, args) -> tkp.Plan:
    """N:M over the targeted weights of every residual block of the targeted towers."""
    if args.sparsity_type == "dense":
        return tkp.Plan("dense")
    n, m = (int(v) for v in args.sparsity_type.split(":"))
    kinds = [k for k in args.target_layers if k in KINDS] or list(KINDS)
    towers = [t for t in args.target_layers if t in TOWERS] or list(TOWERS)
    suffixes = {s for k in kinds for s in KINDS[k]}
    names = {t: [] for t in towers}
    for name, _ in model.named_parameters():
        match, tower = BLOCK_WEIGHT.search(name), "vision" if name.startswith("visual.") else "text"
        if match and match.group(1) in suffixes and tower in names:
            names[tower].append(name)
    for tower, found in names.items():
        if not found:
            raise tkp.TKPError(f"--target-layers {','.join(args.target_layers)}: the {tower} tower of {args.model} "
                               f"has no open_clip transformer blocks (resblocks) to prune")
    plan = tkp.nm_param_plan(model, n, m, [name for found in names.values() for name in found])
    if not plan.targets:
        raise tkp.TKPError(f"--sparsity-type {args.sparsity_type}: none of the targeted weights has an input "
                           f"width divisible by {m} ({'; '.join(plan.skipped[:2])}); choose another M")
    return plan


# ---- data --------------------------------------------------------------------------------

def class_folders(args) -> list[str] | None:
    """The class folders of train/, sorted as ImageFolder sorts them (None when rebuilding a
    final.pt without its data, e.g. for a benchmark)."""
    train = Path(args.data_path) / "train"
    if not train.is_dir():
        if args.eval:
            return None
        raise tkp.TKPError(f"{train} does not exist: --data-path must hold train/ and val/, each with one folder "
                           f"of images per class")
    folders = sorted(p.name for p in train.iterdir() if p.is_dir())
    if not folders:
        tkp.image_folder(Path(args.data_path), "train", None)  # raises its one-line hint
    return folders


def class_names(args) -> list[str]:
    """The class names in label order: --classnames FILE; open_clip's ImageNet names when
    train/ holds ImageNet-1k's 1000 wnid folders; else the folder names (_ read as spaces)."""
    if args.dry_run:
        return list(open_clip.IMAGENET_CLASSNAMES[:DRY_RUN_CLASSES])
    folders = class_folders(args)
    if args.classnames:
        try:
            names = [line.strip() for line in Path(args.classnames).read_text().splitlines() if line.strip()]
        except (OSError, UnicodeDecodeError) as e:
            raise tkp.TKPError(f"--classnames {args.classnames}: cannot read it ({e})") from None
        if folders is not None and len(names) != len(folders):
            raise tkp.TKPError(f"--classnames {args.classnames} has {len(names)} names and "
                               f"{Path(args.data_path) / 'train'} {len(folders)} class folders; give one per folder")
        return names
    if folders is None or is_imagenet(folders):
        return list(open_clip.IMAGENET_CLASSNAMES)
    return [f.replace("_", " ") for f in folders]


def is_imagenet(folders: list[str]) -> bool:
    return len(folders) == len(open_clip.IMAGENET_CLASSNAMES) and all(WNID.fullmatch(f) for f in folders)


def preprocess(args) -> open_clip.transform.PreprocessCfg:
    """open_clip's preprocessing for the model: its input size, the tag's mean/std and resize."""
    cfg = model_config(args)
    merged = open_clip.transform.merge_preprocess_dict(open_clip.transform.PreprocessCfg(),
                                                       {**cfg.get("preprocess_cfg", {}), **tag_config(args)})
    merged["size"] = cfg["vision_cfg"].get("image_size", 224)
    return open_clip.transform.PreprocessCfg(**merged)


def image_size(args) -> int:
    size = preprocess(args).size
    return size if isinstance(size, int) else size[0]


def build_data(args):
    """ImageNet (or any ImageFolder tree) with open_clip's transforms: RandomResizedCrop
    (scale 0.9-1) for training as CLIP trains, resize and centre crop for validation."""
    cfg = preprocess(args)
    train_tf = open_clip.transform.image_transform_v2(cfg, is_train=True)
    val_tf = open_clip.transform.image_transform_v2(cfg, is_train=False)
    if args.dry_run:
        return tkp.fake_splits(args, image_size(args), DRY_RUN_CLASSES, train_tf, val_tf)
    root = Path(args.data_path)
    train, val = tkp.image_folder(root, "train", train_tf), tkp.image_folder(root, "val", val_tf)
    if train.classes != val.classes:
        raise tkp.TKPError(f"train/ has {len(train.classes)} classes and val/ {len(val.classes)}, or their "
                           f"names differ; both need the same class folders")
    return train, val


def dataset_name(args) -> str:
    folders = None if args.dry_run else class_folders(args)
    return "imagenet" if folders is None or is_imagenet(folders) else Path(args.data_path).name


# ---- training loss, evaluation and MAC count ----------------------------------------------

def flyp_loss(model, images: torch.Tensor, labels: torch.Tensor):
    """FLYP: each image against a prompt of its class in a template drawn per sample (from the
    seeded global generator), symmetric InfoNCE over the batch at the model's temperature.
    Returns (loss, image-to-text logits, targets): train accuracy is in-batch retrieval."""
    draws = torch.rand(len(labels)).to(labels.device, non_blocking=True)
    logits = model(images, labels, draws).float()
    targets = torch.arange(len(labels), device=labels.device)
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.t(), targets)) / 2, logits, targets


def rebuild_classifier(module: nn.Module) -> None:
    module.rebuild_classifier()


def mac_parts(args) -> dict:
    """One image through the image encoder, one prompt (the full context) through the text encoder."""
    return {"image": lambda m: m.encode_image(torch.zeros(1, 3, image_size(args), image_size(args), device="meta")),
            "text": lambda m: m.encode_text(torch.zeros(1, m.prompts.shape[-1], dtype=torch.long, device="meta"))}


# ---- main --------------------------------------------------------------------------------

SCRIPT = tkp.Script(name="clip", build_model=build_model, build_data=build_data, build_plan=build_plan,
                    input_shape=lambda args: (3, image_size(args), image_size(args)), dataset_name=dataset_name,
                    pretrained=starts_pretrained, min_lr_ratio=0.01, topk_metrics=(1, 5), conv_net=False,
                    train_loss=flyp_loss, before_eval=rebuild_classifier, mac_parts=mac_parts)


def main(argv=None) -> dict:
    args = get_args_parser().parse_args(argv)
    if args.batch_val is None:
        args.batch_val = args.batch_train
    if args.qat:
        raise tkp.TKPError("--qat is not available for CLIP: its attention's packed in_proj_weight is not a "
                           "Linear that stage 3 could fake-quantize")
    if args.label_smooth:
        raise tkp.TKPError("--label-smooth does not apply: CLIP trains with its contrastive loss")
    if args.one_shot:
        args.epochs_stage1 = args.epochs_stage2 = 0
    if args.dry_run and "model" not in args.explicit_flags:
        # a check of the install in seconds: open_clip's smallest ViT, unless --model names one
        args.model = DRY_RUN_MODEL
    return tkp.run(args, SCRIPT)


if __name__ == "__main__":
    tkp.cli(main)
