"""How close an INT8 graph runs to the CPU's own limit: MACs per graph, and the CPU's INT8 MAC peak.

``graph_macs`` counts the multiply-accumulates of every Conv, Gemm and MatMul in an ONNX graph from
its inferred shapes (what any runtime must compute, whatever it fuses). ``int8_peak`` compiles
``int8_peak.c`` with gcc for the best int8 dot-product instruction this CPU has (AVX512-VNNI, else
AVX2) and runs one copy per core at once: the sum is the machine's ceiling for u8 x s8 kernels,
so a latency table can say what fraction of it each runtime reaches. AMX tiles are not measured.
The count is of direct-convolution MACs: a runtime that computes fewer (Winograd-style 3x3 kernels)
or runs at a higher boost clock than the loop did can show slightly over 100%.
"""

from __future__ import annotations

import math
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import onnx

from dfq_deploy.runtimes.cpu_features import cpu_description, cpu_flags

SOURCE = Path(__file__).with_name("int8_peak.c")
# CPU flag -> (instruction measured, gcc flags); the first one the CPU has is measured.
VARIANTS = {
    "avx512_vnni": ("avx512_vnni vpdpbusd zmm", ["-DUSE_VNNI", "-mavx512f", "-mavx512bw", "-mavx512vnni"]),
    "avx2": ("avx2 vpmaddubsw+vpmaddwd ymm", ["-mavx2"]),
}


@dataclass(frozen=True)
class Int8Peak:
    instruction: str
    cores: int
    gmacs_per_core: float

    @property
    def gmacs(self) -> float:
        return self.cores * self.gmacs_per_core


def graph_macs(model: onnx.ModelProto, batch_size: int) -> int:
    """Multiply-accumulates of one run at ``batch_size`` (Conv, Gemm, MatMul; shapes inferred)."""
    inferred = onnx.shape_inference.infer_shapes(model)
    shapes = {}
    for value in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]:
        dims = value.type.tensor_type.shape.dim
        shapes[value.name] = [d.dim_value if d.dim_value > 0 else batch_size for d in dims]
    shapes |= {init.name: list(init.dims) for init in inferred.graph.initializer}
    total = 0
    for node in inferred.graph.node:
        if node.op_type == "Conv" and node.output[0] in shapes and node.input[1] in shapes:
            out, weight = shapes[node.output[0]], shapes[node.input[1]]
            total += math.prod(out) * math.prod(weight[1:])  # weight: Cout x Cin/groups x kh x kw
        elif node.op_type in ("Gemm", "MatMul") and node.output[0] in shapes and node.input[1] in shapes:
            weight = shapes[node.input[1]]
            inner = weight[1] if node.op_type == "Gemm" and _transposed_b(node) else weight[-2]
            total += math.prod(shapes[node.output[0]]) * inner
    return total


def _transposed_b(node: onnx.NodeProto) -> bool:
    return any(a.name == "transB" and a.i == 1 for a in node.attribute)


def int8_peak() -> Int8Peak | None:
    """The CPU's u8 x s8 MAC rate, all cores at once; None without gcc or without AVX2."""
    if shutil.which("gcc") is None:
        return None
    flag = next((flag for flag in VARIANTS if flag in cpu_flags()), None)
    if flag is None:
        return None
    instruction, gcc_flags = VARIANTS[flag]
    cores = int(cpu_description()["cores"])
    with tempfile.TemporaryDirectory() as tmp:
        binary = Path(tmp) / "int8_peak"
        subprocess.run(["gcc", "-O3", *gcc_flags, str(SOURCE), "-o", str(binary)], check=True)
        with ThreadPoolExecutor(cores) as pool:
            outputs = list(pool.map(lambda _: _run(binary), range(cores)))
    # The slowest core's rate times the cores: what all of them sustain together.
    return Int8Peak(instruction, cores, min(float(out.split()[0]) for out in outputs))


def _run(binary: Path) -> str:
    return subprocess.run([str(binary)], capture_output=True, text=True, check=True).stdout
