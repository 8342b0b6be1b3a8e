"""clip_vit.py end to end on a tiny ImageFolder tree of PNGs with a tiny open_clip config (a
ViT of width 64 at 32 px with 8 px patches and a text transformer of width 64 over 16
tokens, 2 blocks each, CLIP's vocabulary; random init): exact N:M on every targeted weight of
both towers, MultiheadAttention's packed in_proj_weight included, after stage 2 and after a
resume; a strict reload into a fresh open_clip model; the zero-shot classifier's class order;
--one-shot; the MACs of both towers counted by hand; one-line errors."""

import json
import os
import subprocess
import sys

import open_clip
import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT
from test_vit import write_image_folder

import clip_vit
import tkp_common as tkp
from tkp_lib import runs
from tkp_lib.report import sparsity_report
from tkp_lib.runtime import plain
from tkp_lib.sparsity import compute_masks, group_ranks

TINY = {"embed_dim": 32,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}}
BLOCK_WEIGHTS = ("attn.in_proj_weight", "attn.out_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
VISION = [f"visual.transformer.resblocks.{i}.{w}" for i in range(2) for w in BLOCK_WEIGHTS]
TEXT = [f"transformer.resblocks.{i}.{w}" for i in range(2) for w in BLOCK_WEIGHTS]
NEVER_PRUNED = ("token_embedding.weight", "positional_embedding", "text_projection", "visual.conv1.weight",
                "visual.class_embedding", "visual.positional_embedding", "visual.proj")


class Crash(Exception):
    pass


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(config file, ImageFolder root): 4 classes n00000000..n00000003, 6 train / 2 val images each."""
    root = tmp_path_factory.mktemp("clip")
    config = root / "tiny_clip.json"
    config.write_text(json.dumps(TINY))
    return config, write_image_folder(root / "imagenet")


def flags(tiny, out, *extra, pretrained=("--no-pretrained",)):
    config, data = tiny
    return ["--model", str(config), *pretrained, "--data-path", str(data), "--output-dir", str(out),
            "--templates", "simple", "--epochs-stage1", "1", "--epochs-stage2", "2", "--batch-size", "8",
            "--num-workers", "0", "--progress-every", "0", *extra]


def parse(tiny, *extra):
    config, data = tiny
    return clip_vit.get_args_parser().parse_args(["--model", str(config), "--no-pretrained", "--data-path",
                                                  str(data), "--templates", "simple", *extra])


def assert_exact_2_4_in_both_towers(state, masks):
    assert sorted(masks) == sorted(VISION + TEXT)
    for name in VISION + TEXT:
        w, keep = state[name], masks[name]
        assert keep.reshape(-1, 4).sum(1).eq(2).all(), name
        assert w.reshape(-1, 4).count_nonzero(dim=1).max() <= 2, name
        assert (w[~keep] == 0).all(), name
    for name in NEVER_PRUNED:
        assert state[name].count_nonzero() > 0.99 * state[name].numel(), name


def test_2_4_in_both_towers_end_to_end_strict_reload_and_exact_resume(tiny, tmp_path, monkeypatch):
    straight = tmp_path / "straight"
    summary = clip_vit.main(flags(tiny, straight))
    final = torch.load(straight / "final.pt", weights_only=True)
    open_clip.CLIP(**TINY).load_state_dict(final["model"], strict=True)  # a plain open_clip model
    assert_exact_2_4_in_both_towers(final["model"], final["masks"])
    saved = json.loads((straight / "summary.json").read_text())
    assert saved["model"] == "clip" and saved["sparsity"] == "2:4" and saved["pruned_layers"] == 16
    assert saved["pruned_layer_density"] == 0.5 and saved["final_top5"] >= saved["final_top1"]
    assert set(saved["macs_parts"]) == {"image", "text"}
    assert saved["macs_dense"] == sum(p["macs_dense"] for p in saved["macs_parts"].values())
    log = [json.loads(line) for line in (straight / "log.jsonl").read_text().splitlines()]
    assert [(e["stage"], e["epoch"]) for e in log] == [(1, 1), (2, 1), (2, 2)] and log[0]["train_aux"] > 0

    # the same run, stopped right after stage 2's first epoch is saved, then `--resume` alone
    resumed, real, saves = tmp_path / "resumed", runs.save_atomic, []

    def save_then_crash(obj, path):
        real(obj, path)
        saves.append(path.name)
        if saves.count("checkpoint_last.pt") == 3:  # stage 1's epoch, post-mask, stage 2's first epoch
            raise Crash()

    monkeypatch.setattr(runs, "save_atomic", save_then_crash)
    with pytest.raises(Crash):
        clip_vit.main(flags(tiny, resumed))
    monkeypatch.setattr(runs, "save_atomic", real)
    clip_vit.main(["--resume", str(resumed / "checkpoint_last.pt")])
    again = torch.load(resumed / "final.pt", weights_only=True)
    assert_exact_2_4_in_both_towers(again["model"], again["masks"])
    assert all(torch.equal(v, again["model"][k]) for k, v in final["model"].items())  # bit-identical

    # --eval and load_trained rebuild it with this script
    evaluated = clip_vit.main(["--eval", str(straight / "final.pt"), "--data-path", str(tiny[1]), "--num-workers", "0"])
    assert evaluated["final_top1"] == pytest.approx(summary["final_top1"])
    assert evaluated["macs_parts"] == saved["macs_parts"]
    trained = tkp.load_trained(str(straight / "final.pt"))
    assert trained.script.name == "clip" and type(trained.model).__name__ == "ZeroShotCLIP"


def test_zero_shot_classifier_rows_follow_the_sorted_class_folders(tiny, tmp_path):
    names = ["tench", "goldfish", "great white shark", "tiger shark"]  # for n00000000 ... n00000003
    (tmp_path / "names.txt").write_text("\n".join(names) + "\n")
    args = parse(tiny, "--classnames", str(tmp_path / "names.txt"))
    model = clip_vit.build_model(args)
    model.rebuild_classifier()
    train, val = clip_vit.build_data(args)
    tokenizer = open_clip.SimpleTokenizer(context_length=TINY["text_cfg"]["context_length"])
    with torch.no_grad():
        for folder, label in train.class_to_idx.items():
            name = names[int(folder[1:])]
            prompts = tokenizer([t(name) for t in open_clip.SIMPLE_IMAGENET_TEMPLATES])
            text = F.normalize(model.encode_text(prompts), dim=-1)
            torch.testing.assert_close(model.classifier[label], F.normalize(text.mean(0), dim=0))
        image, label = val[5]
        logits = model(image[None])
        expected = model.logit_scale.exp() * F.normalize(model.encode_image(image[None]), dim=-1) @ model.classifier.t()
    torch.testing.assert_close(logits, expected)
    assert model.classnames == names and logits.shape == (1, 4)


def test_class_names_imagenet_folder_names_and_a_wrong_count(tmp_path):
    def names_of(folders, *extra):
        root = tmp_path / str(len(list(tmp_path.iterdir())))
        for f in folders:
            (root / "train" / f).mkdir(parents=True)
        return clip_vit.class_names(clip_vit.get_args_parser().parse_args(["--data-path", str(root), *extra]))

    wnids = [f"n{i:08d}" for i in range(1000)]
    assert names_of(wnids[::-1]) == list(open_clip.IMAGENET_CLASSNAMES)
    assert names_of(["golden_retriever", "abacus", "tabby_cat"]) == ["abacus", "golden retriever", "tabby cat"]
    (tmp_path / "two.txt").write_text("one\ntwo\n")
    with pytest.raises(tkp.TKPError, match="has 2 names and .* 3 class folders"):
        names_of(["a", "b", "c"], "--classnames", str(tmp_path / "two.txt"))


def test_one_shot_masks_the_starting_weights_and_trains_nothing(tiny, tmp_path):
    torch.manual_seed(3)
    start = open_clip.CLIP(**TINY).state_dict()
    torch.save(start, tmp_path / "start.pt")
    out = tmp_path / "one-shot"
    weights = ("--pretrained-path", str(tmp_path / "start.pt"))
    summary = clip_vit.main(flags(tiny, out, "--one-shot", pretrained=weights))
    assert summary["init_top1"] is not None and summary["stage1_top1"] == summary["init_top1"]
    assert summary["final_top1"] == summary["post_mask_top1"] is not None
    assert summary["epochs_stage1"] == summary["epochs_stage2"] == 0
    assert not (out / "log.jsonl").exists() or not (out / "log.jsonl").read_text().strip()
    final = torch.load(out / "final.pt", weights_only=True)
    assert_exact_2_4_in_both_towers(final["model"], final["masks"])
    for name in VISION + TEXT:  # the 2 largest |w| of every 4 of the starting weights, nothing trained
        keep = group_ranks(start[name].reshape(-1, 4).abs()) < 2
        assert torch.equal(final["masks"][name], keep.reshape(start[name].shape))
        assert torch.equal(final["model"][name], start[name] * keep.reshape(start[name].shape))
    assert torch.equal(final["model"]["token_embedding.weight"], start["token_embedding.weight"])


def test_one_shot_dry_run_trains_nothing_either(tiny, tmp_path):
    """--dry-run makes each stage one short epoch, but a stage of none (--one-shot) stays none."""
    summary = clip_vit.main(flags(tiny, tmp_path / "dry", "--one-shot", "--dry-run"))
    assert summary["epochs_stage1"] == summary["epochs_stage2"] == 0


def test_macs_of_both_towers_by_hand(tiny):
    args = parse(tiny)
    model = clip_vit.build_model(args)
    plan = clip_vit.build_plan(model, args)
    masks = compute_masks(model, plan)
    report = sparsity_report(model, plan, masks, clip_vit.SCRIPT.input_shape(args), torch.device("cpu"),
                                 parts=clip_vit.mac_parts(args))

    def tower(tokens: int, width: int, outside: int) -> tuple[int, int]:
        """(dense MACs, MACs of the pruned weights) of two blocks: in_proj (3 width), out_proj,
        c_fc (4 width), c_proj; attention's q@k and attn@v (heads * head_width = width)."""
        weights = tokens * width * (3 * width + width + 4 * width + 4 * width)
        return 2 * (weights + 2 * tokens * tokens * width) + outside, 2 * weights

    # image: 16 patches + the class token; the patch embedding (16 x 192 -> 64) and visual.proj
    image, image_pruned = tower(17, 64, 16 * 3 * 8 * 8 * 64 + 64 * 32)
    text, text_pruned = tower(16, 64, 64 * 32)  # the 16-token context; text_projection
    parts = report["macs_parts"]
    assert (parts["image"]["macs_dense"], parts["image"]["macs_nonzero"]) == (image, image - image_pruned // 2)
    assert (parts["text"]["macs_dense"], parts["text"]["macs_nonzero"]) == (text, text - text_pruned // 2)
    assert report["macs_dense"] == image + text and report["speedup_pruned_layers"] == pytest.approx(2.0)
    in_proj = {r["layer"]: r for r in report["layers"]}["visual.transformer.resblocks.0.attn.in_proj_weight"]
    assert (in_proj["part"], in_proj["macs_dense"], in_proj["macs_nonzero"]) == ("image", 17 * 64 * 192, 17 * 32 * 192)


def test_inference_latency_times_the_image_encoder(tiny, tmp_path):
    """benchmarks/inference_latency.py on CLIP: the timed forward is the image encoder, so its
    theoretical speed-up is the image part's and the text tower is listed as not run; the 2:4
    deployment (a stand-in converter on the CPU) leaves the Linears the forward does not call as
    modules dense (the text tower; MultiheadAttention's out_proj), and saves its per-layer
    decisions before the compiled timing."""
    from benchmarks import inference_latency as lat
    config, data = tiny
    model_flags = ["--model", str(config), "--no-pretrained", "--data-path", str(data), "--templates", "simple"]
    out = tmp_path / "lat.json"
    threads = torch.get_num_threads()
    lat.main(["--script", "clip", "--devices", "cpu", "--threads", "1", "--batch-sizes", "1", "--warmup", "0",
              "--repeats", "1", "--min-repeat-ms", "0", "--no-compile", "--json", str(out), "--", *model_flags])
    torch.set_num_threads(threads)
    saved = json.loads(out.read_text())
    assert saved["complete"] and [r["batch"] for r in saved["latency"]] == [1]
    args = parse(tiny)
    model = clip_vit.build_model(args)
    plan = clip_vit.build_plan(model, args)
    by_part = sparsity_report(model, plan, compute_masks(model, plan), clip_vit.SCRIPT.input_shape(args),
                              torch.device("cpu"), parts=clip_vit.mac_parts(args))["macs_parts"]
    theory, logits = saved["theoretical"], 4 * 32  # the image embedding against the 4 classes' embeddings
    assert theory["macs_dense"] == by_part["image"]["macs_dense"] + logits
    assert theory["macs_nonzero"] == by_part["image"]["macs_nonzero"] + logits
    assert theory["not_run"] == [n.removesuffix(".weight") for n in TEXT]

    bench = lat.build_fresh("clip", model_flags, seed=0)
    setup = lat.setup_device(bench, torch.device("cpu"), torch.float32, channels_last=False)
    calls = []
    with torch.inference_mode():
        result = lat.deploy_semi_structured(bench, setup, [1], lat.Timing(0, 1, 0.0), seed=0,
                                            convert=lambda w: w.clone(), margin=-1.0,
                                            progress=lambda part: calls.append(json.loads(json.dumps(plain(part)))))
    notes = {r["layer"]: r["note"] for r in result["layers"]}
    assert notes["visual.transformer.resblocks.0.attn.out_proj"] == "dense: not called as a module by the timed forward"
    assert notes["transformer.resblocks.1.mlp.c_fc"] == "dense: not called as a module by the timed forward"
    assert notes["visual.transformer.resblocks.1.mlp.c_proj"] == "sparse: faster"
    assert result["status"] == "done" and result["layers_sparse"] == 4 and result["model_matches"]
    assert calls[0]["layers"] == json.loads(json.dumps(plain(result["layers"]))) and calls[0]["model"] == []
    assert [m["batch"] for m in calls[-1]["model"]] == [1]


@pytest.mark.parametrize("targets,expected", [
    ("attn,mlp,vision,text", VISION + TEXT),
    ("mlp", [n for n in VISION + TEXT if ".mlp." in n]),
    ("attn,text", [n for n in TEXT if ".attn." in n]),
    ("vision", VISION),
])
def test_target_layers_pick_weights_and_towers(tiny, targets, expected):
    args = parse(tiny, "--target-layers", targets, "--sparsity-type", "1:4")
    plan = clip_vit.build_plan(clip_vit.build_model(args), args)
    assert [t.name for t in plan.targets] == sorted(expected, key=(VISION + TEXT).index)
    assert plan.pattern == "1:4" and {t.keep for t in plan.targets} == {1}


def test_dry_run_with_a_config_file(tiny):
    summary = clip_vit.main(["--model", str(tiny[0]), "--dry-run"])
    assert summary["sparsity"] == "2:4" and summary["pruned_layers"] == 16 and summary["final_top1"] is not None


def test_dry_run_without_a_model_is_a_tiny_clip_that_writes_megabytes(tmp_path):
    """--dry-run checks an install in seconds: without --model it builds a two-block CLIP of
    open_clip's classes with CLIP's tokenizer (ViT-S-32-alt, open_clip's smallest named model,
    wrote 750 MB of checkpoints and took 15 s past the imports)."""
    out = tmp_path / "run"
    summary = clip_vit.main(["--dry-run", "--output-dir", str(out)])
    assert summary["sparsity"] == "2:4" and summary["pruned_layers"] == 16 and summary["final_top1"] is not None
    assert sum(f.stat().st_size for f in out.iterdir()) < 100 * 2**20
    args = clip_vit.get_args_parser().parse_args(["--dry-run"])
    args.model = clip_vit.DRY_RUN_MODEL
    model = clip_vit.build_model(args)
    assert isinstance(model, open_clip.CLIP) and sum(p.numel() for p in model.parameters()) < 5_000_000
    assert model.visual.image_size == (64, 64) and model.context_length == 77


@pytest.mark.parametrize("extra,expected", [
    (["--qat"], "--qat is not available"),
    (["--model", "ViT-Nope-99"], "open_clip has no model 'ViT-Nope-99'"),
    (["--pretrained", "nope"], "open_clip has no weights 'nope' for ViT-B-16"),
    (["--pretrained-path", "/nowhere.pt"], "--pretrained-path /nowhere.pt does not exist"),
    (["--model", "TINY", "--pretrained", "openai"], "config file, which has no pretrained tags"),
    (["--model", "TINY", "--no-pretrained", "--data-path", "/nowhere"], "/nowhere/train does not exist"),
])
def test_bad_flags_are_one_line(tiny, tmp_path, extra, expected):
    argv = [str(tiny[0]) if v == "TINY" else v for v in extra]
    with pytest.raises(tkp.TKPError) as err:
        clip_vit.main([*argv, "--output-dir", str(tmp_path / "x")])
    assert expected in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("extra,expected", [(["--sparsity-type", "3:2"], "1 <= N < M"),
                                            (["--target-layers", "qkv"], "choose from attn,mlp,vision,text")])
def test_bad_flag_values_are_one_line(extra, expected):
    r = subprocess.run([sys.executable, str(ROOT / "clip_vit.py"), *extra], capture_output=True, text=True,
                       cwd=ROOT, timeout=120)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and expected in r.stderr


def test_failed_download_offline_is_one_line(tmp_path):
    # no network: huggingface_hub's offline mode (fails at once; a dead proxy alone retries for ~50 s)
    dead = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "http_proxy": "http://127.0.0.1:9",
            "https_proxy": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9",
            "HTTPS_PROXY": "http://127.0.0.1:9", "no_proxy": ""}
    r = subprocess.run([sys.executable, str(ROOT / "clip_vit.py"), "--output-dir", str(tmp_path / "x")],
                       capture_output=True, text=True, cwd=ROOT, timeout=300, env={**os.environ, **dead})
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "--pretrained-path" in r.stderr and "--no-pretrained" in r.stderr
    assert not (tmp_path / "x").exists()


def test_dry_run_defaults_to_the_small_model_unless_one_is_named(monkeypatch):
    seen = []
    monkeypatch.setattr(clip_vit.tkp, "run", lambda args, script: seen.append(args.model))
    clip_vit.main(["--dry-run"])
    clip_vit.main(["--dry-run", "--model", "ViT-B-16"])
    assert seen == [clip_vit.DRY_RUN_MODEL, "ViT-B-16"]


def test_other_scripts_are_found_without_open_clip():
    """A machine without open_clip (the GPU machine's torch, torchvision and timm alone) still
    finds a script by its Script name: clip_vit.py's ImportError is passed over (and not left
    half-imported), and named when no script matches."""
    code = ("import sys; sys.modules['open_clip'] = None; import tkp_common as tkp\n"
            "print(tkp.import_script('vit').SCRIPT.name, 'clip_vit' in sys.modules)\n"
            "try:\n    tkp.import_script('nope')\nexcept tkp.TKPError as e:\n    print(e)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    first, error = out.stdout.splitlines()[-2:]
    assert first == "vit False"
    assert "no model script 'nope'" in error and "not importable: clip_vit.py (" in error
