"""predict.py on a tiny trained checkpoint, and attention rollout on attention we know."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import load, one_error_line, run_cli
from PIL import Image
from write_faults import assert_only, files_limited_to

import predict
from my_dataset import MEAN, STD, build_transforms, open_rgb, unnormalize
from visualize import attention_rollout, last_layer_attention, plot_attention, rollout_matrix
from vit_model import VisionTransformer, create_model

CLASSES = ["daisy", "dandelion", "roses", "sunflowers", "tulips"]


@pytest.fixture(scope="module")
def trained(trained_demo) -> tuple[Path, Path]:
    """(data folder, checkpoint): the session's demo run (conftest), 12 images a class."""
    return trained_demo.data, trained_demo.best


def test_topk_on_one_image_prints_the_k_best_in_order(trained):
    data, ckpt = trained
    image = data / "tulips" / "tulips_0001.jpg"
    _, full, _ = run_cli(predict.main, [image, "--weights", ckpt, "--device", "cpu"])
    rc, out, _ = run_cli(predict.main, [image, "--weights", ckpt, "--device", "cpu", "--topk", "2"])
    assert rc == 0
    everything = {line.split()[1]: float(line.split()[-1])
                  for line in full.splitlines() if line.startswith("class: ")}
    shown = [line.split()[1] for line in out.splitlines() if line.startswith("class: ")]
    assert shown == sorted(everything, key=everything.get, reverse=True)[:2]
    assert out.splitlines()[-1] == full.splitlines()[-1]  # the same "predicted:" line


@pytest.fixture()
def mixed_folder(trained, tmp_path: Path) -> tuple[Path, Path, int]:
    """(folder, one extra image outside it, readable images in the folder): the folder holds
    real images in a sub-folder, a corrupt .jpg, an empty .png and a LICENSE.txt."""
    data, _ = trained
    folder = tmp_path / "photos"
    shutil.copytree(data / "daisy", folder / "daisy")
    (folder / "broken.jpg").write_bytes(b"this is not a JPEG")
    (folder / "daisy" / "empty.png").write_bytes(b"")
    (folder / "LICENSE.txt").write_text("not an image, and not named like one")
    return folder, data / "sunflowers" / "sunflowers_0002.jpg", 12


def test_folder_and_files_skip_unreadable_and_predict_the_rest(trained, mixed_folder):
    _, ckpt = trained
    folder, extra, readable = mixed_folder
    rc, out, err = run_cli(predict.main, [folder, extra, "--weights", ckpt, "--device", "cpu",
                                          "--batch-size", "4"])
    assert rc == 0
    headers = [line for line in out.splitlines() if not line.startswith(" ")]
    assert len(headers) == readable + 1
    assert headers[-1] == str(extra)
    assert all(Path(h).suffix == ".jpg" and "broken" not in h for h in headers)
    # a block: the path, then the top 3 classes with their probabilities, best first
    first_block = out.splitlines()[1:4]
    values = [float(line.split()[-1]) for line in first_block]
    assert values == sorted(values, reverse=True)
    warnings = [line for line in err.splitlines() if line.startswith("warning: skipping")]
    assert len(warnings) == 2
    assert any("broken.jpg" in w for w in warnings) and any("empty.png" in w for w in warnings)
    assert "LICENSE" not in err


def test_json_lines_alone_on_stdout(trained, mixed_folder):
    _, ckpt = trained
    folder, extra, readable = mixed_folder
    # cuda:0 on a machine without CUDA prints a fallback notice: it must go to stderr.
    device = "cpu" if torch.cuda.is_available() else "cuda:0"
    rc, out, err = run_cli(predict.main, [folder, extra, "--weights", ckpt, "--device", device,
                                          "--json", "--topk", "2", "--save-fig",
                                          folder.parent / "g.png"])
    assert rc == 0
    records = [json.loads(line) for line in out.splitlines()]  # every line is JSON
    assert len(records) == readable + 1
    for record in records:
        assert set(record) == {"path", "predicted", "prob", "topk"}
        assert Path(record["path"]).is_file()
        assert len(record["topk"]) == 2
        assert record["topk"][0] == {"class": record["predicted"], "prob": record["prob"]}
        assert record["topk"][0]["prob"] >= record["topk"][1]["prob"]
        assert record["predicted"] in CLASSES
    assert "Figure saved" in err and "warning: skipping" in err
    if device == "cuda:0":
        assert "CUDA is not available" in err


def test_json_agrees_with_the_text_output(trained):
    data, ckpt = trained
    image = data / "dandelion" / "dandelion_0003.jpg"
    _, text, _ = run_cli(predict.main, [image, "--weights", ckpt, "--device", "cpu"])
    _, out, _ = run_cli(predict.main, [image, "--weights", ckpt, "--device", "cpu", "--json"])
    (record,) = [json.loads(line) for line in out.splitlines()]
    assert len(record["topk"]) == len(CLASSES)  # one image: every class by default
    assert text.splitlines()[-1] == f"predicted: {record['predicted']} (prob {record['prob']:.4f})"


def test_batch_size_does_not_change_the_probabilities(trained):
    data, ckpt = trained
    model, _ = predict.load_classifier(ckpt)
    paths = sorted((data / "roses").glob("*.jpg"))
    one = predict.predict_probs(model, paths, torch.device("cpu"), batch_size=1, workers=0)
    many = predict.predict_probs(model, paths, torch.device("cpu"), batch_size=4, workers=0)
    assert one.shape == (len(paths), 5)
    torch.testing.assert_close(one, many, rtol=1e-5, atol=1e-6)


def test_grid_figure_for_several_images(trained, tmp_path):
    data, ckpt = trained
    images = [data / c / f"{c}_0000.jpg" for c in CLASSES[:4]]
    single, grid = tmp_path / "one.png", tmp_path / "grid.png"
    assert run_cli(predict.main, [images[0], "--weights", ckpt, "--device", "cpu", "--save-fig",
                                  single])[0] == 0
    rc, out, _ = run_cli(predict.main, [*images, "--weights", ckpt, "--device", "cpu", "--save-fig",
                                        grid])
    assert rc == 0 and f"Figure saved to {grid}" in out
    with Image.open(single) as one, Image.open(grid) as many:
        assert one.format == many.format == "PNG"
        # four images side by side: much wider than tall, unlike the single picture
        assert many.width > 2.5 * many.height
        assert one.width < 1.5 * one.height


def test_folder_with_nothing_readable_exits_2(trained, tmp_path):
    _, ckpt = trained
    for name in ("a.jpg", "b.png"):
        (tmp_path / name).write_bytes(b"\x00" * 10)
    rc, out, err = run_cli(predict.main, [tmp_path, "--weights", ckpt, "--device", "cpu"])
    assert rc == 2 and out == ""
    assert err.strip().splitlines()[-1].startswith("error: None of the 2 image files")


# --------------------------------------------------------------------------- attention rollout


def _attention(rows: torch.Tensor, heads: int = 2) -> torch.Tensor:
    """One layer's (1, heads, T, T) attention with every head equal to rows."""
    return rows.expand(1, heads, *rows.shape).clone()


def _attend_to(token: int, tokens: int) -> torch.Tensor:
    rows = torch.zeros(tokens, tokens)
    rows[:, token] = 1.0
    return _attention(rows)


def test_rollout_of_uniform_attention_is_uniform_over_patches():
    tokens, layers = 5, 2  # class token + a 2x2 grid
    maps = [_attention(torch.full((tokens, tokens), 1 / tokens))] * layers
    # By hand: A = (U + I) / 2 with U = 11^T / T idempotent, so A^L = (I + (2^L - 1) U) / 2^L
    # and the class token's weight on each patch is (2^L - 1) / (2^L T) = 3 / 20.
    grid = attention_rollout(maps)
    assert grid.shape == (1, 2, 2)
    torch.testing.assert_close(grid, torch.full((1, 2, 2), 3 / 20))


def test_rollout_of_attention_to_one_patch_peaks_there():
    tokens, layers, target = 10, 3, 7  # a 3x3 grid; token 7 is patch 6, row 2 column 0
    grid = attention_rollout([_attend_to(target, tokens)] * layers)
    # A = (1 e_j^T + I) / 2 gives A^L = ((2^L - 1) 1 e_j^T + I) / 2^L: 7/8 on patch j, 0 elsewhere
    expected = torch.zeros(1, 3, 3)
    expected[0, 2, 0] = 7 / 8
    torch.testing.assert_close(grid, expected)


def test_rollout_multiplies_later_layers_from_the_left():
    tokens = 5
    first, second = _attend_to(1, tokens), _attend_to(4, tokens)  # patch 0, then patch 3
    # By hand, ((1 e_4^T + I)/2) ((1 e_1^T + I)/2) = (2 * 1 e_1^T + 1 e_4^T + I) / 4:
    # what the first layer gathered reaches the class token through every later layer.
    row = rollout_matrix([first, second])[0, 0]
    torch.testing.assert_close(row, torch.tensor([0.25, 0.5, 0.0, 0.0, 0.25]))
    torch.testing.assert_close(last_layer_attention([first, second]),
                               torch.tensor([[[0.0, 0.0], [0.0, 1.0]]]))


def test_rollout_of_identity_attention_leaves_the_class_token_alone():
    tokens = 5
    rows = rollout_matrix([_attention(torch.eye(tokens))] * 4)[0]
    torch.testing.assert_close(rows, torch.eye(tokens))
    assert attention_rollout([_attention(torch.eye(tokens))]).abs().sum() == 0


def test_rollout_through_a_model_with_constant_attention():
    # Zero q and k make every score 0, so every head attends uniformly: the model's own
    # attention_maps must then give the uniform rollout computed by hand.
    model = create_model("vit_demo_patch8_64", num_classes=5).eval()
    with torch.no_grad():
        for block in model.blocks:
            block.attn.qkv.weight[: 2 * model.embed_dim].zero_()
            block.attn.qkv.bias[: 2 * model.embed_dim].zero_()
    maps = model.attention_maps(torch.randn(2, 3, 64, 64))
    tokens, layers = 65, len(model.blocks)  # 8x8 patches + the class token; 4 blocks
    grid = attention_rollout(maps)
    assert grid.shape == (2, 8, 8)
    expected = (2 ** layers - 1) / (2 ** layers * tokens)
    torch.testing.assert_close(grid, torch.full((2, 8, 8), expected))
    torch.testing.assert_close(last_layer_attention(maps), torch.full((2, 8, 8), 1 / tokens))


def test_attention_figures_are_saved(trained, tmp_path):
    data, ckpt = trained
    image = data / "roses" / "roses_0001.jpg"
    single = tmp_path / "attention.png"
    rc, _, _ = run_cli(predict.main, [image, "--weights", ckpt, "--device", "cpu", "--attention",
                                      single])
    assert rc == 0
    with Image.open(single) as picture:
        assert picture.format == "PNG" and picture.width > 2 * picture.height  # three panels
    folder = tmp_path / "maps"
    rc, _, _ = run_cli(predict.main, [data / "roses", data / "daisy" / "daisy_0000.jpg",
                                      "--weights", ckpt, "--device", "cpu", "--attention", folder])
    assert rc == 0
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [f"roses_{i:04d}.attention.png" for i in range(12)] + ["daisy_0000.attention.png"])
    rc, _, err = run_cli(predict.main, [data / "roses", "--weights", ckpt, "--device", "cpu",
                                        "--attention", tmp_path / "one.png"])
    assert rc == 2 and "pass a folder" in err


@pytest.mark.parametrize("tamper, names_model_args", [
    (lambda args: {**args, "evil": True}, True),
    (lambda args: list(args.items()), True),
    (lambda args: {**args, "depth": "two"}, False),
    (lambda args: {**args, "embed_dim": -8}, False),
    (lambda args: {**args, "img_size": 0}, False),
], ids=["extra key", "a list", "depth two", "negative embed_dim", "img_size 0"])
def test_a_checkpoint_with_tampered_model_args_is_one_error_line(trained, tmp_path, tamper,
                                                                 names_model_args):
    data, ckpt = trained
    checkpoint = torch.load(ckpt, weights_only=True)
    checkpoint["model_args"] = tamper(checkpoint["model_args"])
    tampered = tmp_path / "tampered.pth"
    torch.save(checkpoint, tampered)
    rc, out, err = run_cli(predict.main, [data / "roses" / "roses_0000.jpg", "--weights",
                                          tampered, "--device", "cpu"])
    assert rc == 2 and out == "" and len(err.strip().splitlines()) == 1, err
    assert err.startswith("error: ")
    if names_model_args:  # names the file and what is wrong
        assert err.startswith(f"error: {tampered} is a checkpoint whose model_args")


# --------------------------------------------------------------------------- predict.py on the
# session's two-epoch run

CLASS_LINE = re.compile(r"^class: (\S+)\s+prob: (\d\.\d{4})$", re.M)


def parse_classes(out: str) -> list[tuple[str, float]]:
    return [(name, float(prob)) for name, prob in CLASS_LINE.findall(out)]


def test_predict_prints_every_class_and_the_prediction(trained_demo):
    image = trained_demo.data / "tulips" / "tulips_0000.jpg"
    code, out, err = run_cli(predict.main, [image, "--weights", trained_demo.best,
                                            "--device", "cpu"])
    assert code == 0, err
    rows = parse_classes(out)
    assert [name for name, _ in rows] == list(CLASSES)  # every class, in class order
    assert sum(prob for _, prob in rows) == pytest.approx(1.0, abs=1e-3)
    best_name, best_prob = max(rows, key=lambda r: r[1])
    assert out.splitlines()[-1] == f"predicted: {best_name} (prob {best_prob:.4f})"

    # The same numbers as the checkpoint's model applied by hand.
    checkpoint = load(trained_demo.output_dir / "best.pth")
    model = VisionTransformer(**checkpoint["model_args"]).eval()
    model.load_state_dict(checkpoint["model"])
    with torch.no_grad():
        x = build_transforms(64, train=False)(open_rgb(image)).unsqueeze(0)
        expected = model(x).softmax(-1)[0].tolist()
    assert [p for _, p in rows] == pytest.approx(expected, abs=1e-4)


def test_predict_saves_a_figure(trained_demo, tmp_path):
    image = trained_demo.data / "daisy" / "daisy_0001.jpg"
    figure = tmp_path / "figures" / "prediction.png"
    weights = trained_demo.output_dir / "model-1.pth"
    code, _, err = run_cli(predict.main, [image, "--weights", weights,
                                          "--device", "cpu", "--save-fig", figure])
    assert code == 0, err
    with Image.open(figure) as img:
        assert img.format == "PNG"
        assert img.width > 50 and img.height > 50


def test_predict_finds_best_pth_in_weights_by_default(trained_demo, monkeypatch):
    image = trained_demo.data / "roses" / "roses_0002.jpg"
    _, explicit, _ = run_cli(predict.main, [image, "--weights", trained_demo.best,
                                            "--device", "cpu"])
    monkeypatch.chdir(trained_demo.root)
    code, out, err = run_cli(predict.main, [image, "--device", "cpu"])
    assert code == 0, err
    assert parse_classes(out) == parse_classes(explicit)
    assert len(parse_classes(out)) == 5


def test_predict_errors(trained_demo, tmp_path, monkeypatch):
    best = trained_demo.output_dir / "best.pth"
    code, out, err = run_cli(predict.main, [tmp_path / "missing.jpg", "--weights", best,
                                            "--device", "cpu"])
    assert f"{tmp_path / 'missing.jpg'} does not exist" in one_error_line(code, err)
    assert out == ""

    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    code, out, err = run_cli(predict.main, [text, "--weights", best, "--device", "cpu"])
    assert "notes.txt" in one_error_line(code, err) and out == ""

    fake = tmp_path / "fake.jpg"
    fake.write_text("not a JPEG either")
    code, out, err = run_cli(predict.main, [fake, "--weights", best, "--device", "cpu"])
    assert f"{fake} cannot be read as an image" in one_error_line(code, err)
    assert out == ""

    image = trained_demo.data / "daisy" / "daisy_0000.jpg"
    code, out, err = run_cli(predict.main, [image, "--weights", tmp_path / "nothing.pth",
                                            "--device", "cpu"])
    assert "nothing.pth does not exist" in one_error_line(code, err) and out == ""

    monkeypatch.chdir(tmp_path)  # no ./weights here
    code, _, err = run_cli(predict.main, [image, "--device", "cpu"])
    assert "weights" in one_error_line(code, err)


def test_copying_a_checkpoint_elsewhere_keeps_it_usable(trained_demo, tmp_path):
    # A checkpoint names its classes itself: no class_indices.json needs to travel with it.
    lone = tmp_path / "lone" / "model.pth"
    lone.parent.mkdir()
    shutil.copy(trained_demo.output_dir / "model-0.pth", lone)
    image = trained_demo.data / "dandelion" / "dandelion_0003.jpg"
    code, out, err = run_cli(predict.main, [image, "--weights", lone, "--device", "cpu"])
    assert code == 0, err
    assert [name for name, _ in parse_classes(out)] == list(CLASSES)


# --------------------------------------------------------------------------- the figures' content

def test_prediction_grid_shows_each_image_with_its_predicted_class_coloured_by_its_folder(
        trained):
    data, ckpt = trained
    model, class_names = predict.load_classifier(ckpt)
    paths = [data / c / f"{c}_0000.jpg" for c in CLASSES[:3]]
    probs = torch.tensor([[0.7, 0.1, 0.1, 0.05, 0.05],    # daisy, right
                          [0.1, 0.2, 0.6, 0.05, 0.05],    # dandelion taken for roses
                          [0.0, 0.0, 0.25, 0.0, 0.75]])  # roses taken for tulips
    fig = predict.prediction_figure(paths, probs, class_names)
    axes = fig.axes
    assert len(axes) == 3
    assert [ax.get_title() for ax in axes] == [
        "daisy 0.70\ndaisy_0000.jpg", "roses 0.60\ndandelion_0000.jpg",
        "tulips 0.75\nroses_0000.jpg"]
    assert [ax.title.get_color() for ax in axes] == ["green", "red", "red"]
    for ax, path in zip(axes, paths, strict=True):
        assert (ax.get_images()[0].get_array() == np.asarray(open_rgb(path))).all()
    (single,) = predict.prediction_figure(paths[:1], probs[:1], class_names).axes
    assert single.get_title() == "class: daisy   prob: 0.700"


def test_attention_figure_shows_the_input_crop_then_the_two_maps_over_it(trained):
    data, ckpt = trained
    model, _ = predict.load_classifier(ckpt)
    image = data / "roses" / "roses_0001.jpg"
    ((crop, rollout, last),) = predict.attention_grids(model, [image], torch.device("cpu"))
    # The crop is the evaluation transform's pixels, un-normalised.
    expected_crop = build_transforms(64, train=False)(open_rgb(image))
    expected_crop = expected_crop * torch.tensor(STD).view(3, 1, 1) + torch.tensor(
        MEAN).view(3, 1, 1)
    torch.testing.assert_close(crop, expected_crop, rtol=1e-5, atol=1e-6)
    fig = plot_attention(crop, rollout, last, "roses_0001.jpg: roses (0.50)")
    assert [ax.get_title() for ax in fig.axes] == [
        "input", "attention rollout", "last block, class token"]
    assert fig._suptitle.get_text() == "roses_0001.jpg: roses (0.50)"
    picture = crop.permute(1, 2, 0).numpy()
    for ax, overlays in zip(fig.axes, (0, 1, 1), strict=True):
        layers = ax.get_images()
        assert len(layers) == 1 + overlays
        assert np.array_equal(layers[0].get_array(), picture)  # the crop under each map
    heats = [ax.get_images()[1].get_array() for ax in fig.axes[1:]]
    assert heats[0].shape == heats[1].shape == (64, 64)
    assert not np.array_equal(heats[0], heats[1])


# --------------------------------------------------------------------------- the reproduced
# repository's workflow: a plain state dict and class_indices.json

@pytest.fixture(scope="module")
def plain_state_dict(trained, tmp_path_factory) -> tuple[Path, Path]:
    """(best.pth's weights as a bare state dict, a class_indices.json kept elsewhere)."""
    _, ckpt = trained
    root = tmp_path_factory.mktemp("plain")
    torch.save(torch.load(ckpt, weights_only=True)["model"], root / "model-9.pth")
    indices = root / "elsewhere" / "class_indices.json"
    indices.parent.mkdir()
    indices.write_text(json.dumps({str(i): name for i, name in enumerate(CLASSES)}))
    return root / "model-9.pth", indices


def test_a_plain_state_dict_with_class_indices_and_model_name_works_in_every_command(
        trained, plain_state_dict, tmp_path, monkeypatch, trained_demo):
    import evaluate
    import export

    data, ckpt = trained
    weights, indices = plain_state_dict
    image = data / "tulips" / "tulips_0002.jpg"
    _, from_checkpoint, _ = run_cli(predict.main, [image, "--weights", ckpt, "--device", "cpu"])
    # Only --class-indices names the classes: no class_indices.json here nor beside the weights.
    monkeypatch.chdir(tmp_path)
    names = ["--class-indices", indices, "--model-name", "vit_demo_patch8_64"]
    rc, out, err = run_cli(predict.main, [image, "--weights", weights, *names, "--device", "cpu"])
    assert rc == 0, err
    assert out == from_checkpoint and "warning" not in err
    renamed = tmp_path / "renamed.json"  # the names printed are the file's
    renamed.write_text(json.dumps({str(i): name.upper() for i, name in enumerate(CLASSES)}))
    rc, out, _ = run_cli(predict.main, [image, "--weights", weights, "--class-indices", renamed,
                                        "--model-name", "vit_demo_patch8_64", "--device", "cpu"])
    assert rc == 0
    assert [name for name, _ in parse_classes(out)] == [name.upper() for name in CLASSES]
    assert [p for _, p in parse_classes(out)] == [p for _, p in parse_classes(from_checkpoint)]
    rc, _, err = run_cli(predict.main, [image, "--weights", weights, "--model-name",
                                        "vit_demo_patch8_64", "--device", "cpu"])
    assert rc == 2 and "--class-indices" in err  # nothing names the classes

    assert evaluate.main([str(a) for a in ["--weights", weights, *names, "--data-path", data,
                                           "--device", "cpu", "--workers", "0",
                                           "--seed", trained_demo.seed,
                                           "--val-rate", trained_demo.val_rate, "--output-dir",
                                           tmp_path / "eval"]]) == 0
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    checkpoint = torch.load(ckpt, weights_only=True)
    assert metrics["class_names"] == CLASSES
    assert metrics["accuracy"] == pytest.approx(checkpoint["metrics"]["val_acc"])

    assert export.main([str(a) for a in ["--weights", weights, *names, "--output",
                                         tmp_path / "vit.pt"]]) == 0
    scripted = torch.jit.load(str(tmp_path / "vit.pt"))
    model, _ = predict.load_classifier(ckpt)
    batch = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(scripted(batch), model.eval()(batch), rtol=1e-4, atol=1e-5)


def test_a_zero_head_warns_that_every_class_gets_the_same_probability(
        trained, plain_state_dict, tmp_path):
    data, _ = trained
    weights, indices = plain_state_dict
    state = torch.load(weights, weights_only=True)
    state["head.weight"].zero_()
    state["head.bias"].zero_()
    zero = tmp_path / "zero_head.pth"
    torch.save(state, zero)
    rc, out, err = run_cli(predict.main, [data / "roses" / "roses_0000.jpg", "--weights", zero,
                                          "--class-indices", indices, "--model-name",
                                          "vit_demo_patch8_64", "--device", "cpu"])
    assert rc == 0
    assert "warning: the head in" in err and "all zeros" in err
    assert [line.split()[-1] for line in out.splitlines() if line.startswith("class: ")] == [
        "0.2000"] * 5


def test_default_weights_fall_back_to_the_newest_epoch_checkpoint_by_number(
        trained_demo, tmp_path, monkeypatch):
    folder = tmp_path / "weights"
    folder.mkdir()
    shutil.copy(trained_demo.output_dir / "model-0.pth", folder / "model-2.pth")
    shutil.copy(trained_demo.output_dir / "model-1.pth", folder / "model-10.pth")
    monkeypatch.chdir(tmp_path)  # no best.pth here
    assert predict.resolve_weights(None) == Path("weights") / "model-10.pth"
    image = trained_demo.data / "roses" / "roses_0003.jpg"
    _, newest, _ = run_cli(predict.main, [image, "--weights", folder / "model-10.pth", "--device",
                                          "cpu"])
    rc, out, _ = run_cli(predict.main, [image, "--device", "cpu"])
    assert rc == 0 and out == newest


# --------------------------------------------------------------------------- Grad-CAM


def test_grad_cam_maps_are_vit_grad_cam_for_the_given_targets(trained):
    from grad_cam import vit_grad_cam

    data, ckpt = trained
    model, _ = predict.load_classifier(ckpt)
    paths = [data / "roses" / "roses_0000.jpg", data / "tulips" / "tulips_0000.jpg",
             data / "daisy" / "daisy_0001.jpg"]
    targets = [2, 0, 4]
    panels = list(predict.grad_cam_maps(model, paths, torch.device("cpu"), targets, block=-2,
                                        batch_size=2, workers=0))  # two batches
    images = torch.stack([image for image, _ in predict.image_loader(model, paths, workers=0)
                          .dataset])
    expected = vit_grad_cam(model.eval(), images, targets, block=-2)
    assert len(panels) == 3
    for (crop, cam), image, want in zip(panels, images, expected, strict=True):
        torch.testing.assert_close(cam, want)
        torch.testing.assert_close(crop, unnormalize(image[None])[0])
        assert crop.min() >= -1e-6 and crop.max() <= 1 + 1e-6


def test_grad_cam_maps_work_for_another_input_and_patch_size(trained):
    data, _ = trained
    torch.manual_seed(0)
    model = create_model("vit_demo_patch8_64", img_size=48, patch_size=16, num_classes=5)
    torch.nn.init.normal_(model.head.weight)  # the head starts at zero: no gradient, no map
    paths = [data / "roses" / "roses_0000.jpg", data / "daisy" / "daisy_0000.jpg"]
    panels = list(predict.grad_cam_maps(model, paths, torch.device("cpu"), [1, 3], workers=0))
    for crop, cam in panels:
        assert crop.shape == (3, 48, 48) and cam.shape == (48, 48)
        assert cam.min() >= 0 and cam.max() <= 1 and cam.max() > 0.5  # scaled, not all zero


def test_grad_cam_figures_and_target_class(trained, tmp_path):
    data, ckpt = trained
    image = data / "roses" / "roses_0002.jpg"
    single = tmp_path / "gradcam.png"
    rc, out, _ = run_cli(predict.main, [image, "--weights", ckpt, "--device", "cpu", "--grad-cam",
                                        single])
    assert rc == 0 and f"Grad-CAM maps saved to {single}" in out
    with Image.open(single) as picture:
        assert picture.format == "PNG" and picture.width > 1.5 * picture.height  # two panels
        picture.load()
    folder = tmp_path / "maps"
    rc, _, _ = run_cli(predict.main, [data / "tulips", image, "--weights", ckpt, "--device", "cpu",
                                      "--grad-cam", folder, "--cam-layer", "0"])
    assert rc == 0
    tulips = [f"{p.stem}.gradcam.png" for p in (data / "tulips").glob("*.jpg")]
    assert len(tulips) > 1
    assert sorted(p.name for p in folder.iterdir()) == sorted(tulips + ["roses_0002.gradcam.png"])

    model, names = predict.load_classifier(ckpt)
    predicted = int(predict.predict_image(model, image, torch.device("cpu")).argmax())
    other = (predicted + 1) % len(names)
    (_, for_predicted), = predict.grad_cam_maps(model, [image], torch.device("cpu"), [predicted])
    (_, for_other), = predict.grad_cam_maps(model, [image], torch.device("cpu"), [other])
    assert not torch.allclose(for_predicted, for_other, atol=1e-3)
    rc, _, _ = run_cli(predict.main, [image, "--weights", ckpt, "--device", "cpu", "--grad-cam",
                                      tmp_path / "other.png", "--target-class", names[other]])
    assert rc == 0
    with Image.open(tmp_path / "other.png") as a, Image.open(single) as b:
        assert a.size == b.size and a.tobytes() != b.tobytes()


def test_grad_cam_title_names_the_class_the_block_and_an_empty_map():
    cam = torch.zeros(4, 4)
    assert predict.grad_cam_title("roses", cam) == "Grad-CAM: roses, all zero"
    cam[1, 2] = 0.5
    assert predict.grad_cam_title("roses", cam, -2) == "Grad-CAM: roses (block -2)"


@pytest.mark.parametrize("flags, needle", [
    (["--target-class", "orchids"], "--target-class orchids is not one of the model's classes: "
                                    + ", ".join(CLASSES)),
    (["--cam-layer", "4"], "--cam-layer 4 is outside the model's 4 blocks; pass -4..3"),
    (["--cam-layer", "-5"], "--cam-layer -5 is outside"),
])
def test_bad_grad_cam_flags_exit_2_with_one_line(trained, tmp_path, flags, needle):
    data, ckpt = trained
    target = tmp_path / "gradcam.png"
    rc, out, err = run_cli(predict.main, [data / "roses" / "roses_0000.jpg", "--weights", ckpt,
                                          "--device", "cpu", "--grad-cam", target, *flags])
    assert rc == 2 and out == "" and len(err.strip().splitlines()) == 1, err
    assert err.startswith("error: ") and needle in err
    assert not target.exists()
    # Without --grad-cam the flags are refused before any image is read: even a missing one.
    rc, _, err = run_cli(predict.main, [tmp_path / "missing.jpg", "--weights", ckpt, "--device",
                                        "cpu", *flags])
    assert "add --grad-cam PATH" in one_error_line(rc, err)


# --------------------------------------------------------------------------- hostile inputs


@pytest.mark.parametrize("name", ["figure.txt", "figure", "a_folder"])
def test_save_fig_needs_a_file_with_a_figure_suffix(trained, tmp_path, name):
    data, ckpt = trained
    (tmp_path / "a_folder").mkdir()
    rc, _, err = run_cli(predict.main, [data / "roses" / "roses_0000.jpg", "--weights", ckpt,
                                        "--device", "cpu", "--save-fig", tmp_path / name])
    one_error_line(rc, err)
    assert ".png" in err or "is a folder" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_folder"]  # nothing written
    assert not any((tmp_path / "a_folder").iterdir())


def test_save_fig_prints_the_path_it_wrote(trained, tmp_path):
    data, ckpt = trained
    target = tmp_path / "new" / "Figure.PNG"
    rc, out, _ = run_cli(predict.main, [data / "roses" / "roses_0000.jpg", "--weights", ckpt,
                                        "--device", "cpu", "--save-fig", target])
    assert rc == 0 and target.is_file()
    assert f"Figure saved to {target}\n" in out


@pytest.mark.parametrize("flag", ["--attention", "--grad-cam"])
def test_a_map_flag_naming_an_existing_file_or_folder_names_that_flag(trained, tmp_path,
                                                                      flag):
    data, ckpt = trained
    existing = tmp_path / "notes.txt"
    existing.write_text("keep me")
    rc, _, err = run_cli(predict.main, [data / "roses", "--weights", ckpt, "--device", "cpu",
                                        flag, existing])
    assert one_error_line(rc, err).startswith(f"error: {flag} {existing} is a file")
    assert "pass a folder" in err
    assert existing.read_text() == "keep me"
    folder = tmp_path / "map.png"  # a folder with a figure's name, for one image
    folder.mkdir()
    rc, _, err = run_cli(predict.main, [data / "roses" / "roses_0000.jpg", "--weights", ckpt,
                                        "--device", "cpu", flag, folder])
    assert one_error_line(rc, err).startswith(f"error: {flag} {folder} is a folder")


def test_negative_workers_is_bad_input(trained):
    data, ckpt = trained
    rc, _, err = run_cli(predict.main, [data / "roses", "--weights", ckpt, "--device", "cpu",
                                        "--workers", "-1"])
    assert "--workers" in one_error_line(rc, err)


def test_an_unreadable_weights_file_is_one_error_line(trained, tmp_path, monkeypatch):
    data, ckpt = trained
    locked = tmp_path / "locked.pth"
    shutil.copy(ckpt, locked)
    real_open = Path.open

    def open_denied(self, *args, **kwargs):  # chmod 000 does not stop root: deny it here
        if self == locked:
            raise PermissionError(13, "Permission denied", str(self))
        return real_open(self, *args, **kwargs)

    monkeypatch.setattr(Path, "open", open_denied)
    rc, _, err = run_cli(predict.main, [data / "roses" / "roses_0000.jpg", "--weights", locked,
                                        "--device", "cpu"])
    assert "Permission denied" in one_error_line(rc, err) and str(locked) in err


@pytest.mark.parametrize("content, needle", [
    ("[\"daisy\", \"roses\"]", "holds list"),
    ("5", "holds int"),
    ("{\"0\": \"daisy\", \"2\": \"roses\"}", "no key for class \"1\""),
    ("{\"0\": \"a\", \"1\": 2, \"2\": \"c\", \"3\": \"d\", \"4\": \"e\"}", "2 for class \"1\""),
    ("{}", "holds dict"),
])
def test_class_indices_that_are_not_a_class_list(trained, plain_state_dict, tmp_path,
                                                 content, needle):
    data, _ = trained
    bare, _ = plain_state_dict  # names no classes
    indices = tmp_path / "indices.json"
    indices.write_text(content)
    rc, out, err = run_cli(predict.main, [data / "roses" / "roses_0000.jpg", "--weights", bare,
                                          "--model-name", "vit_demo_patch8_64", "--class-indices",
                                          indices, "--device", "cpu"])
    assert needle in one_error_line(rc, err) and out == ""


def test_class_indices_that_does_not_exist_is_named(trained, plain_state_dict, tmp_path):
    data, _ = trained
    bare, _ = plain_state_dict  # names no classes
    rc, _, err = run_cli(predict.main, [data / "roses" / "roses_0000.jpg", "--weights", bare,
                                        "--model-name", "vit_demo_patch8_64", "--class-indices",
                                        tmp_path / "none.json", "--device", "cpu"])
    assert "--class-indices" in one_error_line(rc, err)


def test_a_headless_or_other_class_file_says_so_before_asking_for_class_names(trained,
                                                                            tmp_path,
                                                                            monkeypatch):
    data, _ = trained
    image = data / "roses" / "roses_0000.jpg"
    monkeypatch.chdir(tmp_path)  # no class_indices.json here
    demo = ["--model-name", "vit_demo_patch8_64", "--device", "cpu"]
    headless = tmp_path / "features.pth"  # e.g. timm's num_classes=0, DINO, MAE
    torch.save(create_model("vit_demo_patch8_64", num_classes=0).state_dict(), headless)
    rc, out, err = run_cli(predict.main, [image, "--weights", headless, *demo])
    assert one_error_line(rc, err) == (
        f"error: {headless} has no classification head, only features; fine-tune it first "
        f"(python train.py --weights {headless}).")
    thousand = tmp_path / "imagenet.pth"  # an ImageNet-1k classifier, five names given
    torch.save(create_model("vit_demo_patch8_64", num_classes=1000).state_dict(), thousand)
    indices = tmp_path / "five.json"
    indices.write_text(json.dumps({str(i): name for i, name in enumerate(CLASSES)}))
    rc, out, err = run_cli(predict.main, [image, "--weights", thousand, "--class-indices",
                                          indices, *demo])
    line = one_error_line(rc, err)
    assert "has a 1000-class head but 5 class names were given" in line, line
    assert "--class-indices with 1000 names" in line and out == ""


@pytest.mark.parametrize("orientation, store, undo", [
    (6, Image.Transpose.ROTATE_90, Image.Transpose.ROTATE_270),
    (8, Image.Transpose.ROTATE_270, Image.Transpose.ROTATE_90)])
def test_predict_sees_a_phone_photo_upright(trained, tmp_path, orientation, store, undo):
    """A JPEG whose EXIF says "rotate": the model's input is the upright picture."""
    _, ckpt = trained
    model, _ = predict.load_classifier(ckpt)
    upright = Image.new("RGB", (96, 64), (0, 0, 255))
    upright.paste((255, 0, 0), (0, 0, 32, 64))  # red on the left: asymmetric
    stored = upright.transpose(store)  # as a phone's sensor wrote it
    exif = Image.Exif()
    exif[0x0112] = orientation  # the Orientation tag
    photo = tmp_path / "phone.jpg"
    stored.save(photo, quality=95, exif=exif)

    fed = next(iter(predict.image_loader(model, [photo], workers=0)))[0][0]
    with Image.open(photo) as raw:  # the stored pixels, turned by hand as a viewer would
        by_hand = raw.convert("RGB").transpose(undo)
    expected = build_transforms(model.image_size, train=False)(by_hand)
    torch.testing.assert_close(fed, expected)
    left, right = fed[0, :, :8].mean(), fed[0, :, -8:].mean()  # red channel
    assert left > 0.5 and right < -0.5  # upright: red on the left


@pytest.mark.parametrize("flag, name, images", [
    ("--save-fig", "prediction.png", 1), ("--save-fig", "new/grid.png", 2),
    ("--attention", "attention.png", 1), ("--attention", "", 2), ("--attention", "maps", 2),
    ("--grad-cam", "gradcam.png", 1), ("--grad-cam", "", 2), ("--grad-cam", "maps", 2),
])
def test_a_figure_in_a_folder_that_refuses_files_is_refused_before_the_work(
        trained, unwritable_folder, flag, name, images):
    # Found before the model is loaded, not after the predictions are printed.
    data, ckpt = trained
    target = unwritable_folder / name if name else unwritable_folder
    inputs = [data / "roses" / f"roses_000{i}.jpg" for i in range(images)]
    rc, out, err = run_cli(predict.main, [*inputs, "--weights", ckpt, "--device", "cpu", flag,
                                          target])
    line = one_error_line(rc, err)
    assert line.startswith(f"error: {flag} {target}: no file can be created in "
                           f"{unwritable_folder} ("), line
    assert out == ""


@pytest.mark.filterwarnings("ignore:This DataLoader will create")  # asked for
def test_loader_workers_are_capped_at_one_per_batch(tmp_path):
    # predict.py --workers 100000 used to start that many processes and run out of memory.
    paths = [tmp_path / f"{k}.png" for k in range(5)]
    for path in paths:
        Image.new("RGB", (8, 8)).save(path)
    model = create_model("vit_demo_patch8_64", num_classes=5)
    assert predict.image_loader(model, paths, batch_size=2, workers=100000).num_workers == 3
    assert predict.image_loader(model, paths, batch_size=2, workers=1).num_workers == 1


# ------------------------------------------------------------- failed writes, damaged runs

@pytest.mark.parametrize("flag", ["--save-fig", "--attention", "--grad-cam"])
def test_a_full_disk_keeps_the_figure_that_was_there(trained, tmp_path, flag):
    # Each figure went straight to its name: a full disk left a cut-short PNG in its place.
    data, ckpt = trained
    figure = tmp_path / "figure.png"
    figure.write_bytes(b"yesterday's figure")
    with files_limited_to(1000):  # the figures are larger: their writes fail
        code, _, err = run_cli(predict.main, [data / "roses" / "roses_0000.jpg", "--weights",
                                              ckpt, "--device", "cpu", flag, figure])
    line = one_error_line(code, err, status=1)
    assert line == (f"error: Cannot write {figure} (File too large); check the folder and the "
                    f"free space.")
    assert figure.read_bytes() == b"yesterday's figure"
    assert_only(tmp_path, ["figure.png"])


@pytest.mark.parametrize("suffix, magic", [(".pdf", b"%PDF"), (".svg", b"<?xml"),
                                           (".jpg", b"\xff\xd8\xff"), (".JPEG", b"\xff\xd8\xff"),
                                           (".png", b"\x89PNG")])
def test_a_figure_is_in_the_format_its_suffix_names(trained, tmp_path, suffix, magic):
    data, ckpt = trained
    figure = tmp_path / f"figure{suffix}"
    code, _, err = run_cli(predict.main, [data / "roses" / "roses_0000.jpg", "--weights", ckpt,
                                          "--device", "cpu", "--save-fig", figure])
    assert code == 0, err
    assert figure.read_bytes().startswith(magic)
    assert_only(tmp_path, [figure.name])


def copy_run(trained_demo, folder: Path) -> Path:
    """A copy of the session's demo run's checkpoints in folder, which it returns."""
    folder.mkdir(parents=True)
    for path in trained_demo.output_dir.glob("*.pth"):
        shutil.copy(path, folder / path.name)
    return folder


def cut_short(path: Path) -> None:
    """What a full disk or a killed copy leaves: the file's first kilobyte."""
    path.write_bytes(path.read_bytes()[:1000])


def test_a_damaged_best_pth_says_to_use_the_runs_other_checkpoints(trained_demo, tmp_path):
    run = copy_run(trained_demo, tmp_path / "run")
    image = trained_demo.data / "roses" / "roses_0002.jpg"
    cut_short(run / "best.pth")
    code, out, err = run_cli(predict.main, [image, "--weights", run / "best.pth", "--device",
                                            "cpu"])
    line = one_error_line(code, err)
    assert line.startswith(f"error: {run / 'best.pth'} is not a readable "), line
    assert line.endswith(f"it is truncated or corrupt; pass one of the run's model-*.pth in "
                         f"{run} instead, or rebuild it by running the run's train.py command "
                         f"again with --resume auto --output-dir {run}."), line
    assert out == ""
    cut_short(run / "model-1.pth")
    code, out, err = run_cli(predict.main, [image, "--weights", run / "model-1.pth",
                                            "--device", "cpu"])
    assert one_error_line(code, err).endswith(
        f"pass another of the run's checkpoints in {run} instead (best.pth or another "
        f"model-*.pth).")


def test_by_default_a_damaged_best_pth_is_passed_over_for_the_newest_epoch(
        trained_demo, tmp_path, monkeypatch):
    image = trained_demo.data / "roses" / "roses_0002.jpg"
    _, expected, _ = run_cli(predict.main, [image, "--weights",
                                            trained_demo.output_dir / "model-1.pth",
                                            "--device", "cpu"])
    cut_short(copy_run(trained_demo, tmp_path / "weights") / "best.pth")
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(predict.main, [image, "--device", "cpu"])
    assert code == 0, err
    assert parse_classes(out) == parse_classes(expected)
    note = err.strip()
    assert len(note.splitlines()) == 1, err
    assert note.startswith(f"note: {Path('weights') / 'best.pth'} is not a readable "), note
    assert note.endswith(f"Using {Path('weights') / 'model-1.pth'}, the run's newest epoch "
                         f"checkpoint, instead."), note
