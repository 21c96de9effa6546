"""Synthesis around the methods: real-image folders, FDDA's hybrid mode, the cache, errors, sharding."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from PIL import Image
from synthesis_helpers import (
    INPUT_SHAPE,
    NUM_CLASSES,
    SHARDED_RUNS,
    FeatureMapNet,
    NoBNNet,
    sharded_worker,
    tiny_net,
    write_image_folder,
)

from dfq_deploy.config import SynthesisConfig
from dfq_deploy.errors import BadInputError
from dfq_deploy.io.calibration_set import CalibrationSet
from dfq_deploy.synthesis import bn_mismatch, synthesize, synthesize_cached

ASSETS = Path(__file__).resolve().parents[1].parent / "shared" / "assets"
HALF = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


def run(model, method, *, normalize=None, input_shape=INPUT_SHAPE, **kw):
    kw.setdefault("iterations", 8)
    kw.setdefault("num_images", 8)
    kw.setdefault("batch_size", 8)
    return synthesize(
        model, config=SynthesisConfig(method=method, **kw), input_shape=input_shape, progress=False, normalize=normalize
    )


def test_folder_reads_imagefolder_layout_resized_and_normalised(tmp_path):
    root = write_image_folder(tmp_path / "imgs", {"b_cls": 2, "a_cls": 3})
    Image.new("RGB", (20, 12), (255, 0, 0)).save(root / "a_cls" / "red.png")
    calib = run(tiny_net(), "folder", calib_images=str(root), num_images=50, normalize=HALF)
    assert calib.images.shape == (6, *INPUT_SHAPE)  # all 6 images: the folder has fewer than asked
    assert sorted(calib.labels.tolist()) == [0, 0, 0, 0, 1, 1]  # a_cls sorts first: label 0
    assert calib.meta["classes"] == ["a_cls", "b_cls"]
    red = torch.tensor([1.0, -1.0, -1.0]).view(3, 1, 1).expand(INPUT_SHAPE)
    assert any(torch.allclose(img, red) for img in calib.images)


def test_folder_flat_layout_has_no_labels_and_honours_num_images(tmp_path):
    root = tmp_path / "flat"
    root.mkdir()
    for i in range(5):
        Image.new("RGB", (12, 12), (i * 40, 0, 0)).save(root / f"{i}.jpg")
    calib = run(tiny_net(), "folder", calib_images=str(root), num_images=3)
    assert len(calib) == 3 and calib.labels is None


@pytest.mark.parametrize("case", ["missing", "empty", "garbage"])
def test_bad_folders_are_user_errors(tmp_path, case):
    root = tmp_path / "imgs"
    if case != "missing":
        root.mkdir()
    if case == "garbage":
        (root / "broken.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(
        BadInputError, match={"missing": "not found", "empty": "no images", "garbage": "cannot read image"}[case]
    ):
        run(tiny_net(), "folder", calib_images=str(root))


def test_zeroq_without_batchnorm_says_what_to_use_instead():
    with pytest.raises(BadInputError, match="no BatchNorm layer, so zeroq has no statistics") as err:
        run(NoBNNet(), "zeroq")
    # The hint names the data-free method for models without BN first, then the baselines.
    assert "--calib prior" in str(err.value) and "noise" in str(err.value) and "--calib-images" in str(err.value)


def test_class_conditional_methods_need_classifier_output():
    with pytest.raises(BadInputError, match=r"\(N, num_classes\)"):
        run(FeatureMapNet(), "clusterq")


def test_bad_shape_and_generator_without_a_loss_are_user_errors(tmp_path):
    with pytest.raises(BadInputError, match="C, H, W"):
        run(tiny_net(), "noise", input_shape=(3, 12))
    with pytest.raises(BadInputError, match="'noise' has none") as err:
        run(tiny_net(), "noise", generator=True)
    assert "zeroq, clusterq or fdda" in err.value.hint
    root = write_image_folder(tmp_path / "imgs", {"a": 1})
    with pytest.raises(BadInputError, match="'folder' has none"):
        run(tiny_net(), "folder", calib_images=str(root), generator=True)


def test_fdda_hybrid_uses_one_real_image_per_class(tmp_path):
    root = write_image_folder(tmp_path / "real", {f"c{i}": 2 for i in range(NUM_CLASSES)})
    model = tiny_net()
    calib = run(model, "fdda", calib_images=str(root), num_images=32, batch_size=32, iterations=80, normalize=HALF)
    assert calib.meta["fdda_mode"] == "hybrid"
    assert [Path(p).name for p in calib.meta["real_images"]] == ["0.png"] * NUM_CLASSES
    with torch.no_grad():
        assert float((model(calib.images).argmax(1) == calib.labels).float().mean()) >= 0.9


def test_fdda_hybrid_needs_one_folder_per_class(tmp_path):
    root = write_image_folder(tmp_path / "real", {"only": 1, "two": 1})
    with pytest.raises(BadInputError, match="2 class folders but the model has 4 outputs"):
        run(tiny_net(), "fdda", calib_images=str(root), normalize=HALF)


def test_cache_hit_loads_the_same_set_and_key_follows_inputs(tmp_path):
    model = tiny_net()
    cache = tmp_path / "cache"

    def cached(seed=0, calib_images=None, method="zeroq"):
        config = SynthesisConfig(
            method=method, num_images=6, batch_size=6, iterations=4, seed=seed, calib_images=calib_images
        )
        return synthesize_cached(
            model,
            config=config,
            input_shape=INPUT_SHAPE,
            cache_dir=cache,
            model_hash="abc",
            progress=False,
            normalize=HALF,
        )

    first, second = cached(), cached()
    assert not first.meta["cache"]["hit"] and second.meta["cache"]["hit"]
    assert torch.equal(first.images, second.images)
    assert not cached(seed=1).meta["cache"]["hit"]
    assert not [p for p in cache.iterdir() if p.name.startswith(".")]  # no temp folders left behind

    root = write_image_folder(tmp_path / "imgs", {"a": 2})
    key = cached(method="folder", calib_images=str(root)).meta["cache"]["key"]
    assert cached(method="folder", calib_images=str(root)).meta["cache"]["hit"]
    Image.new("RGB", (16, 14), (1, 2, 3)).save(root / "a" / "0.png")  # same name, new content
    changed = cached(method="folder", calib_images=str(root))
    assert not changed.meta["cache"]["hit"] and changed.meta["cache"]["key"] != key


def test_two_ranks_make_the_requested_count(tmp_path):
    mp.spawn(sharded_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    for name in SHARDED_RUNS:
        ranks = [torch.load(tmp_path / f"{name}-rank{r}.pt", weights_only=True) for r in range(2)]
        for out in ranks:
            assert out["world"] == 2 and out["images"].shape == (10, *INPUT_SHAPE)
            assert (out["labels"] is None) == (name == "zeroq")
        assert torch.equal(ranks[0]["images"], ranks[1]["images"])
    for r in range(2):  # gradients 1 and 2 average to 1.5 on both ranks
        assert torch.equal(torch.load(tmp_path / f"grad-rank{r}.pt", weights_only=True), torch.full((2, 3), 1.5))
        # destroy_process_group really stopped gloo's threads; left running, one aborts the rank at exit.
        assert (tmp_path / f"threads-rank{r}.txt").read_text() == ""
    # Batch seeds depend on the global batch index only: zeroq gives the same set as one process.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        alone = run(tiny_net(), "zeroq", num_images=10, batch_size=4, iterations=6)
    finally:
        torch.set_num_threads(threads)
    zeroq = torch.load(tmp_path / "zeroq-rank0.pt", weights_only=True)["images"]
    assert torch.allclose(alone.images, zeroq, atol=1e-4)


@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")  # TorchScript: a format users still bring
def test_cli_synthesize_under_torchrun_shares_the_work_and_rank0_saves(tmp_path):
    model = tmp_path / "tiny.pt"
    torch.jit.save(torch.jit.trace(tiny_net(), torch.zeros(1, *INPUT_SHAPE)), model)
    out = tmp_path / "calib"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "dfq_deploy.cli.commands",
        "synthesize",
        str(model),
        "--input-shape",
        "3x12x12",
        "--calib",
        "zeroq",
        "--num-images",
        "10",
        "--synth-batch-size",
        "4",
        "--iterations",
        "3",
        "--out",
        str(out),
        "--no-progress",
    ]
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=120, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert done.returncode == 0, done.stderr[-3000:]
    calib = CalibrationSet.load(out)
    assert len(calib) == 10 and calib.images.shape[1:] == INPUT_SHAPE
    assert calib.meta["world_size"] == 2
    assert done.stdout.count("10 images (zeroq) saved") == 1  # rank 0 alone writes and reports


@pytest.mark.skipif(not (ASSETS / "cifar10").is_dir(), reason="../shared/assets/cifar10 not present")
def test_real_cifar_images_match_resnet20_bn_statistics_better_than_noise():
    from dfq_deploy.models.cifar_resnet import CIFAR10_MEAN, CIFAR10_STD, cifar_resnet, load_akamaster_checkpoint

    model = load_akamaster_checkpoint(cifar_resnet("resnet20"), str(ASSETS / "cifar10" / "resnet20-12fca82f.th"))
    real = run(
        model,
        "folder",
        calib_images=str(ASSETS / "cifar10" / "train-sample"),
        num_images=128,
        batch_size=64,
        input_shape=(3, 32, 32),
        normalize=(CIFAR10_MEAN, CIFAR10_STD),
    )
    noise = torch.randn(128, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    assert len(real.meta["bn_mismatch"]["layers"]) == 19
    assert real.meta["bn_mismatch"]["mean"] * 5 < bn_mismatch(model, noise)["mean"]
    assert len(set(real.labels.tolist())) == 10
