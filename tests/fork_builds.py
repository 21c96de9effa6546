"""Run several ``dfq-deploy build`` commands as child processes of one that imported the toolchain once.

    python fork_builds.py RUNS.json  ->  {"name": [pid, returncode], ...} on stdout

RUNS.json is a list of ``{"name", "args", "env", "log"}``: each child is forked, sets ``env``,
sends its stdout and stderr to ``log`` and runs the CLI on ``args``; a child killed by a signal
has returncode ``-signum``. The children are real, separate build processes (their own pids,
locks and files, killed as any process is); forking them from one parent that imported torch,
onnx and onnxruntime already spares each the seconds of those imports, which on a loaded 2-core
machine is most of what a build killed early costs.
"""

from __future__ import annotations

import json
import os
import sys


def main(runs_file: str) -> None:
    import onnx  # noqa: F401  (imported here, once, for every child)
    import onnxruntime  # noqa: F401
    import torch.export  # noqa: F401

    import dfq_deploy.api  # noqa: F401
    import dfq_deploy.deployment  # noqa: F401
    from dfq_deploy.cli.commands import main as cli

    # torch.export's first trace loads most of dynamo: once here (OMP_NUM_THREADS=1 keeps this process
    # free of OpenMP worker threads, which a forked child would not have).
    torch.export.export(torch.nn.Conv2d(3, 3, 1), (torch.zeros(1, 3, 4, 4),))

    children = {}
    for run in json.loads(open(runs_file).read()):
        pid = os.fork()
        if pid == 0:
            os.environ.update(run["env"])
            log = os.open(run["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(log, 1)
            os.dup2(log, 2)
            sys.argv = ["dfq-deploy", *run["args"]]
            code = 1
            try:
                cli.main(run["args"], prog_name="dfq-deploy")
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else 1
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        children[pid] = run["name"]
    results = {}
    while children:
        pid, status = os.wait()
        results[children.pop(pid)] = [pid, os.waitstatus_to_exitcode(status)]
    print(json.dumps(results))


if __name__ == "__main__":
    main(sys.argv[1])
