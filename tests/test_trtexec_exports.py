"""trtexec's real exports (../shared/assets/trtexec/) read into the latency record and per-layer tables;
trtexec command lines as data; tegrastats lines summarised."""

from __future__ import annotations

import gzip
import json
import shlex

import numpy as np
import pytest
from click.testing import CliRunner

from dfq_deploy.analysis.compare import compare_reports
from dfq_deploy.analysis.precision_map import precision_map_tensorrt
from dfq_deploy.cli.commands import main
from dfq_deploy.errors import BadInputError
from dfq_deploy.remote.profile import profile_trtexec_export
from dfq_deploy.remote.tegrastats import summarise_tegrastats
from dfq_deploy.remote.trtexec_command import NetworkInput, TrtexecOptions, trtexec_steps
from dfq_deploy.remote.trtexec_exports import failure_message, parse_console_log, read_trtexec_export
from dfq_deploy.runtimes.profiler import LatencyRecord

NAME = "mobilenet_v2_residuals.qat.onnx.engine"


@pytest.fixture
def prefix(assets):
    folder = assets / "trtexec"
    if not (folder / f"{NAME}.timing.json.gz").is_file():
        pytest.skip(f"trtexec exports not found in {folder}")
    return folder / NAME


def raw(prefix, suffix):
    path = f"{prefix}.{suffix}"
    with gzip.open(path, "rt") if path.endswith(".gz") else open(path) as f:
        return json.load(f)


def test_latency_record_matches_the_raw_timing_file(prefix):
    latency = np.array([r["latencyMs"] for r in raw(prefix, "timing.json.gz")])
    compute = np.array([r["computeMs"] for r in raw(prefix, "timing.json.gz")])
    record = read_trtexec_export(prefix).latency
    assert record.runner == "trtexec" and record.runs == len(latency) == 11853
    assert record.median_ms == pytest.approx(np.median(latency), abs=1e-4)
    assert record.p99_ms == pytest.approx(np.percentile(latency, 99), abs=1e-4)
    assert record.mean_ms == pytest.approx(latency.mean(), abs=1e-4)
    assert record.min_ms == pytest.approx(latency.min(), abs=1e-4)
    assert record.compute.median_ms == pytest.approx(np.median(compute), abs=1e-4)
    assert record.batch_size == 1  # from the static input binding in graph.json
    assert record.throughput_ips == pytest.approx(1000 / record.median_ms, rel=1e-3)
    assert LatencyRecord.from_dict(record.as_dict()) == record


def test_every_profiled_layer_is_in_the_table_with_its_graph_json_precision(prefix):
    profile = raw(prefix, "profile.json")
    graph = {layer["Name"]: layer for layer in raw(prefix, "graph.json")["Layers"]}
    result = read_trtexec_export(prefix)
    table = {layer.name: layer for layer in result.layers}
    assert result.profile_runs == profile[0]["count"]
    for entry in profile[1:]:
        row = table[entry["name"]]
        assert row.time_ms == entry["timeMs"] and row.median_ms == entry["medianMs"]
        fmt = graph[entry["name"]]["Inputs"][0]["Format/Datatype"]
        assert row.input_format == fmt
        assert row.precision == ("int8" if "Int8" in fmt else "fp16" if "FP16" in fmt else "float")
    with_int8_weights = sum(1 for layer in graph.values() if (layer.get("Weights") or {}).get("Type") == "Int8")
    assert sum(1 for layer in result.layers if layer.precision == "int8") == with_int8_weights == 53
    assert table["GlobalAveragePool_747"].precision == "fp16" and not table["GlobalAveragePool_747"].qdq
    assert result.ran_in_float() == []  # every conv of this QAT graph ran in INT8
    assert result.device["Selected Device"] == "NVIDIA TITAN RTX" and result.device["Compute Capability"] == 7.5


def test_export_cli_writes_a_report_that_compare_reads(prefix, tmp_path):
    out = tmp_path / "imported"
    res = CliRunner().invoke(main, ["profile", "--trtexec-export", str(prefix), "--out", str(out)])
    assert res.exit_code == 0, res.output
    report = json.loads((out / "report.json").read_text())
    assert report["deployment"]["latency"][0]["median_ms"] == read_trtexec_export(prefix).latency.median_ms
    assert len(report["engine_layers"]["layers"]) == len(raw(prefix, "graph.json")["Layers"])
    assert (out / "trtexec" / f"{NAME}.timing.json.gz").is_file()
    md = (out / "report.md").read_text()
    assert "NVIDIA TITAN RTX" in md and "features.0.0.weight + QuantizeLinear_7 + Conv_9" in md
    same = compare_reports(out, out)
    assert same.passed and any(r.name == "trtexec batch 1 median ms" for r in same.rows)


def test_local_remote_and_imported_reports_compare(prefix, tmp_path):
    """A local `profile --out` report and an imported trtexec one: compare lists both, flags nothing."""
    from onnx import TensorProto, helper, save

    model = tmp_path / "relu.onnx"
    graph = helper.make_graph(
        [helper.make_node("Relu", ["input"], ["y"])],
        "relu",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3, 4, 4])],
    )
    save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(model))
    res = CliRunner().invoke(
        main,
        [
            "profile",
            str(model),
            "--batch-sizes",
            "1",
            "--warmup-ms",
            "0",
            "--profile-duration",
            "0",
            "--profile-iterations",
            "3",
            "--out",
            str(tmp_path / "local"),
        ],
    )
    assert res.exit_code == 0, res.output
    local = json.loads((tmp_path / "local" / "report.json").read_text())
    (record,) = [LatencyRecord.from_dict(r) for r in local["deployment"]["latency"]]
    assert record.runner == "onnxruntime-cpu" and record.runs == 3 and local["device"]["isa"]
    profile_trtexec_export(prefix, out_dir=tmp_path / "imported")
    result = compare_reports(tmp_path / "local", tmp_path / "imported")
    assert result.passed
    assert {r.name for r in result.rows} == {"onnxruntime-cpu batch 1 median ms", "trtexec batch 1 median ms"}


def test_missing_export_is_bad_input(tmp_path):
    with pytest.raises(BadInputError, match="timing export"):
        profile_trtexec_export(tmp_path / "nothing", out_dir=tmp_path / "out")
    assert not (tmp_path / "out" / "report.json").exists()


def test_console_log_gives_command_version_device_and_errors():
    log = "\n".join(
        [
            "&&&& RUNNING TensorRT.trtexec [TensorRT v100300] # /usr/src/tensorrt/bin/trtexec --onnx=m.onnx --stronglyTyped",
            "[12/01/2026-10:00:00] [I] TensorRT version: 10.3.0",
            "[12/01/2026-10:00:00] [I] Selected Device: Orin",
            "[12/01/2026-10:00:00] [I] Compute Capability: 8.7",
            "[12/01/2026-10:00:01] [E] Error[4]: [network.cpp::validate::3000] Error Code 4: Internal Error (bad Q/DQ)",
            "[12/01/2026-10:00:01] [E] Engine could not be created from network",
            "&&&& FAILED TensorRT.trtexec [TensorRT v100300] # /usr/src/tensorrt/bin/trtexec --onnx=m.onnx --stronglyTyped",
        ]
    )
    summary = parse_console_log(log)
    assert summary.command == "/usr/src/tensorrt/bin/trtexec --onnx=m.onnx --stronglyTyped"
    assert summary.tensorrt_version == "10.3.0" and summary.failed
    assert summary.device == {"Selected Device": "Orin", "Compute Capability": "8.7"}
    assert failure_message(log) == (
        "Error[4]: [network.cpp::validate::3000] Error Code 4: Internal Error (bad Q/DQ) | "
        "Engine could not be created from network"
    )


# trtexec 10.9's console lines (build and timed run in one log), in the forms it prints them; no real
# console log is among the shared assets, so the numbers here are this test's own.
TRT10_LOG = """\
&&&& RUNNING TensorRT.trtexec [TensorRT v100900] [b34] # trtexec --onnx=m.onnx --saveEngine=m.engine
[12/01/2026-10:00:00] [I] TensorRT version: 10.9.0
[12/01/2026-10:00:00] [I] [TRT] [MemUsageChange] Init CUDA: CPU +2, GPU +0, now: CPU 31, GPU 1702 (MiB)
[12/01/2026-10:00:02] [I] [TRT] [MemUsageChange] Init builder kernel library: CPU +2650, GPU +420, now: CPU 2878, GPU 2122 (MiB)
[12/01/2026-10:00:09] [I] [TRT] Total Activation Memory: 8228864 bytes
[12/01/2026-10:00:09] [I] [TRT] Engine generation completed in 7.1 seconds.
[12/01/2026-10:00:09] [I] [TRT] [MemUsageStats] Peak memory usage of TRT CPU/GPU memory allocators: CPU 8 MiB, GPU 97 MiB
[12/01/2026-10:00:09] [I] Engine built in 7.2 sec.
[12/01/2026-10:00:09] [I] Created engine with size: 12.4873 MiB
[12/01/2026-10:00:10] [I] [TRT] Loaded engine size: 12 MiB
[12/01/2026-10:00:10] [I] [TRT] [MemUsageChange] TensorRT-managed allocation in IExecutionContext creation: CPU +0, GPU +6, now: CPU 0, GPU 18 (MiB)
[12/01/2026-10:00:10] [I] Created execution context with device memory size: 5.625 MiB
&&&& PASSED TensorRT.trtexec [TensorRT v100900] [b34] # trtexec --onnx=m.onnx --saveEngine=m.engine
"""


def test_console_memory_reads_engine_context_and_peak_gpu():
    from dfq_deploy.remote.trtexec_memory import console_memory

    now = [int(line.split("GPU ")[-1].split()[0]) for line in TRT10_LOG.splitlines() if "now: CPU" in line]
    memory = console_memory([TRT10_LOG])
    assert memory["peak_gpu_mib"] == max(now) == 2122
    assert memory["engine_mib"] == 12.4873  # the build's figure, not the load's whole MiB
    assert memory["context_device_mib"] == 5.625 and memory["trt_allocator_peak_gpu_mib"] == 97
    run_only = "\n".join(line for line in TRT10_LOG.splitlines() if "Created engine" not in line)
    assert console_memory([run_only])["engine_mib"] == 12.0
    assert console_memory(["[I] Starting inference"]) == {}


def test_console_log_of_tensorrt_10_with_a_build_tag():
    summary = parse_console_log(TRT10_LOG)
    assert summary.command == "trtexec --onnx=m.onnx --saveEngine=m.engine"
    assert summary.tensorrt_version == "10.9.0" and not summary.failed


def test_export_reads_memory_from_the_console_logs_beside_it(prefix, tmp_path):
    for suffix in ("timing.json.gz", "profile.json", "graph.json"):
        (tmp_path / f"run.{suffix}").write_bytes(prefix.with_name(f"{NAME}.{suffix}").read_bytes())
    build, run = TRT10_LOG.split("[12/01/2026-10:00:10]", 1)
    (tmp_path / "run.build.log").write_text(build)
    (tmp_path / "run.profile.log").write_text("[12/01/2026-10:00:10]" + run)
    result = read_trtexec_export(tmp_path / "run")
    assert result.memory["engine_mib"] == 12.4873 and result.memory["context_device_mib"] == 5.625
    assert result.files.build_log == tmp_path / "run.build.log"
    out = profile_trtexec_export(tmp_path / "run", out_dir=tmp_path / "out")
    assert out.report["deployment"]["memory"]["batch 1"]["peak_gpu_mib"] == 2122
    assert (tmp_path / "out" / "trtexec" / "run.build.log").is_file()


@pytest.mark.parametrize(
    "precision, flags, absent",
    [
        ("int8", ["--stronglyTyped"], ["--fp16", "--int8"]),
        ("fp16", ["--fp16"], ["--stronglyTyped", "--int8"]),
        ("int4w", ["--stronglyTyped"], ["--fp16", "--int8"]),
    ],
)
def test_trtexec_command_lines(precision, flags, absent):
    steps = trtexec_steps(
        NetworkInput("input", (None, 3, 32, 32)),
        onnx_path="/tmp/w/model.onnx",
        work_dir="/tmp/w",
        options=TrtexecOptions(precision=precision, batch_sizes=(8, 1)),
        trtexec="/usr/bin/trtexec",
    )
    assert [s.batch_size for s in steps] == [1, 8]
    b8 = steps[1]
    assert b8.build == (
        "/usr/bin/trtexec",
        "--onnx=/tmp/w/model.onnx",
        *flags,
        "--minShapes=input:8x3x32x32",
        "--optShapes=input:8x3x32x32",
        "--maxShapes=input:8x3x32x32",
        "--profilingVerbosity=detailed",
        "--saveEngine=/tmp/w/b8.engine",
        "--skipInference",
    )
    assert b8.run == (
        "/usr/bin/trtexec",
        "--loadEngine=/tmp/w/b8.engine",
        "--shapes=input:8x3x32x32",
        "--warmUp=200",
        "--duration=3",
        "--separateProfileRun",
        "--profilingVerbosity=detailed",
        "--exportTimes=/tmp/w/b8.timing.json",
        "--exportProfile=/tmp/w/b8.profile.json",
        "--exportLayerInfo=/tmp/w/b8.graph.json",
    )
    assert not set(absent) & set(b8.build + b8.run)
    assert steps[0].prefix == "/tmp/w/b1" and "--shapes=input:1x3x32x32" in steps[0].run


def test_trtexec_command_options_and_static_batch():
    opts = TrtexecOptions(batch_sizes=(4,), warmup_ms=500, duration_s=10, use_cuda_graph=True, use_spin_wait=True)
    (step,) = trtexec_steps(NetworkInput("x:0", (4, 3, 8, 8)), onnx_path="m.onnx", work_dir="w", options=opts)
    assert "--warmUp=500" in step.run and "--duration=10" in step.run and "--useCudaGraph" in step.run
    assert "--useSpinWait" in step.run and "--useSpinWait" not in step.build and opts.timing()["spin_wait"]
    assert not any(a.startswith(("--shapes", "--minShapes")) for a in step.build + step.run)  # static: as exported
    assert shlex.split(shlex.join(step.run)) == list(step.run)
    with pytest.raises(BadInputError, match="fixed batch size 4"):
        trtexec_steps(
            NetworkInput("x", (4, 3, 8, 8)), onnx_path="m", work_dir="w", options=TrtexecOptions(batch_sizes=(1,))
        )
    assert NetworkInput("x:0", (None, 3, 8, 8)).shape_spec(2) == "'x:0':2x3x8x8"
    with pytest.raises(BadInputError):
        TrtexecOptions(precision="int2")


def test_network_input_of_an_exported_graph(tmp_path):
    import torch
    from small_cnn import INPUT_SHAPE, SmallResNet

    path = tmp_path / "m.onnx"
    torch.onnx.export(
        SmallResNet().eval(),
        torch.zeros(1, *INPUT_SHAPE),
        str(path),
        input_names=["input"],
        dynamic_axes={"input": {0: "batch"}},
        dynamo=False,
    )
    assert NetworkInput.from_onnx(path) == NetworkInput("input", (None, *INPUT_SHAPE))


def test_tegrastats_summary():
    # Lines in the format of NVIDIA's Jetson Linux guide ("tegrastats Utility"); Orin rails in mW.
    lines = [
        "RAM 2917/7620MB (lfb 12x4MB) SWAP 0/3810MB (cached 0MB) CPU [12%@1510,3%@1510] EMC_FREQ 4%@2133 "
        "GR3D_FREQ 40%@[624,624] VDD_IN 5000mW/4720mW VDD_CPU_GPU_CV 1500mW/1310mW VDD_SOC 1400mW/1400mW",
        "RAM 3101/7620MB (lfb 10x4MB) SWAP 0/3810MB (cached 0MB) CPU [30%@1510,9%@1510] EMC_FREQ 9%@2133 "
        "GR3D_FREQ 80%@[624,624] VDD_IN 7000mW/5480mW VDD_CPU_GPU_CV 3500mW/2040mW VDD_SOC 1600mW/1470mW",
        "unrelated line",
    ]
    s = summarise_tegrastats(lines)
    assert s.samples == 2 and s.ram_peak_mb == 3101 and s.ram_total_mb == 7620
    assert s.gpu_load_mean_pct == 60.0 and s.gpu_load_peak_pct == 80
    assert s.rails_mean_mw == {"VDD_IN": 6000.0, "VDD_CPU_GPU_CV": 2500.0, "VDD_SOC": 1500.0}
    assert s.total_rail == "VDD_IN" and s.energy_per_image_mj(2.0, 4) == 3.0  # 6 W x 2 ms / 4 images
    old = summarise_tegrastats(
        [
            "RAM 1500/3964MB (lfb 300x4MB) CPU [5%@1479] GR3D_FREQ 0%@921 POM_5V_IN 2254/2254 "
            "POM_5V_GPU 40/40 POM_5V_CPU 442/442"
        ]
    )
    assert old.total_rail == "POM_5V_IN" and old.rails_mean_mw["POM_5V_GPU"] == 40.0
    assert summarise_tegrastats(["nothing here"]) is None


def test_precision_map_reads_trtexec_layer_info(prefix):
    """The precision map's TensorRT reader takes trtexec's graph.json layers as they are."""
    from onnx import TensorProto, helper, numpy_helper

    # A one-conv Q/DQ graph whose conv node carries the name of the real engine's first conv.
    w = numpy_helper.from_array(np.ones((32, 3, 3, 3), np.int8), "features.0.0.weight_quantizer_quantized")
    scale = numpy_helper.from_array(np.full((32,), 0.1, np.float32), "ws")
    nodes = [
        helper.make_node(
            "DequantizeLinear",
            ["features.0.0.weight_quantizer_quantized", "ws"],
            ["w"],
            name="features.0.0.weight_quantizer/DequantizeLinear",
            axis=0,
        ),
        helper.make_node("Conv", ["x", "w"], ["y"], name="Conv_9"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [w, scale],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
    result = read_trtexec_export(prefix)
    pmap = precision_map_tensorrt(model, {"target": "trtexec", "engine_layers": result.engine_layers})
    (row,) = pmap.layers
    assert row.onnx_node == "Conv_9" and row.used == "int8" and row.kernel == "CaskConvolution"
