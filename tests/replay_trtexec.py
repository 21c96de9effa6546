"""A stand-in for trtexec on the loopback "device": it replays NVIDIA's real exports, it times nothing.

No Jetson or GPU is available to the tests, so this lets the trtexec runner run end to end over SSH:
its job script, shell quoting, exit statuses, the copies back and the reading of the exports. A build
(``--skipInference``) writes a placeholder engine (``$REPLAY_ENGINE_BYTES`` long), or, for an ONNX whose graph is named ``broken``,
fails with error lines in trtexec's console format; a timed run (``--loadEngine``) copies the real
``--exportTimes/--exportProfile/--exportLayerInfo`` files of ``$REPLAY_PREFIX`` where it is told to.
Both print trtexec's memory lines (the forms TensorRT 10 prints; the numbers grow with the batch size).
"""

import gzip
import os
import shutil
import sys

VERSION = "[TensorRT v100300]"


def option(args, name):
    return next((a.split("=", 1)[1] for a in args if a.startswith(f"--{name}=")), None)


def shapes_batch(args):
    spec = option(args, "shapes") or option(args, "maxShapes") or "x:1x"
    return int(spec.rsplit(":", 1)[1].split("x")[0])


def print_build_memory(batch):
    stamp = "[12/01/2026-22:00:01]"
    print(f"{stamp} [I] [TRT] [MemUsageChange] Init CUDA: CPU +2, GPU +0, now: CPU 26, GPU {1690 + batch} (MiB)")
    print(
        f"{stamp} [I] [TRT] [MemUsageChange] Init builder kernel library: CPU +2646, GPU +414, now: CPU 2873, GPU 2107 (MiB)"
    )
    print(f"{stamp} [I] [TRT] Engine generation completed in 1.5 seconds.")
    print(
        f"{stamp} [I] [TRT] [MemUsageStats] Peak memory usage of TRT CPU/GPU memory allocators: CPU 9 MiB, GPU {100 + batch} MiB"
    )
    print(f"{stamp} [I] Engine built in 1.6 sec.")
    print(f"{stamp} [I] Created engine with size: {3.25 + batch / 8:g} MiB")


def print_run_memory(batch):
    stamp = "[12/01/2026-22:00:02]"
    print(f"{stamp} [I] [TRT] [MemUsageChange] Init CUDA: CPU +2, GPU +0, now: CPU 26, GPU 1693 (MiB)")
    print(f"{stamp} [I] [TRT] Loaded engine size: 3 MiB")
    print(
        f"{stamp} [I] [TRT] [MemUsageChange] TensorRT-managed allocation in IExecutionContext creation: "
        f"CPU +0, GPU +{batch}, now: CPU 0, GPU {4 + batch} (MiB)"
    )
    print(f"{stamp} [I] Created execution context with device memory size: {1.5 * batch:g} MiB")


def main(args):
    command = " ".join(["trtexec", *args])
    print(f"&&&& RUNNING TensorRT.trtexec {VERSION} # {command}")
    print("[12/01/2026-22:00:00] [I] TensorRT version: 10.3.0")
    if "--skipInference" in args:
        onnx = option(args, "onnx")
        with open(onnx, "rb") as f:
            broken = b"broken" in f.read()
        if broken:
            print(
                "[12/01/2026-22:00:01] [E] Error[4]: IBuilder::buildSerializedNetwork: Error Code 4: "
                "API Usage Error (replayed: the graph is named broken)"
            )
            print("[12/01/2026-22:00:01] [E] Engine could not be created from network")
            print(f"&&&& FAILED TensorRT.trtexec {VERSION} # {command}")
            return 1
        batch = shapes_batch(args)
        print_build_memory(batch)
        size = int(os.environ.get("REPLAY_ENGINE_BYTES", "4096"))  # a placeholder "engine" per batch size
        with open(option(args, "saveEngine"), "wb") as f:
            f.write((f"replayed engine for batch {batch}\n".encode() * (size // 20 + 1))[:size])
    else:
        print_run_memory(shapes_batch(args))
        prefix = os.environ["REPLAY_PREFIX"]
        with gzip.open(f"{prefix}.timing.json.gz", "rb") as src, open(option(args, "exportTimes"), "wb") as dst:
            shutil.copyfileobj(src, dst)
        shutil.copy(f"{prefix}.profile.json", option(args, "exportProfile"))
        shutil.copy(f"{prefix}.graph.json", option(args, "exportLayerInfo"))
        print("[12/01/2026-22:00:02] [I] Selected Device: NVIDIA TITAN RTX")
        print("[12/01/2026-22:00:02] [I] Compute Capability: 7.5")
    print(f"&&&& PASSED TensorRT.trtexec {VERSION} # {command}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
