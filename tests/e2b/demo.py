"""`make e2b-demo`: E2B's unchanged SDK against a flintd (started by flint-demo e2b, which sets E2B_API_KEY,
E2B_API_URL and E2B_SANDBOX_URL). This is E2B's own quickstart, untouched, plus timings."""
import time

from e2b_code_interpreter import Sandbox


def timed(what, fn):
    t = time.perf_counter()
    r = fn()
    print(f"  {what:<44} {(time.perf_counter() - t) * 1e3:>9.1} ms")
    return r


print("E2B SDK → flintd:")
sbx = timed("Sandbox.create()", lambda: Sandbox.create(timeout=300))
r = timed("commands.run('uname -sr; whoami; pwd')", lambda: sbx.commands.run("uname -sr; whoami; pwd"))
print("    " + r.stdout.strip().replace("\n", " | "))
timed("files.write('/home/user/hello.txt')", lambda: sbx.files.write("/home/user/hello.txt", "hello from the SDK"))
print("    read back: " + timed("files.read", lambda: sbx.files.read("/home/user/hello.txt")))
ex = timed("run_code('x = 6*7; x')", lambda: sbx.run_code("x = 6*7\nx"))
print(f"    result: {ex.text}")
timed("pause()", sbx.pause)
print(f"    is_running() after pause: {sbx.is_running()}")
again = timed("Sandbox.connect(id)", lambda: Sandbox.connect(sbx.sandbox_id))
print(f"    x after connect: {timed('run_code(x)', lambda: again.run_code('x')).text}")
timed("kill()", again.kill)
