"""export.py: TorchScript (always) and ONNX (when the optional packages are installed)."""

from __future__ import annotations

import importlib.util
import json
import re
import warnings
from pathlib import Path

import pytest
import torch
from conftest import one_error_line, run_cli
from write_faults import assert_only, files_limited_to, run_with_files_limited_to

import export
from predict import load_classifier


@pytest.fixture(scope="module")
def checkpoint(trained_demo) -> Path:
    """The session's demo run's best.pth (conftest)."""
    return trained_demo.best


def test_torchscript_export_matches_pytorch(checkpoint, tmp_path, capsys):
    output = tmp_path / "vit.pt"
    rc = export.main(["--weights", str(checkpoint), "--format", "torchscript",
                      "--output", str(output)])
    out = capsys.readouterr().out
    assert rc == 0
    diff = float(out.split("max abs diff ")[1].split()[0])
    assert diff <= 1e-3

    # What a user does: load the file alone and read the classes from it.
    extra = {"config.json": ""}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        loaded = torch.jit.load(str(output), _extra_files=extra)
    config = json.loads(extra["config.json"])
    model, class_names = load_classifier(checkpoint)
    assert config["class_names"] == class_names and config["img_size"] == 64
    batch = torch.randn(5, 3, 64, 64)  # traced with 2 images; the batch size stays free
    with torch.no_grad():
        torch.testing.assert_close(loaded(batch), model(batch), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(loaded(batch), loaded(-batch))  # not a constant output


def test_parity_check_sees_a_different_model(checkpoint):
    model, _ = load_classifier(checkpoint)
    other, _ = load_classifier(checkpoint)
    with torch.no_grad():
        other.head.bias[2] += 0.25
    batch = torch.randn(3, 3, 64, 64)
    assert export.check_parity(model, model, batch) == 0.0
    assert export.check_parity(model, other, batch) == pytest.approx(0.25, abs=1e-5)


def test_an_export_that_does_not_compute_the_model_fails_with_status_1(checkpoint, tmp_path,
                                                                      capsys):
    # A NaN in the weights makes every logit NaN in both models, and NaN is never within
    # the tolerance: the command must say so rather than pass the file as checked.
    broken = torch.load(checkpoint, weights_only=True)
    broken["model"]["head.bias"][0] = float("nan")
    weights = tmp_path / "broken.pth"
    torch.save(broken, weights)
    output = tmp_path / "vit.pt"
    rc = export.main(["--weights", str(weights), "--output", str(output)])
    captured = capsys.readouterr()
    assert rc == 1 and "max abs diff nan" in captured.out
    assert captured.err.startswith("error: the export differs") and str(output) in captured.err
    assert len(captured.err.strip().splitlines()) == 1


def test_onnx_without_its_packages_exits_2(checkpoint, tmp_path, capsys, monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "onnxruntime" else real_find_spec(name))
    rc = export.main(["--weights", str(checkpoint), "--format", "onnx",
                      "--output", str(tmp_path / "vit.onnx")])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("error: ONNX export needs the optional packages onnxruntime")
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "vit.onnx").exists()


def test_onnx_export_matches_pytorch(checkpoint, tmp_path, capsys):
    # onnx, onnxscript and onnxruntime are optional extras; TorchScript above always runs.
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    onnx = pytest.importorskip("onnx")
    output = tmp_path / "vit.onnx"
    # One export (each costs seconds), checked at a tolerance of zero: stricter than float
    # rounding across runtimes allows, so it may fail, which must then be said.
    rc = export.main(["--weights", str(checkpoint), "--format", "onnx", "--output", str(output),
                      "--check-batch", "4", "--tolerance", "0"])
    captured = capsys.readouterr()
    diff = float(re.search(r"parity: max abs diff (\S+) on a random batch of 4", captured.out)[1])
    assert diff <= 1e-3  # the default --tolerance: the export computes what PyTorch does
    if diff == 0:
        assert rc == 0 and captured.err == ""
    else:
        assert rc == 1 and captured.err.startswith("error: the export differs")
    # Written either way (the error says not to use it); the metadata names the classes.
    metadata = {p.key: json.loads(p.value) for p in onnx.load(str(output)).metadata_props}
    assert metadata["class_names"] == load_classifier(checkpoint)[1]


@pytest.mark.parametrize("tolerance", ["-1", "nan", "inf"])
def test_tolerance_out_of_range_is_bad_input(checkpoint, tmp_path, capsys, tolerance):
    output = tmp_path / "vit.pt"
    rc = export.main(["--weights", str(checkpoint), "--output", str(output),
                      "--tolerance", tolerance])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: --tolerance") and len(err.splitlines()) == 1
    assert not output.exists()


@pytest.mark.parametrize("where", ["a folder", "under a file"])
def test_output_where_no_file_can_be_written(checkpoint, tmp_path, capsys, where):
    blocker = tmp_path / "blocker"
    if where == "a folder":
        blocker.mkdir()
        output = blocker
    else:
        blocker.write_text("keep me")
        output = blocker / "vit.pt"
    rc = export.main(["--weights", str(checkpoint), "--output", str(output)])
    captured = capsys.readouterr()
    assert rc == 2 and captured.err.startswith("error: ") and len(captured.err.splitlines()) == 1
    assert "Wrote" not in captured.out
    assert blocker.is_dir() or blocker.read_text() == "keep me"


def test_a_file_torchs_writer_cannot_open_is_a_write_error_with_the_systems_reason(tmp_path):
    from errors import WriteError

    # The C++ writer's open() fails (a name longer than any file system allows) and reports
    # it as a RuntimeError: the error names the file and the system's reason, in one line.
    output = tmp_path / ("x" * 300 + ".pt")
    with pytest.raises(WriteError) as caught:
        export.export_torchscript(torch.nn.Linear(2, 2), torch.randn(1, 2), {}, output)
    assert str(caught.value) == (f"Cannot write {output} (File name too long); check the folder "
                                 f"and the free space.")
    assert not any(tmp_path.iterdir())


def test_a_folder_torchs_writer_may_not_write_in_says_to_check_its_permissions(
        unwritable_folder):
    from errors import WriteError

    output = unwritable_folder / "vit.pt"
    with pytest.raises(WriteError) as caught:
        export.export_torchscript(torch.nn.Linear(2, 2), torch.randn(1, 2), {}, output)
    assert str(caught.value) == (f"Cannot write {output} (Permission denied); check the "
                                 f"folder's permissions.")


def test_an_output_name_too_long_for_the_file_system_is_bad_input(checkpoint, tmp_path):
    # Checked before loading or tracing anything: one line, exit 2, nothing written.
    output = tmp_path / ("x" * 300 + ".pt")
    code, out, err = run_cli(export.main, ["--weights", checkpoint, "--output", output])
    assert code == 2 and out == ""
    assert err == f"error: --output {output} cannot be written (File name too long).\n"
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("spelling", ["the same path", "another spelling", "a symlink",
                                      "a hard link", "the default weights"])
def test_an_output_that_is_the_weights_file_is_refused(checkpoint, tmp_path, monkeypatch,
                                                       spelling):
    # The export must never replace the checkpoint it reads: one line, exit 2, file intact,
    # also when --weights is left to its default (weights/best.pth in the current folder).
    folder = tmp_path / "weights"
    folder.mkdir()
    weights = folder / "best.pth"
    weights.write_bytes(checkpoint.read_bytes())
    before = weights.read_bytes()
    output = {"the same path": weights, "another spelling": folder / ".." / "weights" / "best.pth",
              "a symlink": tmp_path / "link.pth", "a hard link": tmp_path / "hard.pth",
              "the default weights": Path("weights") / "best.pth"}[spelling]
    if spelling == "a symlink":
        output.symlink_to(weights)
    elif spelling == "a hard link":
        output.hardlink_to(weights)
    argv = ["--output", output]
    if spelling == "the default weights":
        monkeypatch.chdir(tmp_path)
    else:
        argv += ["--weights", weights]
    code, out, err = run_cli(export.main, argv)
    line = one_error_line(code, err)
    assert f"--output {output} is the weights file" in line, line
    assert out == "" and weights.read_bytes() == before


def test_the_format_follows_the_output_suffix_without_format(checkpoint, tmp_path, monkeypatch):
    # vit.onnx without --format is an ONNX export: here its missing packages say so, where
    # the TorchScript default used to write a TorchScript file named vit.onnx.
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "onnxruntime" else real_find_spec(name))
    output = tmp_path / "vit.onnx"
    code, _, err = run_cli(export.main, ["--weights", checkpoint, "--output", output])
    assert one_error_line(code, err).startswith("error: ONNX export needs")
    assert not output.exists()


@pytest.mark.parametrize("name, given, needle", [
    ("e.txt", None, "the suffix .txt names no export format"),
    ("vit", None, "the suffix (none) names no export format"),
    ("vit.pth", None, ".pth is the suffix of this project's checkpoints"),
    ("vit.pt", "onnx", "ends in .pt, which means TorchScript, but --format is onnx"),
    ("vit.onnx", "torchscript", "ends in .onnx, which means ONNX, but --format is torchscript"),
])
def test_an_output_suffix_that_names_no_format_or_another_is_bad_input(checkpoint, tmp_path,
                                                                       name, given, needle):
    output = tmp_path / name
    argv = ["--weights", checkpoint, "--output", output]
    code, out, err = run_cli(export.main, argv + (["--format", given] if given else []))
    assert needle in one_error_line(code, err)
    assert out == "" and not output.exists()


def test_an_output_in_a_folder_that_refuses_files_is_refused_before_the_work(checkpoint,
                                                                             unwritable_folder):
    output = unwritable_folder / "new" / "vit.pt"
    code, out, err = run_cli(export.main, ["--weights", checkpoint, "--output", output])
    assert one_error_line(code, err).startswith(f"error: --output {output}: no file can be "
                                                f"created in {unwritable_folder} (")
    assert out == ""


# --------------------------------------------------------------------------- a full disk

def test_torchscript_on_a_full_disk_is_one_error_line_and_keeps_the_old_export(checkpoint,
                                                                                tmp_path):
    # torch.jit.save's own file writer aborted the interpreter here (exit 134, "unexpected
    # pos") and left a cut-short vit.pt: run in a process of its own, so that cannot end
    # this test run. Exports of 1 KB and more fail, as on a disk with 1 KB left.
    output = tmp_path / "out" / "vit.pt"
    output.parent.mkdir()
    output.write_bytes(b"the export of yesterday")
    argv = ["--weights", str(checkpoint), "--output", str(output)]
    done = run_with_files_limited_to(1000, f"import export; raise SystemExit(export.main("
                                           f"{argv!r}))", tmp_path)
    line = one_error_line(done.returncode, done.stderr, status=1)
    assert line == (f"error: Cannot write {output} (File too large); check the folder and the "
                    f"free space.")
    assert output.read_bytes() == b"the export of yesterday"
    assert_only(output.parent, ["vit.pt"])


def test_onnx_on_a_full_disk_is_one_error_line_and_keeps_the_old_export(checkpoint, tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    output = tmp_path / "vit.onnx"
    output.write_bytes(b"the export of yesterday")
    with files_limited_to(1000):
        code, out, err = run_cli(export.main, ["--weights", checkpoint, "--output", output])
    line = one_error_line(code, err, status=1)
    assert line.startswith(f"error: Cannot write {output} (File too large)"), line
    assert "Wrote" not in out
    assert output.read_bytes() == b"the export of yesterday"
    assert_only(tmp_path, ["vit.onnx"])
