"""Timings of E2B's unchanged Python SDK against flintd (flint-bench e2b runs this): create → first command
answered, pause, connect, files write/read. Prints one JSON object."""
import json
import os
import sys
import time

from e2b import Sandbox

runs = int(sys.argv[1]) if len(sys.argv) > 1 else 3
size = 8 << 20
blob = os.urandom(size)
out = {"create_ms": [], "first_run_ms": [], "run_ms": [], "pause_ms": [], "connect_ms": [], "write_mbs": [], "read_mbs": []}
for _ in range(runs):
    t = time.perf_counter()
    sbx = Sandbox.create(template="base", timeout=600)
    out["create_ms"].append((time.perf_counter() - t) * 1e3)
    t1 = time.perf_counter()
    sbx.commands.run("true")
    out["first_run_ms"].append((time.perf_counter() - t) * 1e3)
    t = time.perf_counter()
    sbx.commands.run("true")
    out["run_ms"].append((time.perf_counter() - t) * 1e3)
    t = time.perf_counter()
    sbx.files.write("/tmp/blob.bin", blob)
    out["write_mbs"].append(size / 1e6 / (time.perf_counter() - t))
    t = time.perf_counter()
    got = sbx.files.read("/tmp/blob.bin", format="bytes")
    out["read_mbs"].append(size / 1e6 / (time.perf_counter() - t))
    assert got == blob
    t = time.perf_counter()
    sbx.pause()
    out["pause_ms"].append((time.perf_counter() - t) * 1e3)
    t = time.perf_counter()
    Sandbox.connect(sbx.sandbox_id).commands.run("true")
    out["connect_ms"].append((time.perf_counter() - t) * 1e3)
    sbx.kill()
print(json.dumps(out))
