"""Synthesis methods on a tiny BN classifier: losses fall, labels are honoured, the model is untouched."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from synthesis_helpers import INPUT_SHAPE, NUM_CLASSES, tiny_net

from dfq_deploy.config import SynthesisConfig
from dfq_deploy.synthesis import bn_mismatch, synthesize
from dfq_deploy.synthesis.bn_stats import BNInputCapture, RunningStats, trace_bn_layers
from dfq_deploy.synthesis.class_stats import ClassCentroids, DeepLayers
from dfq_deploy.synthesis.clusterq import ClusterQLoss
from dfq_deploy.synthesis.generator import ConditionalGenerator
from dfq_deploy.synthesis.job import Job
from dfq_deploy.synthesis.sharding import Shard
from dfq_deploy.synthesis.zeroq import input_prior


@pytest.fixture(scope="module")
def model():
    return tiny_net()


def make(model, method, **kw):
    kw.setdefault("num_images", 16)
    kw.setdefault("batch_size", 16)
    kw.setdefault("iterations", 120)
    return synthesize(model, config=SynthesisConfig(method=method, **kw), input_shape=INPUT_SHAPE, progress=False)


def objective_terms(model, images):
    """(BNS, input prior, FDDA's BNS') of ``images`` under ``model``."""
    layers, _ = trace_bn_layers(model, INPUT_SHAPE)
    with torch.no_grad(), BNInputCapture(layers) as capture:
        model(images)
        stats = RunningStats(layers)
        inputs = capture.captured()
        return float(stats.bns_loss(inputs)), float(input_prior(images)), float(stats.bns_mse_loss(inputs))


def agreement(model, calib) -> float:
    with torch.no_grad():
        return float((model(calib.images).argmax(1) == calib.labels).float().mean())


def test_noise_is_standard_gaussian_and_seeded(model):
    a, b = make(model, "noise", num_images=40), make(model, "noise", num_images=40)
    c = make(model, "noise", num_images=40, seed=1)
    assert a.images.shape == (40, *INPUT_SHAPE) and a.labels is None
    assert torch.equal(a.images, b.images) and not torch.equal(a.images, c.images)
    assert abs(float(a.images.mean())) < 0.05 and abs(float(a.images.std()) - 1) < 0.05


def test_zeroq_cuts_bn_statistics_loss_tenfold(model):
    noise = make(model, "noise")
    calib = make(model, "zeroq", iterations=250)
    bns0, prior0, _ = objective_terms(model, noise.images)
    bns1, prior1, _ = objective_terms(model, calib.images)
    assert bns1 * 10 <= bns0, (bns0, bns1)
    assert bns1 + prior1 < bns0 + prior0
    assert calib.meta["bn_mismatch"]["mean"] * 10 <= noise.meta["bn_mismatch"]["mean"]


def test_meta_records_how_the_set_was_made(model):
    calib = make(model, "zeroq", num_images=20, batch_size=8, iterations=5)
    meta = calib.meta
    assert len(calib) == 20 and calib.labels is None
    assert meta["method"] == "zeroq" and meta["seed"] == 0 and meta["config"]["batch_size"] == 8
    assert meta["wall_time_s"] > 0 and meta["images_per_second"] > 0 and meta["final_loss"] > 0
    rows = meta["bn_mismatch"]["layers"]
    assert [r["layer"] for r in rows] == ["features.1", "features.4", "features.7"]
    assert meta["bn_mismatch"]["mean"] == pytest.approx(sum(r["combined"] for r in rows) / 3)


def test_synthesis_leaves_the_model_as_it_was():
    model = tiny_net()
    model.train()
    model.head.weight.requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    make(model, "clusterq", iterations=4)
    assert model.training and all(m.training for m in model.modules())
    assert not model.head.weight.requires_grad and model.head.bias.requires_grad
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("method", ["zeroq", "clusterq", "fdda"])
def test_same_seed_gives_the_same_set_bit_for_bit(model, method):
    a = make(model, method, num_images=10, batch_size=5, iterations=12)
    b = make(model, method, num_images=10, batch_size=5, iterations=12)
    assert torch.equal(a.images, b.images)
    assert (a.labels is None and b.labels is None) or torch.equal(a.labels, b.labels)


@pytest.mark.parametrize("method", ["clusterq", "fdda"])
def test_class_conditional_images_are_classified_as_their_target(model, method):
    calib = make(model, method, num_images=32, batch_size=32, iterations=60)
    assert calib.labels is not None and set(calib.labels.tolist()) <= set(range(NUM_CLASSES))
    assert agreement(model, calib) >= 0.9
    noise = make(model, "noise", num_images=32)

    def warmup_objective(images):  # ClusterQ's L1, FDDA's mixed-label loss
        with torch.no_grad():
            ce = float(F.cross_entropy(model(images), calib.labels))
        bns, _, bns_mse = objective_terms(model, images)
        return ce + 0.1 * bns if method == "clusterq" else 0.5 * ce + 0.2 * bns_mse

    assert warmup_objective(calib.images) < 0.5 * warmup_objective(noise.images)


def test_fdda_data_free_mode_is_labelled_as_an_extension(model):
    calib = make(model, "fdda", iterations=10)
    assert calib.meta["fdda_mode"] == "data-free (dfq-deploy extension)"
    assert calib.meta["classes_with_center"] >= 1


def clusterq_objective(model):
    config = SynthesisConfig(method="clusterq")
    layers, out = trace_bn_layers(model, INPUT_SHAPE)
    job = Job(
        model=model,
        config=config,
        input_shape=INPUT_SHAPE,
        device=torch.device("cpu"),
        layers=layers,
        output_shape=tuple(out.shape),
        shard=Shard(0, 1, []),
        normalize=((0,) * 3, (1,) * 3),
        progress=False,
    )
    return ClusterQLoss(job, NUM_CLASSES), layers


def test_clusterq_centroids_are_per_class_and_not_the_bn_statistics(model):
    calib = make(model, "clusterq", num_images=32, batch_size=32, iterations=60)
    objective, layers = clusterq_objective(model)
    with torch.no_grad(), BNInputCapture(layers) as capture:
        logits = model(calib.images)
        deep = objective.deep.select(capture.captured())
        objective.start_centroids(deep, calib.labels, logits.argmax(1) == calib.labels)
    cents = objective.centroids
    assert bool(cents.known.all())
    global_mean = torch.cat([layer.mean for layer in objective.deep.layers])
    global_std = torch.cat([layer.std for layer in objective.deep.layers])
    for c in range(NUM_CLASSES):
        assert (cents.loc[c] - global_mean).abs().max() > 1e-2
        assert (cents.spread[c] - global_std).abs().max() > 1e-2
        for d in range(c + 1, NUM_CLASSES):
            assert (cents.loc[c] - cents.loc[d]).abs().max() > 1e-2


def test_clusterq_ema_moves_only_classes_with_correct_samples(model):
    objective, layers = clusterq_objective(model)
    images = torch.randn(8, *INPUT_SHAPE)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    with torch.no_grad(), BNInputCapture(layers) as capture:
        model(images)
        deep = objective.deep.select(capture.captured())
    objective.start_centroids(deep, labels, torch.ones(8, dtype=torch.bool))
    before_loc, before_spread = objective.centroids.loc.clone(), objective.centroids.spread.clone()
    # Only the samples of class 1 count as correct: class 1 moves, the others keep their centroid.
    correct = torch.tensor([False, False, True, False, False, False, False, False])
    shifted = [x + 1.0 for x in deep]
    objective.update_centroids(shifted, labels, correct)
    moved = (objective.centroids.loc - before_loc).abs().amax(1) > 0
    assert moved.tolist() == [False, True, False, False]
    mean, std, _ = objective.class_std_stats(shifted, labels, correct)
    expected = 0.8 * before_loc[1] + 0.2 * mean[1]
    assert torch.allclose(objective.centroids.loc[1], expected)
    assert torch.allclose(objective.centroids.spread[1], 0.8 * before_spread[1] + 0.2 * std[1])


def test_distorted_targets_change_every_draw():
    cents = ClassCentroids(3, 5, torch.device("cpu"))
    gen = torch.Generator().manual_seed(0)
    first = cents.distorted(0.5, 1.0, gen)
    second = cents.distorted(0.5, 1.0, gen)
    assert not torch.equal(first[0], second[0]) and not torch.equal(first[1], second[1])
    assert 0.3 < float(first[0].std()) < 0.8 and 0.6 < float(first[1].std()) < 1.6


def test_per_class_statistics_match_a_direct_computation():
    deep = DeepLayers(trace_bn_layers(tiny_net(), INPUT_SHAPE)[0])
    xs = [torch.randn(6, 12, 6, 6) * 2 + 1]
    labels = torch.tensor([0, 1, 1, 2, 2, 2])
    mean, var, count = deep.per_class(xs, labels, 4)
    assert count.tolist() == [1, 2, 3, 0]
    for c in range(3):
        sel = xs[0][labels == c]
        ref_var, ref_mean = torch.var_mean(sel, dim=(0, 2, 3), correction=0)
        assert torch.allclose(mean[c], ref_mean, atol=1e-5) and torch.allclose(var[c], ref_var, atol=1e-4)
    assert torch.equal(mean[3], torch.zeros(12))


def test_bn_mismatch_matches_a_hand_computation():
    model = tiny_net()
    images = torch.randn(10, *INPUT_SHAPE)
    bn = model.features[1]
    with torch.no_grad():
        x = model.features[0](images).double()
    var, mean = torch.var_mean(x, dim=(0, 2, 3), correction=0)
    std = (var + bn.eps).sqrt()
    ref_std = (bn.running_var.double() + bn.eps).sqrt()
    table = bn_mismatch(model, images, batch_size=3)
    row = table["layers"][0]
    assert row["channels"] == 8
    assert row["mean_mse"] == pytest.approx(float((mean - bn.running_mean.double()).square().mean()), rel=1e-4)
    assert row["std_mse"] == pytest.approx(float((std - ref_std).square().mean()), rel=1e-4)


def test_config_lr_and_iterations_override_the_method_defaults(model):
    calib = make(model, "zeroq", iterations=3, lr=0.01)
    assert calib.meta["iterations"] == 3 and calib.meta["lr"] == 0.01


def make_with_generator(model, method, **kw):
    kw.setdefault("num_images", 16)
    kw.setdefault("batch_size", 16)
    kw.setdefault("iterations", 40)
    return make(model, method, generator=True, **kw)


@pytest.mark.parametrize("method", ["zeroq", "clusterq", "fdda"])
def test_generator_training_loss_falls(model, method):
    calib = make_with_generator(model, method)
    meta = calib.meta
    assert meta["generator"] and meta["iterations"] == 40 and meta["lr"] == 1e-3
    assert meta["generator_parameters"] > 0
    curve = meta["generator_loss_curve"]  # mean loss over each tenth of training
    # After the warm-up clusterq/fdda add class terms with targets redrawn every step (a noise floor
    # that does not fall): the warm-up is where their loss must fall.
    warmup_points = len(curve) * meta.get("warmup_iterations", 40) // 40
    trained = curve[:warmup_points]
    assert len(trained) == (10 if method == "zeroq" else 8)
    assert trained[-1] < 0.75 * trained[0], curve


@pytest.mark.parametrize("method", ["clusterq", "fdda"])
def test_generator_images_are_classified_as_their_target(model, method):
    calib = make_with_generator(model, method, num_images=32, batch_size=32, iterations=30)
    assert calib.labels is not None and set(calib.labels.tolist()) <= set(range(NUM_CLASSES))
    assert agreement(model, calib) >= 0.9


@pytest.mark.parametrize("method", ["zeroq", "clusterq"])
def test_generator_same_seed_gives_the_same_set_bit_for_bit(model, method):
    a, b = (make_with_generator(model, method, num_images=10, batch_size=5, iterations=6) for _ in range(2))
    c = make_with_generator(model, method, num_images=10, batch_size=5, iterations=6, seed=1)
    assert torch.equal(a.images, b.images) and not torch.equal(a.images, c.images)
    assert (a.labels is None and b.labels is None) or torch.equal(a.labels, b.labels)


@pytest.mark.parametrize("method", ["zeroq", "fdda"])
def test_generator_makes_the_requested_count_for_an_odd_image_size(model, method):
    shape = (3, 13, 10)  # neither square nor a multiple of 4
    config = SynthesisConfig(method=method, generator=True, num_images=9, batch_size=4, iterations=3)
    calib = synthesize(model, config=config, input_shape=shape, progress=False)
    assert calib.images.shape == (9, *shape) and torch.isfinite(calib.images).all()
    assert (calib.labels is None) == (method == "zeroq")  # zeroq's generator is unconditional
    if calib.labels is not None:
        assert calib.labels.shape == (9,)


@pytest.mark.parametrize("shape", [(1, 7, 5), (3, 32, 32), (2, 3, 30)])
def test_generator_output_has_the_input_shape_and_unit_channel_statistics(shape):
    generator = ConditionalGenerator(shape, num_classes=3)
    images = generator(torch.randn(4, 256), torch.tensor([0, 1, 2, 0]))
    assert images.shape == (4, *shape)
    var, mean = torch.var_mean(images, dim=(0, 2, 3), correction=0)
    assert torch.allclose(mean, torch.zeros(shape[0]), atol=1e-4)
    assert torch.allclose(var, torch.ones(shape[0]), atol=1e-2)
    assert ConditionalGenerator(shape, num_classes=None)(torch.randn(1, 256)).shape == (1, *shape)
