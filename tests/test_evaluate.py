"""Top-1 and agreement on the evaluation formats: assets-style npz, ImageFolder, and the real assets."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from dfq_deploy.analysis.evaluate import agreement, eval_batch_size, evaluate_top1, load_eval_set, predict
from dfq_deploy.errors import BadInputError
from dfq_deploy.runtimes.torch import TorchRunner

MEAN, STD = (0.5, 0.25, 0.125), (0.5, 0.5, 0.25)


class MeanColour(nn.Module):
    """Classifies an image by which channel has the highest mean: a model whose accuracy we know."""

    def forward(self, x):
        x = x * torch.tensor(STD).reshape(1, 3, 1, 1) + torch.tensor(MEAN).reshape(1, 3, 1, 1)
        return x.mean((2, 3))


def _coloured_images(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, n)
    x = rng.integers(0, 60, (n, 8, 8, 3)).astype(np.uint8)
    x[np.arange(n), :, :, labels] += 150
    return x, labels


def test_npz_top1_and_normalisation(tmp_path):
    x, y = _coloured_images(40)
    y_wrong = y.copy()
    y_wrong[:10] = (y_wrong[:10] + 1) % 3  # a quarter of the labels disagree with the colour
    np.savez(tmp_path / "set.npz", x=x, y=y_wrong)
    data = load_eval_set(tmp_path / "set.npz", input_shape=(3, 8, 8), mean=MEAN, std=STD)
    assert data.images.shape == (40, 3, 8, 8) and len(data) == 40
    pixel = (x[0, 0, 0, 1] / 255.0 - MEAN[1]) / STD[1]
    assert float(data.images[0, 1, 0, 0]) == pytest.approx(pixel, abs=1e-6)
    assert evaluate_top1(MeanColour(), data, batch_size=16) == pytest.approx(75.0)


def test_image_folder_labels_follow_sorted_class_names(tmp_path):
    x, y = _coloured_images(12, seed=1)
    for i, (image, label) in enumerate(zip(x, y, strict=False)):
        folder = tmp_path / ["a_red", "b_green", "c_blue"][label]
        folder.mkdir(exist_ok=True)
        Image.fromarray(image).save(folder / f"{i}.png")
    data = load_eval_set(tmp_path, input_shape=(3, 16, 16), mean=MEAN, std=STD, resize=True)  # 8 -> 16
    assert data.images.shape == (12, 3, 16, 16)
    assert sorted(data.labels.tolist()) == sorted(y.tolist())
    assert evaluate_top1(MeanColour(), data) == pytest.approx(100.0)


def test_runner_and_module_give_the_same_top1(tmp_path):
    x, y = _coloured_images(20, seed=2)
    np.savez(tmp_path / "set.npz", x=x, y=y)
    data = load_eval_set(tmp_path / "set.npz", input_shape=(3, 8, 8), mean=MEAN, std=STD)
    with TorchRunner(MeanColour(), input_shape=(3, 8, 8)) as runner:
        assert evaluate_top1(runner, data, batch_size=7) == evaluate_top1(MeanColour(), data)


def test_agreement_measures_disagreement():
    images = torch.randn(50, 3, 8, 8)
    model = MeanColour()
    same = agreement(model, model, images)
    assert same.top1_agreement == 1.0 and same.relative_l2 == 0.0

    class Swapped(nn.Module):  # channels 0 and 1 swapped: disagrees whenever one of them wins
        def forward(self, x):
            return model(x)[:, [1, 0, 2]]

    other = agreement(model, Swapped(), images)
    winners = model(images).argmax(1)
    assert other.top1_agreement == pytest.approx(float((winners == 2).float().mean()))
    assert other.relative_l2 > 0.01


def test_batches_shrink_with_the_image_and_do_not_change_the_outputs():
    assert eval_batch_size((3, 32, 32)) == eval_batch_size((3, 64, 64)) == 256
    assert eval_batch_size((3, 224, 224)) == 16 and eval_batch_size((3, 4096, 4096)) == 1
    assert eval_batch_size((1000,)) == 256  # not an image
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.LazyLinear(5))
    images = torch.randn(40, 3, 256, 256)  # 16 images a batch: 3 batches, the last one short
    net(images[:2])
    whole = torch.cat([net.eval()(images[:20]), net(images[20:])]).detach()
    assert torch.allclose(predict(net, images), whole, atol=1e-5)


def test_bad_sets_are_refused(tmp_path):
    with pytest.raises(BadInputError, match="no evaluation set"):
        load_eval_set(tmp_path / "missing.npz", input_shape=(3, 8, 8), mean=MEAN, std=STD)
    np.savez(tmp_path / "bad.npz", images=np.zeros((2, 8, 8, 3), np.uint8))
    with pytest.raises(BadInputError, match="'x'"):
        load_eval_set(tmp_path / "bad.npz", input_shape=(3, 8, 8), mean=MEAN, std=STD)


def test_real_resnet20_reaches_its_published_accuracy(assets):
    from dfq_deploy.models.cifar_resnet import CIFAR10_MEAN, CIFAR10_STD, cifar_resnet, load_akamaster_checkpoint

    model = load_akamaster_checkpoint(cifar_resnet("resnet20"), str(assets / "cifar10" / "resnet20-12fca82f.th"))
    data = load_eval_set(
        assets / "cifar10" / "test-lossless-1017.npz", input_shape=(3, 32, 32), mean=CIFAR10_MEAN, std=CIFAR10_STD
    )
    assert len(data) == 1017
    assert evaluate_top1(model, data) == pytest.approx(91.64, abs=0.01)  # the assets README's number
