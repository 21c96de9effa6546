"""A stand-in for trtexec on the loopback "device": it replays NVIDIA's real exports, it times nothing.

No Jetson or GPU is available to the tests, so this lets the trtexec runner run end to end over SSH:
its job script, shell quoting, exit statuses, the copies back and the reading of the exports. A build
(``--skipInference``) writes a placeholder engine, or, for an ONNX whose graph is named ``broken``,
fails with error lines in trtexec's console format; a timed run (``--loadEngine``) copies the real
``--exportTimes/--exportProfile/--exportLayerInfo`` files of ``$REPLAY_PREFIX`` where it is told to.
"""

import gzip
import os
import shutil
import sys

VERSION = "[TensorRT v100300]"


def option(args, name):
    return next((a.split("=", 1)[1] for a in args if a.startswith(f"--{name}=")), None)


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
        with open(option(args, "saveEngine"), "wb") as f:
            f.write(b"replayed engine")
    else:
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
