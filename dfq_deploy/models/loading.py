"""Load a user's model file into an nn.Module, whatever format it was saved in.

Formats: TorchScript (``torch.jit.save``), ``torch.export`` programs (``.pt2``), a state_dict with
``--arch``, and a pickled ``nn.Module`` only behind ``trust_pickle`` (unpickling runs arbitrary code,
so the default loader is ``torch.load(weights_only=True)``).
"""

from __future__ import annotations

import dataclasses
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dfq_deploy.errors import BadInputError, first_line
from dfq_deploy.io.artifacts import sha256_file
from dfq_deploy.models.capture import capture_graph

DEFAULT_INPUT_SHAPE = (3, 224, 224)
# Architectures whose native resolution is not 224.
_INPUT_SHAPES = {"torchvision:inception_v3": (3, 299, 299)}
EFFICIENTNET_LITE_VARIANTS = ("0", "1", "2", "3", "4")


@dataclasses.dataclass
class LoadedModel:
    """A model ready for the pipeline, with where it came from."""

    module: nn.Module
    input_shape: tuple[int, ...]
    source_format: str
    path: str | None = None
    sha256: str | None = None
    arch: str | None = None

    def describe(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "sha256": self.sha256,
            "format": self.source_format,
            "arch": self.arch,
            "input_shape": list(self.input_shape),
        }


def parse_input_shape(text: str | None) -> tuple[int, ...] | None:
    """``"1x3x224x224"`` or ``"3x224x224"`` -> ``(3, 224, 224)`` (the batch size is chosen per stage)."""
    if text is None:
        return None
    try:
        dims = tuple(int(d) for d in text.lower().replace(",", "x").split("x") if d.strip())
    except ValueError:
        raise BadInputError(
            f"input shape {text!r} is not a list of integers", hint="write it like 1x3x224x224 (N x C x H x W)"
        ) from None
    if len(dims) == 4:
        dims = dims[1:]
    if len(dims) < 2 or min(dims) < 1:
        raise BadInputError(
            f"input shape {text!r} must be NxCxHxW (or CxHxW) with positive sizes",
            hint="e.g. --input-shape 1x3x224x224",
        )
    return dims


def build_arch(arch: str) -> nn.Module:
    """An untrained model by name: ``torchvision:resnet18``, ``cifar:resnet20``, ``timm:NAME``,
    ``efficientnet-lite:lite1`` (inputs normalised as (x - 127) / 128: ``--normalize efficientnet-lite``)."""
    family, _, name = arch.partition(":")
    if not name:
        family, name = "torchvision", family
    if family == "torchvision":
        import torchvision

        available = torchvision.models.list_models(module=torchvision.models)
        if name not in available:
            raise BadInputError(
                f"unknown torchvision classification model {name!r}",
                hint=f"choose one of: {', '.join(sorted(available))}",
            )
        return torchvision.models.get_model(name, weights=None)
    if family == "cifar":
        from dfq_deploy.models.cifar_resnet import DEPTHS, cifar_resnet

        if name not in DEPTHS:
            raise BadInputError(f"unknown CIFAR model {name!r}", hint=f"choose one of: {', '.join(DEPTHS)}")
        return cifar_resnet(name)
    if family == "timm":
        try:
            import timm
        except ImportError:
            from dfq_deploy.errors import MissingDependencyError

            raise MissingDependencyError("timm", extra="timm", purpose=f"--arch {arch}") from None
        try:
            return timm.create_model(name, pretrained=False)
        except RuntimeError as exc:
            raise BadInputError(f"unknown timm model {name!r}: {exc}") from None
    if family == "efficientnet-lite":
        return _efficientnet_lite(name, arch)
    raise BadInputError(
        f"unknown architecture family {family!r} in --arch {arch}",
        hint="use torchvision:NAME, cifar:NAME, timm:NAME or efficientnet-lite:lite0..lite4",
    )


def _efficientnet_lite(name: str, arch: str) -> nn.Module:
    """EfficientNet-Lite0..4 from the ``efficientnet-lite-pytorch`` package (the ``bench`` extra),
    with "same" padding computed from each input's size, so it runs at any resolution (the weights
    packages' state_dicts were converted at 224..300 px; the assets run them at 224)."""
    variant = name.removeprefix("efficientnet-").removeprefix("lite")
    if variant not in EFFICIENTNET_LITE_VARIANTS:
        raise BadInputError(
            f"unknown EfficientNet-Lite variant {name!r} in --arch {arch}",
            hint="use efficientnet-lite:lite0 ... efficientnet-lite:lite4",
        )
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        from dfq_deploy.errors import MissingDependencyError

        raise MissingDependencyError("efficientnet-lite-pytorch", extra="bench", purpose=f"--arch {arch}") from None
    return EfficientNet.from_name(f"efficientnet-lite{variant}", image_size=None)


def default_input_shape(arch: str | None) -> tuple[int, ...]:
    """The input shape a known architecture expects (``cifar:*`` 32x32, most ImageNet models 224)."""
    if arch is None:
        return DEFAULT_INPUT_SHAPE
    if arch.startswith("cifar:"):
        return (3, 32, 32)
    key = arch if ":" in arch else f"torchvision:{arch}"
    return _INPUT_SHAPES.get(key, DEFAULT_INPUT_SHAPE)


def load_model(
    path: str | Path, *, arch: str | None = None, trust_pickle: bool = False, input_shape: tuple[int, ...] | None = None
) -> LoadedModel:
    """Load ``path`` into an eval-mode module and check that it accepts ``input_shape``."""
    path = Path(path)
    if not path.exists():
        raise BadInputError(f"model file not found: {path}")
    if not path.is_file():
        raise BadInputError(f"model path is not a file: {path}")
    digest = sha256_file(path)
    module, fmt = _load_any(path, arch=arch, trust_pickle=trust_pickle)
    check_finite_weights(module, path)
    shape = tuple(input_shape or default_input_shape(arch))
    if fmt in ("state_dict", "pickle"):
        module.eval()
        check_input_shape(module, shape)  # before tracing, so a wrong shape reads as such
    graph = capture_graph(module, shape)
    check_input_shape(graph, shape)
    return LoadedModel(graph, shape, fmt, str(path), digest, arch)


def check_finite_weights(module: nn.Module, path: str | Path) -> None:
    """Refuse NaN or Inf in any parameter or buffer, naming the first few tensors and their counts."""
    bad = [
        (name, int((~torch.isfinite(t)).sum()))
        for name, t in module.state_dict().items()
        if isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all())
    ]
    if bad:
        shown = ", ".join(f"{name} ({count} values)" for name, count in bad[:4]) + (", ..." if len(bad) > 4 else "")
        raise BadInputError(
            f"{path} holds NaN or infinite weights in {len(bad)} tensors: {shown}",
            hint="the file is damaged or its training diverged: export it again from a "
            "checkpoint whose weights are finite",
        )


def check_input_shape(module: nn.Module, shape: tuple[int, ...]) -> torch.Tensor:
    """Run one batch of 2 through ``module``; a model that rejects the shape is a user error."""
    try:
        with torch.no_grad():
            out = module(torch.zeros(2, *shape))
    except Exception as exc:  # any failure here means the shape does not fit this model
        first = first_line(exc)
        raise BadInputError(
            f"the model rejects inputs of shape (N, {', '.join(map(str, shape))}): {first}",
            hint="pass the shape it was trained on, e.g. --input-shape 1x3x224x224 (a .pt2 "
            "program must be exported with a dynamic batch dimension)",
        ) from None
    if not isinstance(out, torch.Tensor):
        raise BadInputError(
            f"the model returns {type(out).__name__}, not one tensor",
            hint="dfq-deploy handles classifiers with one output tensor (N, classes)",
        )
    return out


def _load_any(path: Path, *, arch: str | None, trust_pickle: bool) -> tuple[nn.Module, str]:
    names = _zip_names(path)
    if (
        names is not None
        and any(n.endswith("archive_format") or "/models/" in n and n.endswith(".json") for n in names)
        and _looks_like_pt2(names)
    ):
        return _load_exported(path), "torch.export"
    if names is not None and any(n.endswith("constants.pkl") for n in names) and any("/code/" in n for n in names):
        return _load_torchscript(path), "torchscript"
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # weights_only refuses pickled classes; anything else is corruption
        if _is_pickled_code(exc):
            if not trust_pickle:
                raise BadInputError(
                    f"{path} is a pickled Python object (a whole nn.Module), and unpickling runs code from the file",
                    hint="pass --trust-pickle if you trust its source, or save a state_dict and "
                    "pass --arch, or save with torch.jit.save / torch.export.save",
                ) from None
            return _load_pickle(path), "pickle"
        raise BadInputError(
            f"cannot read {path} as a PyTorch model file: {first_line(exc)}",
            hint="expected TorchScript, torch.export .pt2, a state_dict or a pickled module",
        ) from None
    if isinstance(obj, nn.Module):
        return obj, "pickle"
    if isinstance(obj, dict):
        return _from_state_dict(path, obj, arch), "state_dict"
    raise BadInputError(f"{path} holds a {type(obj).__name__}, not a model or state_dict")


def _zip_names(path: Path) -> list[str] | None:
    if not zipfile.is_zipfile(path):
        return None
    try:
        with zipfile.ZipFile(path) as zf:
            return zf.namelist()
    except zipfile.BadZipFile:
        return None


def _looks_like_pt2(names: list[str]) -> bool:
    return any("serialized_exported_program" in n or n.endswith("archive_format") for n in names)


def _load_exported(path: Path) -> nn.Module:
    try:
        program = torch.export.load(str(path))
    except Exception as exc:  # corrupt or from an incompatible torch version
        raise BadInputError(f"cannot load torch.export program {path}: {first_line(exc)}") from None
    module = program.module()
    module._dfq_exported = True
    return module


def _load_torchscript(path: Path) -> nn.Module:
    try:
        return torch.jit.load(str(path), map_location="cpu")
    except Exception as exc:  # corrupt archive or unknown ops
        raise BadInputError(f"cannot load TorchScript file {path}: {first_line(exc)}") from None


def _load_pickle(path: Path) -> nn.Module:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # the pickle names a class that is not importable here, or is corrupt
        raise BadInputError(
            f"cannot unpickle {path}: {first_line(exc)}",
            hint="the classes the model was pickled with must be importable",
        ) from None
    if not isinstance(obj, nn.Module):
        raise BadInputError(f"{path} unpickles to a {type(obj).__name__}, not an nn.Module")
    return obj


def _from_state_dict(path: Path, obj: dict, arch: str | None) -> nn.Module:
    state = obj.get("state_dict", obj.get("model", obj))
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise BadInputError(f"{path} is a dict but not a state_dict of tensors")
    if arch is None:
        raise BadInputError(
            f"{path} holds only weights (a state_dict); dfq-deploy needs the architecture",
            hint="pass --arch, e.g. --arch torchvision:resnet18 or --arch cifar:resnet20",
        )
    model = build_arch(arch)
    state = {k.removeprefix("module."): v for k, v in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise BadInputError(
            f"the weights in {path} do not fit --arch {arch}: {len(missing)} missing keys "
            f"(e.g. {missing[:3]}), {len(unexpected)} unexpected keys (e.g. {unexpected[:3]})",
            hint="check that --arch names the architecture these weights were trained with",
        )
    return model


def _is_pickled_code(exc: Exception) -> bool:
    # weights_only refuses a pickled class by naming it ("Unsupported global: GLOBAL pkg.Class");
    # a corrupt file fails in the same unpickler with other words ("Unsupported operand").
    return "Unsupported global" in str(exc)
