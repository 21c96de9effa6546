"""TensorRT's layer information JSON, from the engine inspector or trtexec's ``--exportLayerInfo``.

Both write ``{"Layers": [...], "Bindings": [...]}``; with detailed profiling verbosity each layer
has its name (the ONNX nodes fused into it, joined by `` + ``), type and a "Format/Datatype" per
input and output, which says the precision it ran in. No TensorRT import: the JSON is plain data.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

_TRT_DTYPES = (
    ("int8", "int8"),
    ("int4", "int4"),
    ("fp8", "fp8"),
    ("bf16", "bf16"),
    ("fp16", "fp16"),
    ("half", "fp16"),
    ("fp32", "float"),
    ("float", "float"),
    ("int32", "int32"),
)


def engine_layers_from_layer_info(info: Mapping[str, Any]) -> list[dict[str, Any]]:
    """``engine_layers`` (as the precision map reads them): name, type and the "Format/Datatype" of
    each input and output of every layer."""
    layers = []
    for layer in info.get("Layers", []):
        if isinstance(layer, str):  # profiling verbosity too low: names only
            layers.append({"name": layer})
            continue
        layers.append(
            {
                "name": layer.get("Name"),
                "type": layer.get("LayerType"),
                "inputs": [t.get("Format/Datatype") for t in layer.get("Inputs", [])],
                "outputs": [t.get("Format/Datatype") for t in layer.get("Outputs", [])],
            }
        )
    return layers


def tensorrt_format_dtype(formats: Sequence[Any]) -> str:
    """``int8`` / ``fp16`` / ``float`` ... from the first tensor's "Format/Datatype" string."""
    text = str(formats[0]).lower() if formats else ""
    for token, dtype in _TRT_DTYPES:
        if re.search(rf"\b{token}\b", text):
            return dtype
    return "unknown"
