"""The CUDA-only paths: CUDA graphs (cuda_graphs.py), the frozen paths and checkpoint copies
from the GPU.

CudaGraphModel: which batches replay the graphs, and that training is unchanged.

Capturing needs CUDA. On the CPU the capture function is replaced by one that records what
it is given and runs the module eagerly, which tests the routing (training batches to the
graphs, the short last batch padded; evaluation and no-grad calls eagerly) and the fallback
when capturing fails, for the plain model and for a torch.compile'd one (--compile). The CUDA
tests (run on a GPU machine) compare real graphs with eager steps (also of a model with
gradient checkpointing), train.py's compiled and graphed run with its graphed-only one, and
the frozen backbone's grouped and cached paths with the per-batch loop.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import assert_same_training, epoch_checkpoints, random_loader, tiny_model, train_argv
from torch.utils.data import DataLoader

import train
from checkpoints import CheckpointWriter
from cuda_graphs import CudaGraphModel, use_cuda_graphs
from distributed import Distributed
from utils import EpochStats, StepSettings, evaluate, train_one_epoch
from vit_model import create_model

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def batches(device: str = "cpu", batch_size: int = 4) -> DataLoader:
    # 11 images in batches of 4: two full batches, then one of 3.
    return random_loader(11, batch_size, device=device)


class RecordingCapture:
    """Stands in for torch.cuda.make_graphed_callables: records, then runs eagerly."""

    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.captured_shapes: list[torch.Size] = []
        self.replayed_shapes: list[torch.Size] = []

    def __call__(self, module, sample_args):
        if self.fail:
            raise RuntimeError("operation not permitted when stream is capturing")
        self.captured_shapes.append(sample_args[0].shape)
        assert not torch.is_autocast_cache_enabled() or not torch.is_autocast_enabled()

        def replay(images):
            self.replayed_shapes.append(images.shape)
            return module(images)
        return replay


def train_epochs(model, loader, device: str, epochs: int = 2, amp_dtype=None,
                 accum_steps: int = 1) -> list[EpochStats]:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    settings = StepSettings(amp_dtype=amp_dtype, accum_steps=accum_steps)
    return [train_one_epoch(model, optimizer, loader, torch.device(device), epoch, settings)
            for epoch in range(epochs)]


def test_training_batches_replay_padded_and_the_rest_run_eagerly():
    eager = tiny_model()
    graphed_model = copy.deepcopy(eager)
    capture = RecordingCapture()
    graphed = CudaGraphModel(graphed_model, capture=capture)

    eager_stats = train_epochs(eager, batches(), "cpu")
    graphed_stats = train_epochs(graphed, batches(), "cpu")

    assert capture.captured_shapes == [torch.Size([4, 3, 16, 16])]  # once, not per epoch
    # Two epochs x three batches, all replayed: the batch of 3 padded to the captured 4.
    assert capture.replayed_shapes == [torch.Size([4, 3, 16, 16])] * 6
    assert [s.samples for s in graphed_stats] == [11, 11]
    assert [s.acc for s in graphed_stats] == [s.acc for s in eager_stats]
    for e, g in zip(eager_stats, graphed_stats, strict=True):  # the padding changes nothing
        assert g.loss == pytest.approx(e.loss, rel=1e-6)
    for a, b in zip(eager.parameters(), graphed_model.parameters(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)

    evaluate(graphed, batches(), torch.device("cpu"), 0)  # eval mode: never the graphs
    with torch.no_grad():
        graphed.train()(torch.zeros(4, 3, 16, 16))        # no gradients: never the graphs
    graphed(torch.zeros(5, 3, 16, 16)).sum().backward()   # larger than captured: eagerly
    assert len(capture.replayed_shapes) == 6


def test_a_failed_capture_is_noted_once_and_training_goes_on_eagerly():
    eager = tiny_model()
    graphed_model = copy.deepcopy(eager)
    notes = []
    graphed = CudaGraphModel(graphed_model, capture=RecordingCapture(fail=True),
                             log=notes.append)

    eager_stats = train_epochs(eager, batches(), "cpu")
    graphed_stats = train_epochs(graphed, batches(), "cpu")

    assert len(notes) == 1 and "could not be captured" in notes[0]
    assert "training without them" in notes[0]
    assert [s.loss for s in graphed_stats] == [s.loss for s in eager_stats]


def test_train_py_says_why_cuda_graphs_are_off_on_the_cpu(demo_flowers, tmp_path, capsys):
    assert train.main(train_argv(demo_flowers, tmp_path, cuda_graphs=True, lr=None)) == 0
    assert "note: --cuda-graphs is off: they need a CUDA device" in capsys.readouterr().out
    assert (tmp_path / "weights" / "model-0.pth").is_file()


@pytest.mark.parametrize(("flags", "device", "world_size", "expected", "note"), [
    ([], "cuda", 1, True, None),                      # the default on one GPU
    (["--no-cuda-graphs"], "cuda", 1, False, None),
    ([], "cuda", 2, False, None),                     # torchrun: quietly off
    (["--cuda-graphs"], "cuda", 2, False, "DistributedDataParallel"),
    (["--compile"], "cuda", 1, True, None),           # captured around the compiled model
    (["--cuda-graphs", "--compile"], "cuda", 1, True, None),
    (["--no-cuda-graphs", "--compile"], "cuda", 1, False, None),
    (["--compile"], "cuda", 2, False, None),
    (["--cuda-graphs", "--compile"], "cuda", 2, False, "DistributedDataParallel"),
    ([], "cpu", 1, False, None),
    (["--cuda-graphs"], "cpu", 1, False, "need a CUDA device"),
    (["--cuda-graphs", "--compile"], "cpu", 1, False, "need a CUDA device"),
])
def test_when_train_py_uses_cuda_graphs(flags, device, world_size, expected, note):
    args = train.get_args_parser().parse_args(flags)
    notes = []
    used = use_cuda_graphs(args.cuda_graphs, torch.device(device),
                           Distributed(world_size=world_size), notes.append)
    assert used is expected
    assert (notes == []) if note is None else (len(notes) == 1 and note in notes[0])


# ------------------------------------------------- CUDA graphs around a torch.compile'd model

@pytest.fixture
def fresh_dynamo():
    """torch.compile's caches emptied before and after, so that what a test counts is its own."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


class CountingBackend:
    """A torch.compile backend that runs the captured graph as it is (no code generation)
    and records the batch size of each compilation's image input."""

    def __init__(self) -> None:
        self.batch_sizes: list[int] = []

    def __call__(self, graph_module, example_inputs):
        self.batch_sizes += [int(t.shape[0]) for t in example_inputs
                             if isinstance(t, torch.Tensor) and t.shape[1:] == (3, 16, 16)]
        return graph_module.forward


def per_sample_model() -> torch.nn.Module:
    # What is under test is the wrapping, not the compiler on a ViT (test_train compiles the
    # demo ViT through train.py): a two-layer network traces in a fifth of the time of
    # even tiny_model(), and, like a ViT, never mixes samples, so padding changes nothing.
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 16 * 16, 16),
                               torch.nn.GELU(), torch.nn.Linear(16, 3))


def test_graphs_around_a_compiled_model_replay_it_at_one_shape(fresh_dynamo):
    plain = per_sample_model()
    compiled_model = copy.deepcopy(plain)
    backend, capture = CountingBackend(), RecordingCapture()
    # As train.py wraps with --compile: the graphs around the compiled module.
    graphed = CudaGraphModel(torch.compile(compiled_model, backend=backend), capture=capture)

    plain_stats = train_epochs(plain, batches(), "cpu", epochs=1)
    graphed_stats = train_epochs(graphed, batches(), "cpu", epochs=1)

    # Compiled once, at the captured size: the short last batch (3) is padded to 4 and so
    # never costs a second compilation (mode="reduce-overhead" would compile and capture it).
    assert backend.batch_sizes == [4]
    assert capture.replayed_shapes == [torch.Size([4, 3, 16, 16])] * 3
    for p, g in zip(plain_stats, graphed_stats, strict=True):
        assert g.samples == p.samples == 11 and g.acc == p.acc
        assert g.loss == pytest.approx(p.loss, rel=1e-6)
    for a, b in zip(plain.parameters(), compiled_model.parameters(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


def test_a_failed_capture_of_a_compiled_model_trains_on_the_compiled_model(fresh_dynamo):
    plain = per_sample_model()
    compiled_model = copy.deepcopy(plain)
    backend, notes = CountingBackend(), []
    graphed = CudaGraphModel(torch.compile(compiled_model, backend=backend),
                             capture=RecordingCapture(fail=True), log=notes.append)
    images, labels = next(iter(batches()))

    for model in (plain, graphed):
        torch.nn.functional.cross_entropy(model.train()(images), labels).backward()

    assert len(notes) == 1 and "could not be captured" in notes[0]
    assert backend.batch_sizes == [4]  # the step ran through the compiled module
    for a, b in zip(plain.parameters(), compiled_model.parameters(), strict=True):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-7)


def test_train_py_captures_the_compiled_model_and_saves_the_plain_one():
    # CUDA only in name: wrapping compiles nothing and captures nothing until a batch comes.
    args = train.get_args_parser().parse_args(["--compile", "--accum-steps", "2"])
    model, notes = tiny_model(), []
    setup = train.Setup(torch.device("cuda"), Distributed(world_size=1), notes.append)
    wrappers = train.wrap_for_training(model, args, setup, StepSettings(amp_dtype=None))

    graphed = wrappers.model_for_training
    assert isinstance(graphed, CudaGraphModel) and graphed.accumulate
    assert graphed.model is wrappers.model_for_eval            # the compiled module ...
    assert wrappers.model_for_eval._orig_mod is model          # ... of the plain one
    assert wrappers.model is model and wrappers.ddp is None
    assert notes == ["CUDA graphs: training steps replay one captured forward and backward "
                     "of the compiled model."]
    assert list(wrappers.model.state_dict()) == list(tiny_model().state_dict())
    assert not any("_orig_mod." in key for key in wrappers.model.state_dict())


def test_train_py_captures_at_the_training_batch_before_any_batch_comes():
    # CUDA only in name, with a stand-in capture: train.py captures before its loaders start
    # (their pin-memory thread would break a capture), at --batch-size and the model's size.
    args = train.get_args_parser().parse_args(["--batch-size", "8"])
    setup = train.Setup(torch.device("cuda"), Distributed(world_size=1), print)
    wrappers = train.wrap_for_training(tiny_model(), args, setup, StepSettings(amp_dtype=None))
    capture = wrappers.model_for_training.capture = RecordingCapture()
    train.capture_cuda_graphs(wrappers, args.batch_size, torch.device("cpu"))
    assert capture.captured_shapes == [torch.Size([8, 3, 16, 16])]

    train_epochs(wrappers.model_for_training, batches(), "cpu", epochs=1)  # batches of 4
    assert capture.captured_shapes == [torch.Size([8, 3, 16, 16])]  # not captured again
    assert capture.replayed_shapes == [torch.Size([8, 3, 16, 16])] * 3  # padded to 8


@cuda
@pytest.mark.parametrize(("amp_dtype", "accum_steps"),
                         [(None, 1), (torch.bfloat16, 1), (None, 2)])
def test_cuda_graphs_train_like_eager_steps(amp_dtype, accum_steps):
    torch.backends.cudnn.benchmark = False  # the same convolution kernels on both sides
    eager = tiny_model().cuda()
    graphed_model = copy.deepcopy(eager)
    graphed = CudaGraphModel(graphed_model, amp_dtype, accumulate=accum_steps > 1)
    # Batches of 2: with accumulation over 2, both micro-batches of a step are replays.
    size = 4 if accum_steps == 1 else 2
    common = dict(amp_dtype=amp_dtype, accum_steps=accum_steps)
    eager_stats = train_epochs(eager, batches("cuda", size), "cuda", **common)
    graphed_stats = train_epochs(graphed, batches("cuda", size), "cuda", **common)

    assert graphed.graphed is not None and not graphed.failed
    tolerance = 1e-5 if amp_dtype is None else 2e-2
    for e, g in zip(eager_stats, graphed_stats, strict=True):
        assert g.samples == e.samples == 11
        assert g.loss == pytest.approx(e.loss, rel=tolerance, abs=tolerance)
    for a, b in zip(eager.parameters(), graphed_model.parameters(), strict=True):
        torch.testing.assert_close(b, a, rtol=tolerance, atol=tolerance)


@cuda
def test_graphs_of_a_checkpointed_model_train_like_eager_steps():
    # --grad-checkpointing with CUDA graphs: the capture records the blocks' recomputation in
    # the backward graph, and the steps stay those of the plain eager model.
    torch.backends.cudnn.benchmark = False
    eager = tiny_model().cuda()
    graphed_model = copy.deepcopy(eager)
    graphed_model.set_grad_checkpointing(True)
    graphed = CudaGraphModel(graphed_model)
    eager_stats = train_epochs(eager, batches("cuda"), "cuda")
    graphed_stats = train_epochs(graphed, batches("cuda"), "cuda")

    assert graphed.graphed is not None and not graphed.failed
    for e, g in zip(eager_stats, graphed_stats, strict=True):
        assert g.loss == pytest.approx(e.loss, rel=1e-5, abs=1e-5)
    for a, b in zip(eager.parameters(), graphed_model.parameters(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


@cuda
@pytest.mark.parametrize(("fast", "says"), [
    (("--frozen-batch", "24"), "Frozen backbone: one forward pass per 24 images"),
    (("--no-augment", "--cache-train-features"), "computed once and kept on cuda"),
], ids=["grouped", "cached"])
def test_the_frozen_paths_give_the_per_batch_updates_on_cuda(demo_flowers, tmp_path, capsys,
                                                             fast, says):
    # float32 without TF32 on both sides, and CUDA graphs off (they take precedence over both
    # paths): what is left is cuBLAS's choice of kernels for other batch sizes.
    common = dict(device="cuda", epochs=2, freeze_layers=True, lr=0.05, amp=False, tf32=False,
                  cuda_graphs=False)
    same_data = [flag for flag in fast if flag == "--no-augment"]
    assert train.main(train_argv(demo_flowers, tmp_path / "plain", *same_data, **common)) == 0
    capsys.readouterr()
    assert train.main(train_argv(demo_flowers, tmp_path / "fast", *fast, **common)) == 0
    assert says in capsys.readouterr().out
    assert_same_training(epoch_checkpoints(tmp_path / "plain", 2),
                         epoch_checkpoints(tmp_path / "fast", 2), atol=1e-4)


@cuda
def test_train_py_captures_on_cuda(demo_flowers, tmp_path, capsys):
    assert train.main(train_argv(demo_flowers, tmp_path, cuda_graphs=True, epochs=2,
                                 device="cuda", workers=None, lr=None)) == 0
    out = capsys.readouterr().out
    assert "CUDA graphs: training steps replay" in out
    assert "could not be captured" not in out
    checkpoint = torch.load(tmp_path / "weights" / "model-1.pth", weights_only=True)
    assert checkpoint["samples"] == {"train": 50, "val": 10}
    assert not any(key.startswith(("model.", "graphed.")) for key in checkpoint["model"])


@cuda
def test_train_py_captures_beside_a_pinned_memory_loader_on_cuda(demo_flowers, tmp_path,
                                                                 capsys):
    # The CPU loader (--no-device-data) with workers and a pin-memory thread, which allocates
    # pinned memory: a capture while it runs fails, and the thread's error ends the run.
    assert train.main(train_argv(demo_flowers, tmp_path, epochs=2, device="cuda", workers=2,
                                 lr=None, device_data=False, cuda_graphs=True)) == 0
    out = capsys.readouterr().out
    assert "CUDA graphs: training steps replay" in out
    assert "could not be captured" not in out


@cuda
def test_no_tf32_turns_tf32_off_after_a_run_that_had_it(tmp_path):
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    try:
        for flag, expected in (("--tf32", True), ("--no-tf32", False)):
            train.set_up(train.get_args_parser().parse_args([flag, "--device", "cuda"]))
            assert (torch.backends.cuda.matmul.allow_tf32,
                    torch.backends.cudnn.allow_tf32) == (expected, expected)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


@cuda
def test_train_py_captures_the_compiled_model_on_cuda(demo_flowers, tmp_path, capsys):
    # float32 on both sides (no autocast, no TF32), so that the only difference is the
    # compiler's kernels.
    common = dict(epochs=2, device="cuda", workers=None, lr=None, amp=False, tf32=False,
                  cuda_graphs=True)
    runs = {}
    for compiled in (False, True):
        out = tmp_path / ("compiled" if compiled else "graphs")
        assert train.main(train_argv(demo_flowers, out, compile=compiled, **common)) == 0
        runs[compiled] = torch.load(out / "weights" / "model-1.pth", weights_only=True)
        printed = capsys.readouterr().out
        assert "could not be captured" not in printed
    assert "backward of the compiled model." in printed

    state = runs[True]["model"]
    assert not any(key.startswith(("_orig_mod.", "model.", "graphed.")) for key in state)
    create_model("vit_demo_patch8_64", num_classes=5).load_state_dict(state)  # strict
    assert runs[True]["samples"] == runs[False]["samples"] == {"train": 50, "val": 10}
    # The compiler fuses and reorders float32 sums (layer norms, softmax, matmul epilogues):
    # about 1e-6 relative per step, which 2 x 7 SGD steps of a 0.8M-parameter model do not
    # grow past 1e-3. An accuracy counts whole images: allow one of 10 validation images
    # whose two best logits lie that close to flip.
    for key in ("train_loss", "val_loss"):
        assert runs[True]["metrics"][key] == pytest.approx(runs[False]["metrics"][key],
                                                           rel=1e-3)
    for key in ("train_acc", "val_acc"):
        assert runs[True]["metrics"][key] == pytest.approx(runs[False]["metrics"][key],
                                                           abs=0.1 + 1e-9)


@cuda
def test_checkpoint_copies_from_the_gpu_are_the_values_at_save_time(tmp_path):
    weights = torch.randn(64, 1024, 1024, device="cuda")  # 256 MiB: the copy takes a while
    expected = weights.cpu()
    writer = CheckpointWriter()
    writer.save({"model": {"w": weights}}, [tmp_path / "a.pth"])
    weights.mul_(0.0)  # queued after the copy on the same stream: must not reach the file
    writer.close()
    saved = torch.load(tmp_path / "a.pth", weights_only=True)["model"]["w"]
    assert torch.equal(saved, expected)
