"""Profiling on edge devices: trtexec's exports read into the latency record, the trtexec command
lines, an SSH device, tegrastats, and the runners that tie them together (``dfq-deploy profile --remote``)."""
