"""Models users bring, adapted as README "Adapt TKP to your model" says (tests/user_models/: a
MobileNetV2-style net with 3x3 depthwise convs and BatchNorm, a tiny ConvNeXt with 7x7
depthwise convs, LayerNorm and layer scale): dry runs, short real runs with --beta auto,
resume, --eval and load_trained; --beta auto's edge cases and its value on every rank; tap
groups on depthwise convs end to end."""

import functools
import json
import textwrap

import pytest
import torch
import torch.nn as nn
from conftest import ROOT, write_cifar

import tkp_common as tkp
from tkp_lib import runs
from tkp_lib.sparsity import Masker, compute_masks, group_ranks, topk_plan

USER = ROOT / "tests" / "user_models"
MODELS = {"mobilenetv2": USER / "mobilenetv2_cifar.py", "convnext": USER / "convnext_cifar.py"}
FAST = ["--epochs-stage1", "2", "--epochs-stage2", "1", "--batch-train", "16", "--batch-val", "16",
        "--num-workers", "0", "--bn-recal-batches", "2", "--progress-every", "0"]


@pytest.fixture(autouse=True)
def one_thread():
    """One thread: at these batch sizes more only wait on each other (badly so on shared cores)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@functools.cache
def user_script(name):
    return tkp.import_script(str(MODELS[name]))


def check_exact_topk(state: dict, masks: dict, model: nn.Module, k: int) -> None:
    """Every Conv2d with more than K taps is masked, every kernel keeps at most K non-zeros."""
    convs = {f"{n}.weight": m for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    pruned = {n for n, m in convs.items() if m.kernel_size[0] * m.kernel_size[1] > k}
    assert set(masks) == pruned and any(convs[n].groups > 1 for n in pruned)  # depthwise included
    for name in pruned:
        taps = convs[name].kernel_size[0] * convs[name].kernel_size[1]
        assert (state[name][~masks[name]] == 0).all(), name
        assert state[name].reshape(-1, taps).count_nonzero(1).max() <= k, name


@pytest.mark.parametrize("name", list(MODELS))
def test_dry_run(name, tmp_path):
    s = user_script(name).main(["--dry-run", "--output-dir", str(tmp_path / "dry")])
    assert s["model"] == f"{name}_cifar" and s["sparsity"] == "top-1" and s["speedup_theoretical"] > 1
    final = torch.load(tmp_path / "dry" / "final.pt", weights_only=True)
    model = user_script(name).build_model(user_script(name).get_args_parser().parse_args([]))
    model.load_state_dict(final["model"], strict=True)
    check_exact_topk(final["model"], final["masks"], model, 1)


class Crash(Exception):
    pass


@pytest.mark.parametrize("name,ratio", [("mobilenetv2", None), ("convnext", "2")])
def test_short_run_beta_auto_resume_eval_and_load_trained(name, ratio, tmp_path, monkeypatch, capsys):
    """--beta auto chooses the beta that starts stage 1 at the target ratio, records it, and a
    run that crashed after its first epoch resumes (with --beta auto given again) to the same
    weights as an uninterrupted one; --eval and load_trained rebuild the user's model."""
    script = user_script(name)
    data = write_cifar(tmp_path / "data", "cifar10", n_train=64, n_test=32, learnable=True)
    flags = ["--data-root", str(data), *FAST, "--topk", "2", "--beta", "auto",
             *(["--beta-ratio", ratio] if ratio else [])]
    target = float(ratio or 5)
    straight = script.main([*flags, "--output-dir", str(tmp_path / "a")])
    printed = capsys.readouterr().out

    info = json.loads((tmp_path / "a" / "args.json").read_text())["args"]
    auto = info["beta_auto"]
    assert auto["ratio"] == target and auto["ce"] > 0 and auto["l_aux"] > 0
    assert info["beta"] == straight["beta"] == target * auto["ce"] / auto["l_aux"]
    assert straight["beta_auto"] == auto
    assert f"--beta auto: beta {info['beta']:.6g} = {target:g} x cross-entropy" in printed
    start = straight["aux_start"]
    assert start["beta_aux"] / start["ce"] == pytest.approx(target, rel=1e-9)
    line = next(x for x in printed.splitlines() if x.startswith("stage 1 starts at"))
    assert f"(ratio {target:.2g};" in line

    real_save = runs.save_atomic

    def crash_after_first(obj, path):
        real_save(obj, path)
        raise Crash()

    monkeypatch.setattr(runs, "save_atomic", crash_after_first)
    with pytest.raises(Crash):
        script.main([*flags, "--output-dir", str(tmp_path / "b")])
    monkeypatch.setattr(runs, "save_atomic", real_save)
    capsys.readouterr()
    resumed = script.main([*flags, "--resume", str(tmp_path / "b" / "checkpoint_last.pt")])
    assert "--beta auto" not in capsys.readouterr().out  # never measured again
    assert resumed["beta"] == straight["beta"] and resumed["beta_auto"] == auto
    a = torch.load(tmp_path / "a" / "final.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "final.pt", weights_only=True)
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert resumed["final_top1"] == straight["final_top1"]

    evaluated = script.main(["--eval", str(tmp_path / "a" / "final.pt"), "--data-root", str(data),
                             "--num-workers", "0", "--batch-val", "16"])
    assert evaluated["final_top1"] == pytest.approx(straight["final_top1"])
    trained = tkp.load_trained(str(tmp_path / "a" / "final.pt"), script=str(MODELS[name]))
    assert trained.script.name == f"{name}_cifar" and trained.args.beta == straight["beta"]
    check_exact_topk(trained.model.state_dict(), trained.masks, trained.model, 2)


def test_beta_auto_picks_only_the_number(tmp_path):
    """A run with --beta auto equals a run given the beta it chose."""
    script = user_script("mobilenetv2")
    data = write_cifar(tmp_path / "data", "cifar10", n_train=32, n_test=16, learnable=True)
    flags = ["--data-root", str(data), *FAST, "--epochs-stage1", "1", "--epochs-stage2", "0"]
    auto = script.main([*flags, "--beta", "auto", "--output-dir", str(tmp_path / "auto")])
    given = script.main([*flags, "--beta", str(auto["beta"]), "--output-dir", str(tmp_path / "given")])
    assert given["beta"] == auto["beta"] and given["beta_auto"] is None
    a = torch.load(tmp_path / "auto" / "final.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "given" / "final.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_beta_auto_where_there_is_nothing_to_weigh(cifar10_root, tmp_path, capsys):
    script = user_script("mobilenetv2")
    flags = ["--data-root", str(cifar10_root), *FAST, "--epochs-stage1", "1", "--epochs-stage2", "0",
             "--beta", "auto"]
    cases = {"there is no stage 1": ["--epochs-stage1", "0"], "--reg-type is none": ["--reg-type", "none"],
             "no layer is pruned": ["--dense-baseline"]}
    for i, (why, extra) in enumerate(cases.items()):
        s = script.main([*flags, *extra, "--output-dir", str(tmp_path / str(i))])
        assert s["beta"] == 0.0 and s["beta_auto"]["note"] == why
        assert f"--beta auto: {why}" in capsys.readouterr().out
    # starting weights that already keep at most K taps per kernel: L_aux is 0, and so is beta
    model = script.MobileNetV2(10)
    plan = topk_plan(model, 1)
    Masker(model, compute_masks(model, plan)).apply_()
    torch.save(model.state_dict(), tmp_path / "masked.pt")
    s = script.main([*flags, "--pretrain-path", str(tmp_path / "masked.pt"), "--output-dir", str(tmp_path / "z")])
    assert s["beta"] == 0.0 and s["beta_auto"]["l_aux"] == 0.0 and s["aux_start"]["beta_aux"] == 0.0
    assert "--beta auto: L_aux is already 0" in capsys.readouterr().out
    # a run made with a number resumes with that number, not with --beta auto
    script.main([*flags[:-2], "--beta", "0", "--output-dir", str(tmp_path / "n")])
    with pytest.raises(tkp.TKPError, match=r"--beta 0.0 \(now 'auto'\)"):
        script.main([*flags, "--resume", str(tmp_path / "n" / "checkpoint_last.pt")])


@pytest.mark.parametrize("module", ["vgg8_optimized", "vit_small", "clip_vit"])
def test_beta_flag_takes_a_number_or_auto_and_defaults_stay(module):
    parser = __import__(module).get_args_parser()
    default = {"vgg8_optimized": 3000.0, "vit_small": 1000.0, "clip_vit": 1000.0}[module]
    args = parser.parse_args([])
    assert (args.beta, args.beta_ratio, args.beta_auto) == (default, 5.0, None)
    assert parser.parse_args(["--beta", "auto"]).beta == "auto"
    assert parser.parse_args(["--beta", "AUTO"]).beta == "auto"
    assert parser.parse_args(["--beta", "1e4"]).beta == 10000.0
    for bad in ("-1", "inf", "nan", "automatic"):
        with pytest.raises(SystemExit):
            parser.parse_args(["--beta", bad])


def test_beta_ratio_without_beta_auto_is_one_line(tmp_path):
    with pytest.raises(tkp.TKPError, match="--beta-ratio is the target of --beta auto"):
        user_script("convnext").main(["--dry-run", "--beta-ratio", "3", "--output-dir", str(tmp_path / "x")])


def test_tap_groups_skip_depthwise_convs_end_to_end(tmp_path, capsys):
    script = user_script("mobilenetv2")
    s = script.main(["--dry-run", "--tap-group", "8", "--output-dir", str(tmp_path / "g")])
    printed = capsys.readouterr().out
    info = json.loads((tmp_path / "g" / "args.json").read_text())
    final = torch.load(tmp_path / "g" / "final.pt", weights_only=True)
    model = script.MobileNetV2(10)
    depthwise = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.groups > 1]
    assert info["tap_group_per_kernel"] == depthwise and len(depthwise) == 8
    assert printed.count("tap groups do not apply to depthwise convs") == 1
    assert f"{len(depthwise)} layers keep per-kernel Top-K" in printed and s["sparsity"] == "top-1-g8"
    for name in depthwise:  # each channel's own tap: the paper's mask, not one shared by 8 channels
        w, mask = final["model"][f"{name}.weight"], final["masks"][f"{name}.weight"]
        assert torch.equal(mask.reshape(-1, 9), group_ranks(w.reshape(-1, 9).abs()) < 1)
    stem = final["masks"]["features.0.0.weight"]  # a dense 3x3 conv: groups of 8 outputs share
    assert (stem[:8] == stem[:1]).all() and (stem[8:] == stem[8:9]).all()


def test_two_processes_use_rank_0s_beta(tmp_path):
    """Each rank measures its own validation batch; all train with rank 0's beta."""
    from test_distributed import torchrun
    data = write_cifar(tmp_path / "data", "cifar10", n_train=32, n_test=16, learnable=True)
    wrapper = tmp_path / "record_beta.py"
    wrapper.write_text(textwrap.dedent(f"""
        import json, sys
        import tkp_common as tkp
        sys.path.insert(0, {str(USER)!r})
        import mobilenetv2_cifar as script
        real_measure, real_choose, seen = tkp._measure_start, tkp.choose_beta, {{}}
        def measure(r, regularizer):
            seen["l_aux"], seen["ce"] = real_measure(r, regularizer)
            return seen["l_aux"], seen["ce"]
        def choose(r, regularizer):  # each rank writes what it measured and the beta it uses
            real_choose(r, regularizer)
            with open(f"{tmp_path}/rank{{r.dist.rank}}.json", "w") as fh:
                json.dump({{**seen, "beta": r.args.beta}}, fh)
        tkp._measure_start, tkp.choose_beta = measure, choose
        tkp.cli(script.main)
    """))
    r = torchrun(wrapper, "--device", "cpu", "--data-root", str(data), "--output-dir", str(tmp_path / "run"),
                 "--epochs-stage1", "1", "--epochs-stage2", "0", "--batch-train", "8", "--batch-val", "4",
                 "--num-workers", "0", "--bn-recal-batches", "1", "--progress-every", "0", "--beta", "auto")
    assert r.returncode == 0, r.stderr[-3000:]
    rank0, rank1 = (json.loads((tmp_path / f"rank{i}.json").read_text()) for i in (0, 1))
    assert rank0["ce"] != rank1["ce"]  # different validation shards: different cross-entropies
    assert rank0["beta"] == rank1["beta"] == 5 * rank0["ce"] / rank0["l_aux"]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["beta"] == rank0["beta"] and summary["beta_auto"]["ce"] == rank0["ce"]
