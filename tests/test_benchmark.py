"""benchmark.py end to end on the CPU with tiny models; speeds are printed, never asserted."""

from __future__ import annotations

import argparse
import hashlib
import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT

import benchmark
import train

pytest.importorskip("timm")  # the peers are what the benchmark compares against


def test_standin_is_flower_shaped_and_deterministic(tmp_path):
    root = benchmark.make_standin(tmp_path / "a", scale=0.01, workers=2)
    counts = {d.name: len(list(d.glob("*.jpg"))) for d in sorted(root.iterdir())}
    assert counts == benchmark.standin_counts(0.01) == {
        "daisy": 6, "dandelion": 9, "roses": 6, "sunflowers": 7, "tulips": 8}
    files = sorted(root.glob("*/*.jpg"))
    from PIL import Image

    with Image.open(files[0]) as img:
        assert img.size == (500, 375) and img.format == "JPEG"
    mean_kib = sum(p.stat().st_size for p in files) / len(files) / 1024
    assert 16 < mean_kib < 34  # flower_photos averages about 24 KiB
    again = benchmark.make_standin(tmp_path / "b", scale=0.01, workers=1)
    digest = lambda folder: hashlib.sha256(b"".join(  # noqa: E731
        p.read_bytes() for p in sorted(folder.glob("*/*.jpg")))).hexdigest()
    assert digest(root) == digest(again)


def test_format_table_aligns_columns():
    text = benchmark.format_table(["name", "img/s"], [["ours", 1234.5], ["timm", 2.0], ["x", None]])
    lines = text.splitlines()
    assert lines[0].startswith("name") and set(lines[1]) <= {"-", " "}
    assert lines[2].endswith("1,234.5") and lines[3].endswith("2.000") and lines[4].endswith("-")
    assert len({len(line) for line in lines[1:]}) == 1  # numbers end in one column


def test_train_py_argv_parses_as_asked(tmp_path):
    args = benchmark.get_args_parser().parse_args(
        ["--device", "cpu", "--e2e-model", "vit_demo_patch8_64", "--e2e-compile"])
    benchmark.fill_defaults(args, torch.device("cpu"))
    argv = benchmark.train_py_argv(args, torch.device("cpu"), tmp_path, tmp_path, True)
    assert "--freeze-layers" in argv and "--no-freeze-layers" not in argv
    parsed = train.get_args_parser().parse_args(argv)
    assert isinstance(parsed, argparse.Namespace)
    assert parsed.compile and parsed.device_data and parsed.amp is False and parsed.keep == 1


def test_the_compiled_variant_runs_train_py_with_compile_and_cuda_graphs(tmp_path):
    # BENCHMARKS.md's issue-10 command measures "unfrozen:--compile" beside the plain row
    # (CUDA graphs only): both must leave the graphs on for one CUDA process.
    from cuda_graphs import use_cuda_graphs
    from distributed import Distributed

    args = benchmark.get_args_parser().parse_args(
        ["--device", "cuda", "--e2e-variants=frozen:--no-cuda-graphs;unfrozen:--compile"])
    benchmark.fill_defaults(args, torch.device("cuda"))
    variants = benchmark.e2e_variants(args.e2e_variants, "unfrozen")
    assert variants == [("--compile",)]
    for extra, compiled in (((), False), (variants[0], True)):
        argv = benchmark.train_py_argv(args, torch.device("cuda"), tmp_path, tmp_path, False,
                                       extra)
        parsed = train.get_args_parser().parse_args(argv)
        assert parsed.compile is compiled and not parsed.freeze_layers
        assert use_cuda_graphs(parsed.cuda_graphs, torch.device("cuda"),
                               Distributed(world_size=1), print)


def test_benchmark_runs_every_section(tmp_path, capsys):
    out = tmp_path / "bench.json"
    status = benchmark.main([
        "--device", "cpu", "--model-name", "vit_demo_patch8_64", "--batch-size", "2",
        "--infer-batch-size", "2", "--steps", "1", "--warmup", "1",
        "--data", "--img-size", "64", "--workers", "0",
        "--e2e", "--e2e-scale", "0.01", "--e2e-epochs", "1", "--e2e-model", "vit_demo_patch8_64",
        "--e2e-projection", "--e2e-variants=--no-cuda-graphs", "--e2e-cache",
        "--backbone-batches", "2,4", "--backbone-images", "4",
        "--standin", str(tmp_path / "standin"), "--json", str(out)])
    printed = capsys.readouterr().out
    assert status == 0, printed
    for heading in ("Model (vit_demo_patch8_64", "Data (64 px", "End to end (vit_demo_patch8_64",
                    "train / timm", "DeviceTrainLoader epoch", "speed-up", "Frozen backbone",
                    "Frozen, --no-augment (vit_demo_patch8_64"):
        assert heading in printed

    results = json.loads(out.read_text())
    assert results["header"]["torch"] == torch.__version__
    assert results["header"]["command"].startswith("python benchmark.py --device cpu")
    assert results["standin"]["images"] == 36
    assert {r["model"] for r in results["model"]} == {"ours", "timm", "torchvision"}
    for row in results["model"]:
        assert row["train_img_s"] > 0 and row["infer_img_s"] > 0
    timm_row = next(r for r in results["model"] if r["model"] == "timm")
    assert timm_row["train_vs_timm"] == pytest.approx(1.0)
    assert [r["pipeline"] for r in results["data"]] == [
        "MyDataSet + DataLoader", "ImageFolder + DataLoader", "DeviceTrainLoader decode",
        "DeviceTrainLoader epoch"]
    for row in results["data"]:
        assert row["images"] == 31 and row["img_s"] > 0  # 36 less 1 per class to validate
    assert [(r["mode"], r["pipeline"].split(":")[0]) for r in results["e2e"]] == [
        (mode, name) for mode in ("frozen", "unfrozen")
        for name in ("reference", "train.py", "train.py --no-cuda-graphs",
                     "device_data loaders + ours (loop here)")]
    for row in results["e2e"]:
        assert row["ok"] and row["seconds"] > 0 and row["speedup_vs_reference"] > 0
        assert 0.0 <= row["val_acc"] <= 1.0
        # train.py rows also give the training phase's speed, from the last checkpoint
        assert ((row["train_img_s"] or 0) > 0) == row["pipeline"].startswith("train.py")
    assert [r["batch"] for r in results["backbone_batches"]] == [2, 4]
    assert all(r["images"] == 4 and r["img_s"] > 0 for r in results["backbone_batches"])
    # The cache row: its three frozen runs, timed against the first (per batch).
    assert [r["pipeline"] for r in results["cache"]] == [
        " ".join(("train.py", *flags)) for flags in benchmark.CACHE_ROW_VARIANTS]
    assert results["cache"][0]["speedup_vs_reference"] == 1.0
    assert all(r["ok"] and r["mode"] == "frozen" for r in results["cache"])
    log = Path(str(out.with_suffix(".train.log"))).read_text()
    assert log.count("$ python train.py") == 7 and "--no-freeze-layers" in log
    assert log.count("--keep 1 --no-cuda-graphs") == 2
    # Grouping and the cache ran, not the per-batch loop with a note.
    assert "Frozen backbone: one forward pass per" in log and "Training features:" in log
    assert "--frozen-batch is off" not in log and "--cache-train-features is off" not in log


def planned_labels(argv: list[str], tmp_path: Path) -> list[str]:
    args = benchmark.get_args_parser().parse_args(["--device", "cpu", *argv])
    benchmark.fill_defaults(args, torch.device("cpu"))
    plan = benchmark.e2e_plan(args, torch.device("cpu"), None, tmp_path, tmp_path / "log",
                              [], have_timm=True)
    return [run.label for run in plan]


def test_the_issues_target_rows_run_before_the_variants_and_the_projection(tmp_path):
    labels = planned_labels(["--e2e-batch-sizes", "8,32", "--e2e-projection",
                             "--e2e-variants=frozen:--frozen-batch 256;unfrozen:--compile"],
                            tmp_path)
    targets = [f"{mode}, batch {batch}: {pipeline}" for batch in (8, 32)
               for mode in ("frozen", "unfrozen")
               for pipeline in ("reference: ImageFolder + timm", "train.py")]
    assert labels == targets + [
        "frozen, batch 8: train.py --frozen-batch 256", "unfrozen, batch 8: train.py --compile",
        "frozen, batch 32: train.py --frozen-batch 256", "unfrozen, batch 32: train.py --compile",
        *(f"{mode}, batch {batch}: device_data loaders + ours (loop here)"
          for batch in (8, 32) for mode in ("frozen", "unfrozen"))]


TINY_E2E = ["--device", "cpu", "--no-model", "--workers", "0", "--e2e", "--e2e-scale", "0.01",
            "--e2e-epochs", "1", "--e2e-model", "vit_demo_patch8_64", "--e2e-modes", "frozen"]


def test_a_spent_time_budget_starts_no_run_and_names_each_one(tmp_path, capsys):
    out = tmp_path / "bench.json"
    status = benchmark.main([*TINY_E2E, "--e2e-cache", "--time-budget", "0",
                             "--standin", str(tmp_path / "standin"), "--json", str(out)])
    printed = capsys.readouterr().out
    assert status == 0, printed
    results = json.loads(out.read_text())
    assert results["e2e"] == results["cache"] == []
    assert results["not_started"] == [
        "frozen, batch 32: reference: ImageFolder + timm", "frozen, batch 32: train.py",
        *(f"frozen, batch 32: train.py {' '.join(flags)}"
          for flags in benchmark.CACHE_ROW_VARIANTS)]
    assert "--time-budget 0 s ran out before 5 runs" in printed
    assert not (tmp_path / "bench.train.log").read_text()  # train.py never ran


@pytest.mark.parametrize("train_py_says", ["KeyboardInterrupt", "exit status 130"])
def test_an_interrupted_benchmark_keeps_the_runs_it_finished(tmp_path, monkeypatch, capsys,
                                                             train_py_says):
    # Ctrl-C during the second run (train.py's): train.main answers it with status 130, or it
    # lands in the benchmark's own lines around the call.
    def interrupted(argv):
        if train_py_says == "KeyboardInterrupt":
            raise KeyboardInterrupt
        return 130

    monkeypatch.setattr(train, "main", interrupted)
    out = tmp_path / "bench.json"
    status = benchmark.main([*TINY_E2E, "--standin", str(tmp_path / "standin"),
                             "--json", str(out)])
    assert status == 130, capsys.readouterr()
    rows = json.loads(out.read_text())["e2e"]
    assert [(r["pipeline"], r["ok"]) for r in rows] == [("reference: ImageFolder + timm", True)]
    assert rows[0]["seconds"] > 0 and 0 <= rows[0]["val_acc"] <= 1


@pytest.mark.parametrize("flags, message", [
    (["--steps", "0"], "--steps must be at least 1, got 0."),
    (["--e2e-batch-sizes", "8,0"], "--e2e-batch-sizes must be batch sizes of at least 1"),
    (["--backbone-batches", "two"], "--backbone-batches must be batch sizes of at least 1"),
    (["--e2e-modes", "frozen,fine-tuned"], "--e2e-modes must name some of frozen, unfrozen"),
    (["--models", "ours,deit"], "--models must name some of ours, timm, torchvision"),
    (["--e2e-scale", "-1"], "--e2e-scale must be a positive fraction"),
    (["--time-budget", "inf"], "--time-budget must be a number of 0 or more"),
    (["--device", "tpu"], "--device tpu is not a device; pass cuda, cuda:N or cpu."),
])
def test_out_of_range_flags_stop_before_anything_is_written(tmp_path, capsys, flags, message):
    out = tmp_path / "out" / "bench.json"
    status = benchmark.main(["--device", "cpu", "--e2e", "--standin", str(tmp_path / "standin"),
                             "--json", str(out), *flags])
    err = capsys.readouterr().err
    assert status == 2 and err.startswith(f"error: {message}") and err.count("\n") == 1
    assert not (tmp_path / "out").exists() and not (tmp_path / "standin").exists()


@pytest.mark.parametrize(("gpu_name", "peak"), [
    ("NVIDIA H200", 989.4e12), ("NVIDIA H100 80GB HBM3", 989.4e12),
    ("NVIDIA A100-SXM4-80GB", 312e12),
    # Other cards of the same names run lower clocks: no MFU without --peak-tflops.
    ("NVIDIA H200 NVL", None), ("NVIDIA H100 PCIe", None), ("NVIDIA A100-PCIE-40GB", None),
    ("NVIDIA L4", None)])
def test_mfu_uses_a_known_peak_only_for_the_card_it_was_measured_on(gpu_name, peak):
    assert benchmark.known_bf16_peak(gpu_name) == peak


def test_a_benchmark_ended_by_timeout_removes_its_temporary_stand_in(tmp_path):
    # `timeout` sends SIGTERM: the temporary stand-in (94 MB at full scale) must not stay.
    process = subprocess.Popen(
        [sys.executable, "benchmark.py", *TINY_E2E, "--e2e-epochs", "50",
         "--json", str(tmp_path / "bench.json")],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for line in process.stdout:
            if line.startswith("Stand-in:"):
                standin = Path(line.split(" in ")[1].split(",")[0])
                break
        assert standin.is_dir()
        for line in process.stdout:
            if "frozen, batch 32: train.py ..." in line:  # inside a whole run
                break
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 128 + signal.SIGTERM
    finally:
        process.kill()
    assert not standin.exists()
    assert [r["pipeline"] for r in json.loads((tmp_path / "bench.json").read_text())["e2e"]] \
        == ["reference: ImageFolder + timm"]  # the run that ended is kept
