"""Fault injection: damaged caches, full and read-only disks, locked and killed builds, bad configs,
mismatched evaluation sets, non-finite numbers. Each test checks the exit code, that the message is
one line without a traceback, and what is left on disk."""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import click
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from small_cnn import INPUT_SHAPE, SmallResNet
from tiny_models import quick_build

from dfq_deploy import api
from dfq_deploy.cli.commands import _run, main
from dfq_deploy.config import SynthesisConfig
from dfq_deploy.errors import EXIT_SIGINT, EXIT_SIGTERM, StorageError
from dfq_deploy.io.cache_store import DAMAGED_DIR, ENTRY_MANIFEST, CacheStore, CacheWarning, verify_entry
from dfq_deploy.io.calibration_set import TENSORS_FILE, CalibrationSet
from dfq_deploy.io.interrupts import FAULT_STAGE_ENV
from dfq_deploy.io.locks import StaleLockWarning
from dfq_deploy.report.schema import validate_report

REPO = Path(__file__).resolve().parents[1]
SHAPE = "x".join(map(str, INPUT_SHAPE))
FAST = quick_build(INPUT_SHAPE, cache=True)  # the cache is under test here


def _zeroq(iterations: int) -> list[str]:
    return [*FAST, "--calib", "zeroq", "--iterations", str(iterations)]  # the later --calib wins


SLOW_ZEROQ = _zeroq(100000)  # ends only by a signal


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "small.pt"
    torch.save(SmallResNet().eval(), path)
    return path


@pytest.fixture
def cache_dir(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("DFQ_DEPLOY_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_one_line_error(result, code: int, *fragments: str) -> None:
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.output
    for fragment in fragments:
        assert fragment in result.output, result.output


def leftovers(folder: Path) -> list[str]:
    """Temp files and lock files: what a clean exit never leaves."""
    return sorted(p.name for p in folder.rglob(".*") if p.name.endswith((".tmp", ".lock")))


# --- verified caches -------------------------------------------------------------------------------


def _only_entry(cache_dir: Path) -> Path:
    (entry,) = [p for p in (cache_dir / "synthesis").iterdir() if p.is_dir() and not p.name.startswith(".")]
    return entry


def test_a_truncated_cache_entry_is_moved_aside_and_made_again(model_file, cache_dir, tmp_path):
    first = invoke("build", model_file, "--out", tmp_path / "a", *FAST)
    assert first.exit_code == 0, first.output
    tensors = _only_entry(cache_dir) / TENSORS_FILE
    tensors.write_bytes(tensors.read_bytes()[: tensors.stat().st_size // 2])  # a copy that stopped half-way

    second = invoke("build", model_file, "--out", tmp_path / "b", *FAST)
    assert second.exit_code == 0, second.output
    assert "Traceback" not in second.output
    warning = [line for line in second.output.splitlines() if line.startswith("warning: cache entry")]
    assert len(warning) == 1 and "truncated" in warning[0] and "making it again" in warning[0]
    report = json.loads((tmp_path / "b" / "report.json").read_text())
    assert report["files"]["calibration"]["bytes"] > 0
    assert verify_entry(_only_entry(cache_dir)) is None, "the entry was made again, whole"
    assert len(list((cache_dir / "synthesis" / DAMAGED_DIR).iterdir())) == 1
    assert leftovers(cache_dir) == [] and leftovers(tmp_path / "b") == []


@pytest.fixture(scope="module")
def loaded(model_file):
    return api.load(model_file, trust_pickle=True, input_shape=INPUT_SHAPE)


def _synthesize(cache_dir: Path, loaded, seed: int = 0):
    config = SynthesisConfig(method="noise", num_images=4, seed=seed)
    return api.synthesize(loaded, config=config, cache_dir=cache_dir / "synthesis", progress=False)


def test_a_corrupted_cache_entry_of_the_same_size_fails_its_sha256(loaded, cache_dir):
    made = _synthesize(cache_dir, loaded)
    assert _synthesize(cache_dir, loaded).meta["cache"]["hit"]
    tensors = _only_entry(cache_dir) / TENSORS_FILE
    data = bytearray(tensors.read_bytes())
    data[len(data) // 2] ^= 0xFF
    tensors.write_bytes(bytes(data))
    with pytest.warns(CacheWarning, match="corrupted calibration.pt"):
        again = _synthesize(cache_dir, loaded)
    assert not again.meta["cache"]["hit"]
    assert torch.equal(again.images, made.images)
    assert _synthesize(cache_dir, loaded).meta["cache"]["hit"]


def test_an_entry_without_its_manifest_is_not_trusted(loaded, cache_dir):
    _synthesize(cache_dir, loaded)
    (_only_entry(cache_dir) / ENTRY_MANIFEST).unlink()
    with pytest.warns(CacheWarning, match="has no readable entry.json"):
        assert not _synthesize(cache_dir, loaded).meta["cache"]["hit"]


def test_an_entry_that_verifies_but_does_not_load_is_made_again(tmp_path):
    store = CacheStore(tmp_path / "engines")
    store.save("k" * 64, lambda folder: (folder / "plan.bin").write_bytes(b"not what read() expects"))

    def read(folder: Path) -> bytes:
        raise ValueError("unsupported engine version")

    with pytest.warns(CacheWarning, match="does not load: unsupported engine version"):
        value, hit = store.get_or_make(
            "k" * 64, make=lambda: b"new", read=read, write=lambda v, folder: (folder / "plan.bin").write_bytes(v)
        )
    assert (value, hit) == (b"new", False)
    assert (store.path_of("k" * 64) / "plan.bin").read_bytes() == b"new"


def test_cache_list_verify_and_clear(loaded, cache_dir):
    _synthesize(cache_dir, loaded, seed=0)
    _synthesize(cache_dir, loaded, seed=1)
    listed = invoke("cache", "list")
    assert listed.exit_code == 0 and "2 entries" in listed.output and "method=noise" in listed.output
    assert invoke("cache", "verify").exit_code == 0

    victim = sorted(p for p in (cache_dir / "synthesis").iterdir() if p.is_dir())[0] / TENSORS_FILE
    victim.write_bytes(b"")
    assert_one_line_error(invoke("cache", "verify"), StorageError.exit_code, "1 of 2 cache entries are damaged")

    kept = invoke("cache", "clear", "--older-than", "7d")
    assert kept.exit_code == 0 and "removed 0 entries" in kept.output
    assert_one_line_error(invoke("cache", "clear", "--older-than", "soon"), 2, "7d")
    cleared = invoke("cache", "clear")
    assert cleared.exit_code == 0 and "removed 2 entries" in cleared.output
    assert [p for p in (cache_dir / "synthesis").iterdir()] == []


# --- the file system refuses -----------------------------------------------------------------------


def test_an_os_error_no_stage_caught_is_a_storage_error(tmp_path):
    @click.command()
    @_run
    def write_into_nowhere():
        (tmp_path / "missing" / "report.json").write_text("{}")

    result = CliRunner().invoke(write_into_nowhere, [])
    assert_one_line_error(result, 12, str(tmp_path / "missing" / "report.json"), "No such file or directory", "hint:")


def test_storage_error_names_path_errno_text_and_a_hint():
    exc = StorageError.from_os_error(
        OSError(errno.ENAMETOOLONG, os.strerror(errno.ENAMETOOLONG)), path="/out/" + "x" * 300, action="write"
    )
    assert exc.message.startswith("cannot write /out/xxx") and exc.message.endswith("File name too long")
    assert "shorter" in exc.hint


@contextlib.contextmanager
def tmpfs(path: Path, *options: str):
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", ",".join(("size=1500k", *options)), "tmpfs", str(path)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.strip() or 'mount failed'})")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


@pytest.fixture(scope="module")
def big_head_model(tmp_path_factory) -> Path:
    """~1.3 MB of FP32 weights: its artifacts do not fit in a 1.5 MB disk."""
    from tiny_models import TinyResNet, settle_batchnorm

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("big") / "big.pt"
    torch.save(settle_batchnorm(TinyResNet(num_classes=20000), INPUT_SHAPE), path)
    return path


def test_a_full_disk_is_one_line_and_leaves_only_whole_artifacts(big_head_model, tmp_path):
    with tmpfs(tmp_path / "disk") as disk:
        result = invoke("build", big_head_model, "--out", disk / "out", "--no-cache", *FAST)
        assert_one_line_error(result, 12, "No space left on device", str(disk / "out"), "free space")
        on_disk = sorted(p.name for p in (disk / "out").iterdir())
        assert leftovers(disk) == [], "no temp file and no lock file survive"
        assert "model.qdq.onnx" not in on_disk or "model.fp32.onnx" in on_disk
        manifest = json.loads((disk / "out" / "manifest.json").read_text())
        assert set(manifest["artifacts"].values()) <= set(on_disk), "the manifest lists only files that are there"


def test_a_read_only_out_folder(model_file, tmp_path):
    with tmpfs(tmp_path / "ro", "ro") as disk:
        result = invoke("build", model_file, "--out", disk / "out", "--no-cache", *FAST)
        assert_one_line_error(result, 12, "Read-only file system", "writable folder")
        assert list(disk.iterdir()) == []


# --- malformed configs -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, text, where",
    [
        ("bad.yaml", "synthesis:\n  method: [noise\nquant:\n  bits: 8\n", "is not valid YAML at line 3, column 6"),
        ("tabs.yml", "synthesis:\n\tmethod: noise\n", "is not valid YAML at line 2, column 1"),
        ("bad.toml", "[synthesis]\nmethod = \n", "is not valid TOML: Invalid value (at line 2, column 10)"),
    ],
)
def test_a_malformed_config_names_file_line_and_column(model_file, tmp_path, name, text, where):
    config = tmp_path / name
    config.write_text(text)
    result = invoke("build", model_file, "--out", tmp_path / "o", "--config", config, *FAST)
    assert_one_line_error(result, 2, str(config), where)
    assert not (tmp_path / "o").exists()


def test_a_config_that_is_not_text(model_file, tmp_path):
    config = tmp_path / "binary.yaml"
    config.write_bytes(b"\xff\xfe\x00synthesis")
    assert_one_line_error(
        invoke("build", model_file, "--out", tmp_path / "o", "--config", config, *FAST), 2, "not UTF-8"
    )


# --- non-finite numbers ----------------------------------------------------------------------------


def test_nan_weights_are_named_at_load(tmp_path):
    torch.manual_seed(0)
    model = SmallResNet().eval()
    with torch.no_grad():
        model.block["conv1"].weight[0, 0, 0, 0] = float("nan")
        model.fc.bias[1] = float("inf")
    path = tmp_path / "nan.pt"
    torch.save(model, path)
    result = invoke("build", path, "--out", tmp_path / "o", *FAST)
    assert_one_line_error(
        result, 2, "NaN or infinite weights in 2 tensors", "block.conv1.weight (1 values)", "fc.bias (1 values)"
    )
    assert not (tmp_path / "o").exists()


def test_overflowing_activations_name_the_layer(loaded):
    from dfq_deploy.config import default_scheme
    from dfq_deploy.errors import BadInputError
    from dfq_deploy.io.calibration_set import CalibrationSet
    from dfq_deploy.quant.quantize import quantize

    torch.manual_seed(0)
    model = SmallResNet().eval()
    with torch.no_grad():
        model.head.weight.fill_(1e38)  # finite weights whose sums overflow float32
    calib = CalibrationSet(torch.randn(4, *INPUT_SHAPE))
    with pytest.raises(BadInputError, match=r"infinite activation values in the output of head"):
        quantize(model, calib, scheme=default_scheme("onnxruntime"), progress=False)
    nan_calib = CalibrationSet(torch.randn(4, *INPUT_SHAPE))
    nan_calib.images[2, 0, 0, 0] = float("nan")
    with pytest.raises(BadInputError, match=r"NaN or infinite pixels in 1 of its 4 images \(first: image 2\)"):
        api.quantize(loaded, nan_calib, progress=False)


def test_a_synthesis_loss_that_diverges_stops_with_a_clear_error(loaded):
    from dfq_deploy.errors import BadInputError

    config = SynthesisConfig(method="zeroq", num_images=4, batch_size=4, iterations=20, lr=1e30)
    with pytest.raises(BadInputError, match=r"the synthesis loss became (nan|inf) at step \d+ \(lr 1e\+30\)"):
        api.synthesize(loaded, config=config, progress=False)


# --- evaluation sets checked against the model -----------------------------------------------------


def _npz(path: Path, x: np.ndarray, y) -> Path:
    np.savez(path, x=x, y=np.asarray(y))
    return path


def test_an_eval_set_of_another_size_is_refused_unless_resized(model_file, tmp_path):
    h, w = INPUT_SHAPE[1:]
    big = _npz(tmp_path / "big.npz", np.zeros((3, 2 * h, 2 * w, 3), np.uint8), [0, 1, 2])
    result = invoke("build", model_file, "--out", tmp_path / "o", "--eval-set", big, "--no-cache", *FAST)
    assert_one_line_error(result, 2, f"holds {2 * w}x{2 * h} images, the model takes {w}x{h}", "--eval-resize")
    assert not (tmp_path / "o").exists()
    resized = invoke("eval", model_file, "--trust-pickle", "--input-shape", SHAPE, "--eval-set", big, "--eval-resize")
    assert resized.exit_code == 0 and json.loads(resized.output)["images"] == 3


@pytest.mark.parametrize(
    "x, y, expected",
    [
        (np.zeros((2, 16, 16, 3), np.uint8), [0, 5], "labels 0..5, the model has 5 output classes (labels 0..4)"),
        (np.zeros((2, 16, 16, 3), np.uint8), [-1, 0], "labels -1..0, the model has 5 output classes"),
        (np.zeros((0, 16, 16, 3), np.uint8), np.zeros(0, np.int64), "holds no images"),
        (np.zeros((2, 3, 16, 16), np.uint8), [0, 1], "holds 16-channel images"),
        (np.full((2, 16, 16, 3), 200.0, np.float32), [0, 1], "holds floats in [200, 200], expected uint8"),
        (np.zeros((2, 16, 16, 3), np.int32), [0, 1], "x has dtype int32, expected uint8"),
        (np.zeros((2, 16, 16, 3), np.uint8), [0.5, 1.0], "y has dtype float64, expected integer"),
    ],
)
def test_eval_set_mismatches_name_what_was_expected(model_file, tmp_path, x, y, expected):
    path = _npz(tmp_path / "set.npz", x, y)
    result = invoke("eval", model_file, "--trust-pickle", "--input-shape", SHAPE, "--eval-set", path)
    assert_one_line_error(result, 2, expected)


def test_channels_first_eval_set_gets_a_layout_hint(loaded, tmp_path):
    from dfq_deploy.analysis.evaluate import load_eval_set
    from dfq_deploy.errors import BadInputError

    path = _npz(tmp_path / "nchw.npz", np.zeros((2, 3, 16, 16), np.uint8), [0, 1])
    with pytest.raises(BadInputError) as info:
        load_eval_set(path, input_shape=INPUT_SHAPE, mean=(0, 0, 0), std=(1, 1, 1), num_classes=5)
    assert "looks N,C,H,W" in info.value.hint


# --- locks, signals and killed builds --------------------------------------------------------------

LOCK = ".dfq-deploy.lock"


def _spawn_build(model_file: Path, out: Path, *extra: str, fault_stage: str | None = None) -> subprocess.Popen:
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "tests")}
    if fault_stage is not None:
        env[FAULT_STAGE_ENV] = fault_stage
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "dfq_deploy.cli.commands",
            "build",
            str(model_file),
            "--out",
            str(out),
            *(extra or FAST),
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def _wait_for(condition, proc: subprocess.Popen, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"the build ended before {what}: {proc.communicate()}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _holds_lock(lock: Path, pid: int) -> bool:
    try:
        return json.loads(lock.read_text())["pid"] == pid
    except (OSError, ValueError, KeyError):
        return False


def test_a_locked_out_folder_refuses_or_queues_and_a_dead_holder_is_taken_over(model_file, cache_dir, tmp_path):
    """A build holds its folder (synthesizing until killed): a second build into it is refused naming
    the holder, ``--wait`` queues and, once the holder is SIGKILLed mid-synthesis, takes its lock over."""
    holder_out = tmp_path / "held"
    holder = _spawn_build(model_file, holder_out, *SLOW_ZEROQ)  # synthesizes until it is killed
    _wait_for(lambda: _holds_lock(holder_out / LOCK, holder.pid), holder, "the first build locks its folder")

    refused = invoke("build", model_file, "--out", holder_out, *FAST)
    assert_one_line_error(refused, 13, f"output folder {holder_out} is locked by pid {holder.pid}", "--wait")
    waiting: dict = {}
    waiter = threading.Thread(
        target=lambda: waiting.update(result=invoke("build", model_file, "--out", holder_out, "--wait", *FAST))
    )
    waiter.start()
    time.sleep(0.5)
    assert waiter.is_alive(), "--wait queues behind the holder"
    holder.kill()
    holder.wait(timeout=30)
    waiter.join(timeout=120)
    queued = waiting["result"]
    assert queued.exit_code == 0, queued.output
    assert "waiting for the lock on output folder" in queued.output
    assert f"took over the lock on output folder {holder_out} left by pid {holder.pid}" in queued.output
    assert (holder_out / "report.json").is_file() and leftovers(holder_out) == []


WRITE_QDQ = "write model.qdq.onnx"
# Every stage a build enters, in order, as io.interrupts.stage names them; sub-stages under their stage
# (and the cache entry's fault point, which only a build with a cold cache reaches).
BUILD_STAGES = {
    "load": (),
    "synthesize": ("cache_entry",),  # the calibration set's cache entry being made, its lock held
    "quantize": ("reconstruct",),
    "export": (WRITE_QDQ,),  # killed between writing the Q/DQ model's temp file and renaming it
    "deploy_and_profile": ("fidelity", "profile"),
    "evaluate": (),
    "layer_fidelity": (),
    "report": (),
}
KILL_STAGES = [name for stage, subs in BUILD_STAGES.items() for name in (stage, *subs)]
OUT_FILES = ["calibration", "model.fp32.onnx", "model.qdq.onnx", "report.json", "report.md"]
RECON_LOCK = ".reconstruction.pt.lock"


def _every_stage(root: Path, recon: Path) -> list[str]:
    """FAST plus the flags that make a build enter every stage: an eval set and a (checkpointed) reconstruction."""
    if not (root / "eval.npz").exists():
        x = np.random.default_rng(0).integers(0, 256, (4, *INPUT_SHAPE[1:], 3), dtype=np.uint8)
        _npz(root / "eval.npz", x, [0, 1, 2, 3])
    recon_flags = ["--reconstruct", "--recon-iterations", "2", "--recon-checkpoint", str(recon)]
    return [*FAST, "--eval-set", str(root / "eval.npz"), *recon_flags]


def _stages_before(stage: str) -> list[str]:
    """The manifest's stages a build killed on entering ``stage`` finished (its parent stage not)."""
    parent = next(top for top, subs in BUILD_STAGES.items() if stage in (top, *subs))
    return list(BUILD_STAGES)[: list(BUILD_STAGES).index(parent)]


def _files_before(stage: str) -> list[str]:
    """The artifacts a build has written on entering ``stage``: the calibration set after
    synthesize, both ONNX files after export, the reports only at the very end."""
    done = _stages_before(stage)
    files = (["calibration", "manifest.json"] if "synthesize" in done else []) + (
        ["model.fp32.onnx", "model.qdq.onnx"] if "export" in done else []
    )
    return sorted(files)


@dataclasses.dataclass
class Killed:
    pid: int
    returncode: int
    log: Path


@pytest.fixture(scope="module")
def killed_builds(model_file, tmp_path_factory) -> tuple[Path, dict[str, Killed]]:
    """A baseline build fills the synthesis cache and a reconstruction checkpoint, then one build per
    stage, each SIGKILLed by ``$DFQ_DEPLOY_FAULT_STAGE`` on entering it, all at once as children of
    one process that imported the toolchain for them (``fork_builds.py``); the cache and a copy of
    the checkpoint make their later stages quick."""
    root = tmp_path_factory.mktemp("killed")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("DFQ_DEPLOY_CACHE", str(root / "cache"))
        baseline = invoke("build", model_file, "--out", root / "baseline", *_every_stage(root, root / "recon"))
        assert baseline.exit_code == 0, baseline.output
    runs = []
    for stage in KILL_STAGES:
        shutil.copytree(root / "recon", root / stage / "recon")
        args = [
            "build",
            str(model_file),
            "--out",
            str(root / stage / "out"),
            *_every_stage(root, root / stage / "recon"),
        ]
        env = {FAULT_STAGE_ENV: stage, "DFQ_DEPLOY_CACHE": str(_cache_of(root, stage))}
        runs.append({"name": stage, "args": args, "env": env, "log": str(root / f"{stage}.log")})
    (root / "runs.json").write_text(json.dumps(runs))
    forked = subprocess.run(
        [sys.executable, str(REPO / "tests" / "fork_builds.py"), str(root / "runs.json")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env=os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "tests")},
    )
    assert forked.returncode == 0, forked.stderr
    results = json.loads(forked.stdout.splitlines()[-1])
    return root, {stage: Killed(pid, code, root / f"{stage}.log") for stage, (pid, code) in results.items()}


@pytest.mark.parametrize("stage", KILL_STAGES)
def test_a_build_killed_in_any_stage_leaves_whole_files_and_a_rerun_succeeds(
    killed_builds, model_file, monkeypatch, stage
):
    root, killed = killed_builds
    proc, out, recon = killed[stage], root / stage / "out", root / stage / "recon"
    assert proc.returncode == -signal.SIGKILL, f"the build was not killed in {stage}: {proc.log.read_text()}"

    # On disk: the finished artifacts, whole; the dead build's lock file; no temp file, but for the
    # whole one a build killed before its rename leaves (which the next build removes).
    temps = sorted(p.name for p in out.iterdir() if p.name.endswith(".tmp"))
    finished = ["model.fp32.onnx"] if stage == WRITE_QDQ else []  # written before the Q/DQ model
    assert sorted(set(p.name for p in out.iterdir()) - set(temps)) == sorted([LOCK, *_files_before(stage), *finished])
    assert _holds_lock(out / LOCK, proc.pid) and leftovers(out) == sorted([LOCK, *temps])
    if stage == WRITE_QDQ:
        (temp,) = temps
        assert temp.startswith(".model.qdq.onnx.")
        assert (out / temp).read_bytes() == (root / "baseline" / "model.qdq.onnx").read_bytes()
    else:
        assert temps == []
    if (out / "manifest.json").exists():
        manifest = json.loads((out / "manifest.json").read_text())
        assert list(manifest["stages"]) == _stages_before(stage), "a stage is recorded only once it finished"
        assert sorted(manifest["artifacts"].values()) == [f for f in _files_before(stage) if f != "manifest.json"]
    if (out / "calibration").exists():
        baseline = CalibrationSet.load(root / "baseline" / "calibration")
        assert torch.equal(CalibrationSet.load(out / "calibration").images, baseline.images)
    for name in ("model.fp32.onnx", "model.qdq.onnx"):
        if (out / name).exists():
            assert (out / name).read_bytes() == (root / "baseline" / name).read_bytes()
    cache = _cache_of(root, stage)
    assert leftovers(cache) == [] and all(verify_entry(e) is None for e in _entries(cache))
    if stage == "cache_entry":  # killed holding the entry's lock, before it wrote any of it
        (lock,) = (cache / "synthesis").iterdir()
        assert lock.suffix == ".lock" and _holds_lock(lock, proc.pid)
    assert leftovers(recon) == ([RECON_LOCK] if stage == "reconstruct" else [])

    # The same command again: the stale locks are taken over and the build finishes.
    monkeypatch.setenv("DFQ_DEPLOY_CACHE", str(cache))
    rerun = invoke("build", model_file, "--out", out, *_every_stage(root, recon))
    assert rerun.exit_code == 0, rerun.output
    assert f"took over the lock on output folder {out} left by pid {proc.pid}" in rerun.output
    assert ("took over the lock on reconstruction checkpoint" in rerun.output) == (stage == "reconstruct")
    assert ("took over the lock on cache entry" in rerun.output) == (stage == "cache_entry")
    (entry,) = _entries(cache)
    assert verify_entry(entry) is None and not list((cache / "synthesis").glob("*.lock"))
    report = json.loads((out / "report.json").read_text())
    validate_report(report)
    assert report["calibration"]["images"] == 4 and report["accuracy"]["images"] == 4
    assert all(block["resumed"] for block in report["quantization"]["reconstruction"]["blocks"])
    assert sorted(p.name for p in out.iterdir()) == sorted([*OUT_FILES, "manifest.json"])
    assert (out / "model.qdq.onnx").read_bytes() == (root / "baseline" / "model.qdq.onnx").read_bytes()
    assert json.loads((out / "manifest.json").read_text()).get("finished")
    assert leftovers(out) == [] and leftovers(recon) == []


def _cache_of(root: Path, stage: str) -> Path:
    """The shared synthesis cache the baseline filled; a cold one of its own for ``cache_entry``."""
    return root / stage / "cache" if stage == "cache_entry" else root / "cache"


def _entries(cache: Path) -> list[Path]:
    return [p for p in (cache / "synthesis").iterdir() if p.is_dir() and not p.name.startswith(".")]


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, EXIT_SIGINT), (signal.SIGTERM, EXIT_SIGTERM)])
def test_a_signal_ends_a_build_with_one_line(model_file, loaded, cache_dir, tmp_path, signum, code):
    # ``loaded`` has made torch.export import what it imports lazily: a signal that lands in an import
    # would leave a half-imported module behind in this (test) process.
    out = tmp_path / "o"
    stop = threading.Event()

    def signal_once_synthesizing():  # the cache entry's lock is taken just before synthesis starts
        while not stop.wait(0.05):
            if list((cache_dir / "synthesis").glob("*.lock")):
                os.kill(os.getpid(), signum)
                return

    watcher = threading.Thread(target=signal_once_synthesizing)
    watcher.start()
    try:
        result = invoke("build", model_file, "--out", out, *SLOW_ZEROQ)
    finally:
        stop.set()
        watcher.join()
    assert result.exit_code == code, result.output
    assert re.search(r"^interrupted at stage synthesize; nothing half-written$", result.output, re.M), result.output
    assert "Traceback" not in result.output
    assert not out.exists(), "stopped before its first artifact: nothing left"
    assert leftovers(cache_dir) == []


def test_two_writers_of_one_cache_entry_make_it_once(tmp_path):
    store = CacheStore(tmp_path / "engines")
    made, results = [], []

    def make() -> bytes:
        made.append(threading.get_ident())
        time.sleep(0.3)  # long enough for the other writer to arrive and wait on the entry's lock
        return b"plan"

    def get():
        results.append(
            store.get_or_make(
                "e" * 64,
                make=make,
                read=lambda folder: (folder / "p").read_bytes(),
                write=lambda value, folder: (folder / "p").write_bytes(value),
            )
        )

    threads = [threading.Thread(target=get) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(made) == 1 and sorted(hit for _, hit in results) == [False, True]
    assert all(value == b"plan" for value, _ in results)
    assert not list(store.directory.glob("*.lock"))


def test_save_once_keeps_the_entry_another_writer_finished(tmp_path):
    """What torchrun's rank 0 saves (made without the lock) does not replace an entry another job
    finished meanwhile; a damaged one is replaced."""
    store = CacheStore(tmp_path / "synthesis")
    first = store.save_once("s" * 64, lambda folder: (folder / "p").write_bytes(b"first"))
    created = json.loads((first / ENTRY_MANIFEST).read_text())["created"]
    store.save_once("s" * 64, lambda folder: (folder / "p").write_bytes(b"second"))
    assert (first / "p").read_bytes() == b"first"
    assert json.loads((first / ENTRY_MANIFEST).read_text())["created"] == created
    (first / "p").write_bytes(b"firsT")
    store.save_once("s" * 64, lambda folder: (folder / "p").write_bytes(b"second"))
    assert (first / "p").read_bytes() == b"second" and verify_entry(first) is None
    assert not list(store.directory.glob("*.lock")) and store.leftovers() == []


def test_a_cache_entry_whose_writer_was_killed_is_taken_over(tmp_path):
    """A writer SIGKILLed half-way through writing an entry leaves its lock and its temp folder: the
    next writer of that key takes the lock over, removes the temp folder and makes the entry whole."""
    key = "f" * 64
    dies_writing = (
        "import os, signal, sys\n"
        "from dfq_deploy.io.cache_store import CacheStore\n"
        "def write(value, folder):\n"
        "    (folder / 'p').write_bytes(value[:2])\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "CacheStore(sys.argv[1]).get_or_make(sys.argv[2], make=lambda: b'plan', write=write, read=None)\n"
    )
    killed = subprocess.run([sys.executable, "-c", dies_writing, str(tmp_path / "engines"), key], cwd=REPO)
    assert killed.returncode == -signal.SIGKILL
    store = CacheStore(tmp_path / "engines")
    (lock,) = store.directory.glob("*.lock")
    assert len(store.leftovers()) == 1 and store.path_of(key).exists() is False
    with pytest.warns(StaleLockWarning, match=f"took over the lock on cache entry {store.path_of(key)}"):
        value, hit = store.get_or_make(
            key,
            make=lambda: b"plan",
            read=lambda folder: (folder / "p").read_bytes(),
            write=lambda value, folder: (folder / "p").write_bytes(value),
        )
    assert (value, hit) == (b"plan", False)
    assert verify_entry(store.path_of(key), key=key) is None and (store.path_of(key) / "p").read_bytes() == b"plan"
    assert store.leftovers() == [] and not lock.exists()


def test_two_builds_sharing_a_cache_make_each_entry_once(model_file, cache_dir, tmp_path):
    """Two builds of one model into two folders, sharing the synthesis cache and a reconstruction
    checkpoint. The first is frozen (SIGSTOP by ``$DFQ_DEPLOY_FAULT_STAGE=cache_entry:stop``) holding
    the calibration set's cache entry until the second says it waits for that lock; then the second
    reads the set the first made, and resumes every block of the reconstruction the first finished
    (or the first resumes the second's: they race for the checkpoint's lock)."""
    recon = tmp_path / "recon"
    flags = [*_zeroq(20), "--reconstruct", "--recon-iterations", "2", "--recon-checkpoint", str(recon)]
    first = _spawn_build(model_file, tmp_path / "a", *flags, fault_stage="cache_entry:stop")
    _wait_for(lambda: _stopped(first.pid), first, "the first build stops holding the cache entry's lock")
    second = _spawn_build(model_file, tmp_path / "b", *flags)
    lines: list[str] = []
    waiting = threading.Event()

    def read_stderr():
        for line in second.stderr:
            lines.append(line)
            if line.startswith("waiting for the lock on cache entry"):
                waiting.set()
                return

    reader = threading.Thread(target=read_stderr)
    reader.start()
    try:
        reader.join(timeout=120)  # ends when the second build ends (or the wait's timeout)
        assert waiting.is_set(), "the second build did not wait for the entry: " + "".join(lines)
    finally:
        os.kill(first.pid, signal.SIGCONT)
    _, first_err = first.communicate(timeout=180)
    _, second_err = second.communicate(timeout=180)
    assert first.returncode == 0, first_err
    assert second.returncode == 0, second_err

    calibration = [json.loads((tmp_path / d / "calibration" / "calibration.json").read_text()) for d in "ab"]
    assert [c["cache"]["hit"] for c in calibration] == [False, True], "made by the first, read by the second"
    (entry,) = _entries(cache_dir)
    assert verify_entry(entry) is None and leftovers(cache_dir) == [] and not list(cache_dir.rglob("*.lock"))
    reports = [json.loads((tmp_path / d / "report.json").read_text()) for d in "ab"]
    resumed = [[b["resumed"] for b in r["quantization"]["reconstruction"]["blocks"]] for r in reports]
    assert sorted(map(all, resumed)) == [False, True] and sorted(map(any, resumed)) == [False, True], resumed
    assert (tmp_path / "a" / "model.qdq.onnx").read_bytes() == (tmp_path / "b" / "model.qdq.onnx").read_bytes()
    assert sorted(p.name for p in recon.iterdir()) == ["reconstruction.pt"]


def _stopped(pid: int) -> bool:
    """Whether process ``pid`` is stopped by a signal (state T in /proc/PID/stat)."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "T"


def test_a_damaged_reconstruction_checkpoint_is_started_over(loaded, tmp_path):
    from dfq_deploy.config import ReconstructionConfig
    from dfq_deploy.io.calibration_set import CalibrationSet

    checkpoint = tmp_path / "recon"
    checkpoint.mkdir()
    (checkpoint / "reconstruction.pt").write_bytes(b"PK\x03\x04 cut off by a full disk")
    calib = CalibrationSet(torch.randn(4, *INPUT_SHAPE))
    config = ReconstructionConfig(iterations=2, batch_size=4, checkpoint_dir=str(checkpoint))
    with pytest.warns(UserWarning, match="reconstruction checkpoint .* is damaged"):
        first = api.quantize(loaded, calib, reconstruct=config, progress=False)
    resumed = api.quantize(loaded, calib, reconstruct=config, progress=False)
    assert not any(b.resumed for b in first.reconstruction.blocks)
    assert all(b.resumed for b in resumed.reconstruction.blocks)
