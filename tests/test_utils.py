"""utils.py as the reproduced repository's train.py calls it: its arguments, its return values."""

from __future__ import annotations

import pytest
import torch
from conftest import random_loader, tiny_model
from torch.utils.data import DataLoader

from utils import FeatureCache, evaluate, read_split_data, train_one_epoch


def test_read_split_data_unpacks_as_four_lists(demo_flowers):
    split = read_split_data(str(demo_flowers))
    train_images_path, train_images_label, val_images_path, val_images_label = split
    assert train_images_path == [str(p) for p in split.train_images]
    assert val_images_path == [str(p) for p in split.val_images]
    assert train_images_label == split.train_labels and val_images_label == split.val_labels
    assert all(isinstance(path, str) for path in train_images_path + val_images_path)
    assert len(train_images_path) == len(train_images_label) == 50
    assert len(val_images_path) == len(val_images_label) == 10
    assert len(split) == 4 and split[0] == train_images_path and split[3] == val_images_label
    assert split[2:] == (val_images_path, val_images_label)


def loader() -> DataLoader:
    return random_loader(10)  # batches of 4, 4 and 2


def test_the_loops_called_as_the_reproduced_train_py_return_loss_and_accuracy():
    model = tiny_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    device = torch.device("cpu")

    stats = train_one_epoch(model=model, optimizer=optimizer, data_loader=loader(),
                            device=device, epoch=0)
    train_loss, train_acc = stats
    assert (train_loss, train_acc) == (stats.loss, stats.acc)
    assert isinstance(train_loss, float) and isinstance(train_acc, float)
    assert stats.samples == 10 and stats.images_per_sec > 0

    # Positional, with the device as a string and the result indexed.
    stats = train_one_epoch(model, optimizer, loader(), "cpu", 1)
    assert (stats[0], stats[1], len(stats)) == (stats.loss, stats.acc, 2)
    assert evaluate(model, loader(), "cpu", 1)[1] == evaluate(model, loader(), device, 1).acc

    stats = evaluate(model=model, data_loader=loader(), device=device, epoch=0)
    val_loss, val_acc = stats
    assert (val_loss, val_acc) == (stats.loss, stats.acc)
    assert isinstance(val_loss, float) and isinstance(val_acc, float)
    assert stats.samples == 10 and stats.confusion is None
    with torch.no_grad():  # the mean over samples, not over batches
        logits = torch.cat([model(images) for images, _ in loader()])
        labels = torch.cat([labels for _, labels in loader()])
    assert val_loss == pytest.approx(torch.nn.functional.cross_entropy(logits, labels).item())
    assert val_acc == (logits.argmax(1) == labels).sum().item() / 10


def test_cached_features_give_the_numbers_of_a_full_evaluation():
    model = tiny_model()
    device = torch.device("cpu")
    full = evaluate(model, loader(), device, 0, num_classes=3)
    cache = FeatureCache()
    first = cache.evaluate(model, loader(), device, 0, num_classes=3)
    assert cache.batches is not None
    torch.nn.init.normal_(model.head.weight)  # the head trains between epochs; cached: only it
    second = cache.evaluate(model, loader(), device, 1, num_classes=3)
    again = evaluate(model, loader(), device, 1, num_classes=3)
    for cached, direct in ((first, full), (second, again)):
        assert cached.acc == direct.acc and cached.samples == direct.samples == 10
        assert cached.loss == pytest.approx(direct.loss, rel=1e-6)
        assert torch.equal(cached.confusion, direct.confusion)
    assert full.confusion.sum() == 10
