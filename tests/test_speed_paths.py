"""The speed paths give the updates of the plain loop: grouped and cached frozen-backbone
features (frozen_features.py), gradient checkpointing (vit_model.py), on the CPU."""

from __future__ import annotations

import argparse
import contextlib
import io
import re
from pathlib import Path

import pytest
import torch
from conftest import assert_same_training, epoch_checkpoints
from torch import nn

import train
from distributed import Distributed
from frozen_features import CachedTokens, backbone_randomness, plan_frozen_head
from vit_model import VisionTransformer, create_model


def run_train(data: Path, out: Path, *extra) -> tuple[int, str, str]:
    argv = ["--data-path", data, "--model-name", "vit_demo_patch8_64", "--weights", "",
            "--workers", "0", "--device", "cpu", "--batch-size", "8", "--lr", "0.05",
            "--output-dir", out / "weights", "--log-dir", out / "runs", *extra]
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = train.main([str(a) for a in argv])
    return code, stdout.getvalue(), stderr.getvalue()


# --------------------------------------------------------------------------- frozen backbone

def test_grouped_backbone_passes_give_the_per_batch_updates(demo_flowers, tmp_path):
    # 50 training images in batches of 8, grouped 3, 3 and 1 batches. Augmentation on: the
    # loader's random crops must come in the same order (workers 0: the main process's RNG).
    code, _, err = run_train(demo_flowers, tmp_path / "plain", "--epochs", "2",
                             "--freeze-layers", "--frozen-batch", "0")
    assert code == 0, err
    code, out, err = run_train(demo_flowers, tmp_path / "grouped", "--epochs", "2",
                               "--freeze-layers", "--frozen-batch", "24")
    assert code == 0, err
    assert "Frozen backbone: one forward pass per 24 images" in out
    assert_same_training(epoch_checkpoints(tmp_path / "plain", 2),
                         epoch_checkpoints(tmp_path / "grouped", 2))


def test_cached_training_features_give_the_uncached_updates(demo_flowers, tmp_path):
    code, _, err = run_train(demo_flowers, tmp_path / "plain", "--epochs", "2",
                             "--no-augment", "--frozen-batch", "0")
    assert code == 0, err
    code, out, err = run_train(demo_flowers, tmp_path / "cached", "--epochs", "2",
                               "--no-augment", "--cache-train-features")
    assert code == 0, err
    assert "50 class tokens" in out and "computed once" in out
    assert "not the report's random crops" in out  # the recipe change is said plainly
    assert_same_training(epoch_checkpoints(tmp_path / "plain", 2),
                         epoch_checkpoints(tmp_path / "cached", 2))


def test_nan_loss_is_caught_on_the_grouped_path(demo_flowers, tmp_path):
    code, out, err = run_train(demo_flowers, tmp_path, "--epochs", "1", "--lr", "1e30",
                               "--freeze-layers", "--frozen-batch", "24")
    assert "Frozen backbone" in out
    assert code == 1, err
    assert re.search(r"^error: .*epoch 0, step \d+", err, re.M), err


def test_frozen_batch_must_not_be_negative(demo_flowers, tmp_path):
    code, _, err = run_train(demo_flowers, tmp_path, "--frozen-batch", "-8")
    assert code == 2
    assert err.strip().splitlines() == ["error: --frozen-batch must be 0 or more, got -8."], err
    assert not (tmp_path / "weights").exists() and not (tmp_path / "runs").exists()


def args_for(*argv: str) -> argparse.Namespace:
    return train.get_args_parser().parse_args(["--batch-size", "8", *argv])


def frozen_demo(**overrides) -> VisionTransformer:
    model = create_model("vit_demo_patch8_64", num_classes=5, **overrides)
    train.freeze_backbone(model)
    return model


def plan(args, model, dist_info=None, cuda_graphs=False):
    notes = []
    chosen = plan_frozen_head(args, model, torch.device("cpu"), dist_info or Distributed(),
                              cuda_graphs, notes.append)
    return chosen, [n for n in notes if n.startswith("note:")]


def test_default_is_one_backbone_pass_per_batch():
    # Grouping measured no faster on a CPU (BENCHMARKS.md): asked for by --frozen-batch only.
    chosen, notes = plan(args_for(), frozen_demo())
    assert chosen is None and notes == []
    chosen, notes = plan(args_for("--frozen-batch", "24"), frozen_demo())
    assert chosen is not None and chosen.cache is None and chosen.group == 3 and notes == []


@pytest.mark.parametrize(("argv", "overrides", "why"), [
    (["--no-freeze-layers"], {}, "the backbone trains"),
    ([], {"drop_path_rate": 0.1}, "drops at random"),
    ([], {"drop_rate": 0.1}, "drops at random"),
    ([], {"attn_drop_rate": 0.1}, "drops at random"),
    (["--compile"], {}, "--compile"),
])
def test_frozen_paths_fall_back_with_one_note(argv, overrides, why):
    model = (create_model("vit_demo_patch8_64", num_classes=5, **overrides)
             if "--no-freeze-layers" in argv else frozen_demo(**overrides))
    chosen, notes = plan(args_for("--frozen-batch", "32", *argv), model)
    assert chosen is None and len(notes) == 1 and why in notes[0], notes
    chosen, notes = plan(args_for(*argv), model)  # not asked for: no note
    assert chosen is None and notes == []


def test_frozen_paths_fall_back_under_ddp_and_cuda_graphs():
    args = args_for("--frozen-batch", "32")
    chosen, notes = plan(args, frozen_demo(), Distributed(world_size=2))
    assert chosen is None and "DDP" in notes[0]
    chosen, notes = plan(args, frozen_demo(), cuda_graphs=True)
    assert chosen is None and "--no-cuda-graphs" in notes[0]


def test_a_note_names_only_the_paths_asked_for():
    # --frozen-batch 0 is the per-batch loop, not a path that was switched off.
    args = args_for("--frozen-batch", "0", "--cache-train-features", "--no-augment")
    chosen, notes = plan(args, frozen_demo(), cuda_graphs=True)
    assert chosen is None and len(notes) == 1, notes
    assert notes[0].startswith("note: --cache-train-features is off: CUDA graphs"), notes
    chosen, notes = plan(args_for("--frozen-batch", "32", "--cache-train-features"),
                         frozen_demo(), cuda_graphs=True)
    assert notes[0].startswith("note: --frozen-batch and --cache-train-features are off"), notes


def test_cache_needs_no_augment():
    chosen, notes = plan(args_for("--cache-train-features"), frozen_demo())
    assert chosen is None  # the per-batch loop, not cached
    assert len(notes) == 1 and "--no-augment" in notes[0]
    chosen, notes = plan(args_for("--cache-train-features", "--no-augment"), frozen_demo())
    assert chosen is not None and chosen.cache is not None and notes == []


def test_backbone_randomness_ignores_the_head():
    model = frozen_demo()
    assert backbone_randomness(model) is None
    model.head = nn.Sequential(nn.Dropout(0.5), nn.Linear(128, 5))  # a head may drop out
    assert backbone_randomness(model) is None


# --------------------------------------------------------------------------- checkpointing

def tiny_model(drop_path_rate: float = 0.2) -> VisionTransformer:
    torch.manual_seed(0)
    return VisionTransformer(img_size=16, patch_size=8, embed_dim=32, depth=3, num_heads=2,
                             num_classes=3, drop_path_rate=drop_path_rate)


def loss_and_grads(model: VisionTransformer
                   ) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
    """The loss, the gradients, and how many tensors the forward pass kept for backward."""
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(4, 3, 16, 16, generator=generator)
    labels = torch.randint(0, 3, (4,), generator=generator)
    model.train()
    model.zero_grad(set_to_none=True)
    kept = []
    torch.manual_seed(2)  # the same drop-path masks in both runs
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(1) or t, lambda t: t):
        loss = nn.functional.cross_entropy(model(images), labels)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}, len(kept)


def test_grad_checkpointing_gives_the_same_loss_and_gradients():
    model = tiny_model()
    loss, grads, kept = loss_and_grads(model)
    model.set_grad_checkpointing(True)
    checkpointed_loss, checkpointed_grads, checkpointed_kept = loss_and_grads(model)
    # Each block keeps only its input for the recomputation, not its activations.
    assert checkpointed_kept < kept / 3, (checkpointed_kept, kept)
    torch.testing.assert_close(checkpointed_loss, loss, rtol=0, atol=1e-6)
    assert grads.keys() == checkpointed_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(checkpointed_grads[name], grad, rtol=0, atol=1e-6, msg=name)
    assert not any("checkpoint" in key for key in model.state_dict())


@pytest.mark.parametrize("drop_path_rate", [0.0, 0.2])
def test_checkpointed_blocks_read_the_rng_state_only_where_they_drop_at_random(
        monkeypatch, drop_path_rate):
    # A CUDA graph capture (train.py's default on one GPU) forbids reading the GPU's RNG state;
    # the CPU's stands in for it here. Blocks that draw nothing must not read it, so that
    # --grad-checkpointing can be captured; drop-path's blocks must, to recompute their masks.
    reads = []
    read_state = torch.get_rng_state
    monkeypatch.setattr(torch, "get_rng_state", lambda: reads.append(1) or read_state())
    model = tiny_model(drop_path_rate)
    model.set_grad_checkpointing(True)
    nn.functional.cross_entropy(model.train()(torch.randn(4, 3, 16, 16)),
                                torch.tensor([0, 1, 2, 0])).backward()
    assert bool(reads) == (drop_path_rate > 0)


def test_train_py_grad_checkpointing_runs(demo_flowers, tmp_path):
    code, _, err = run_train(demo_flowers, tmp_path, "--epochs", "1", "--no-freeze-layers",
                             "--grad-checkpointing")
    assert code == 0, err
    assert (tmp_path / "weights" / "model-0.pth").is_file()


@pytest.mark.parametrize("freeze", ["--freeze-layers", "--no-freeze-layers"])
def test_grad_checkpointing_is_set_on_the_plain_model_before_it_is_wrapped(freeze):
    args = train.get_args_parser().parse_args(["--grad-checkpointing", freeze])
    model, notes = frozen_demo(), []
    setup = train.Setup(torch.device("cpu"), Distributed(), notes.append)
    wrappers = train.wrap_for_training(model, args, setup, train.StepSettings())
    assert wrappers.model is model and model.grad_checkpointing
    frozen = freeze == "--freeze-layers"
    assert any("--grad-checkpointing saves nothing" in note for note in notes) == frozen


# --------------------------------------------------------------------------- benchmark.py

def test_benchmark_cache_row_builds_the_three_frozen_no_augment_runs(tmp_path):
    import benchmark

    args = benchmark.get_args_parser().parse_args(
        ["--device", "cpu", "--no-model", "--e2e-cache", "--e2e-model", "vit_tiny_patch16_224",
         "--e2e-batch-sizes", "8,32", "--workers", "2"])
    benchmark.fill_defaults(args, torch.device("cpu"))
    assert benchmark.e2e_batch_sizes(args) == [8, 32]
    parsed = [train.get_args_parser().parse_args(
        benchmark.train_py_argv(args, torch.device("cpu"), tmp_path, tmp_path, True, extra))
        for extra in benchmark.CACHE_ROW_VARIANTS]
    for one in parsed:
        assert one.freeze_layers and not one.augment and one.amp is False
        assert one.model_name == "vit_tiny_patch16_224" and one.workers == 2
    assert [(p.frozen_batch, p.cache_train_features) for p in parsed] == [
        (0, False), (128, False), (0, True)]


def test_benchmark_variants_for_one_mode():
    import benchmark

    text = "--no-cuda-graphs; frozen:--no-cuda-graphs --frozen-batch 256;unfrozen:--compile"
    assert benchmark.e2e_variants(text, "frozen") == [
        ("--no-cuda-graphs",), ("--no-cuda-graphs", "--frozen-batch", "256")]
    assert benchmark.e2e_variants(text, "unfrozen") == [("--no-cuda-graphs",), ("--compile",)]
    assert benchmark.e2e_variants("--device cuda:0", "frozen") == [("--device", "cuda:0")]


def test_training_flops_come_from_flops_py():
    import benchmark
    from flops import build_on_meta, stage_table

    forward = stage_table(build_on_meta("vit_base_patch16_224", num_classes=5), (224, 224))[-1][2]
    assert 17.5e9 < forward < 17.6e9  # ViT-B/16's 17.56 G multiply-adds
    assert benchmark.training_flops_per_image("vit_base_patch16_224", False) == 6 * forward
    assert benchmark.training_flops_per_image("vit_base_patch16_224", True) == 2 * forward


def test_benchmark_backbone_batches_section(tmp_path):
    import json

    import benchmark

    out = tmp_path / "bench.json"
    with contextlib.redirect_stdout(io.StringIO()):
        status = benchmark.main(["--device", "cpu", "--no-model", "--model-name",
                                 "vit_demo_patch8_64", "--backbone-batches", "2,4",
                                 "--backbone-images", "4", "--memory", "--json", str(out)])
    results = json.loads(out.read_text())
    assert status == 0
    assert [(r["batch"], r["images"]) for r in results["backbone_batches"]] == [(2, 4), (4, 4)]
    assert all(r["img_s"] > 0 and r["img_per_cpu_s"] > 0 for r in results["backbone_batches"])
    assert results["memory"] == [] and any("needs CUDA" in n for n in results["notes"])


@pytest.mark.parametrize("free_mib, kept_on", [(118, "cuda"), (117, "cpu")])
def test_cached_training_features_stay_on_the_gpu_only_where_they_fit(monkeypatch, free_mib,
                                                                     kept_on):
    # Decided before the backbone pass from the tokens' size, so no GPU is needed to check
    # it: 10,000 class tokens of ViT-B/16 (768 floats) take 29.3 MiB, which is within a
    # quarter of 118 MiB free (29.5) and not of 117 (29.25).
    monkeypatch.setattr(torch.cuda, "mem_get_info",
                        lambda device=None: (free_mib * 2**20, 80 * 2**30))
    notes = []
    with torch.device("meta"):  # only its width is read
        model = create_model("vit_base_patch16_224")
    cache = CachedTokens(model, 128, torch.device("cuda"), notes.append)
    assert cache._place(10_000).type == kept_on
    where = "on cuda" if kept_on == "cuda" else "in host memory"
    assert notes == [f"Training features: 10000 class tokens (29.3 MiB) computed once and "
                     f"kept {where}."]
