"""E2B's unchanged Python SDK against flintd (tests/tests/e2b.rs runs this with E2B_API_KEY, E2B_API_URL and
E2B_SANDBOX_URL, or E2B_DOMAIN + SSL_CERT_FILE, pointing at flintd). One function per feature; argv[1] picks
them (`all`, or a comma-separated list). Any failed assertion exits non-zero with its traceback."""
import sys
import time

from e2b import CommandExitException, Sandbox, SandboxQuery


START = time.monotonic()
# The first command after a wake touches the restored guest's memory anew (each page faulted in again): on a host
# that emulates the guest kernel, under a loaded CI, that command took past the SDK's default 60 s once. A timeout
# of the test's own, as any SDK user may pass.
WAKE_TIMEOUT = 240


def step(name):
    # The time since the flow started: a CI log then shows which step took the time.
    print(f"STEP {name} (at {time.monotonic() - START:.1f} s)", flush=True)


def wait_until(what, cond, within=120):
    deadline = time.time() + within
    while not cond():
        assert time.time() < deadline, f"never: {what}"
        time.sleep(0.5)


def commands(sbx):
    step("commands")
    r = sbx.commands.run("echo hi; echo err >&2; pwd; whoami; echo $FLINT_ENV $EXTRA", envs={"EXTRA": "x"})
    assert r.exit_code == 0, r
    assert r.stdout == "hi\n/home/user\nuser\nfrom-create x\n", repr(r.stdout)
    assert r.stderr == "err\n", repr(r.stderr)
    assert sbx.commands.run("pwd", cwd="/tmp").stdout == "/tmp\n"
    assert sbx.commands.run("whoami", user="root").stdout == "root\n"
    try:
        sbx.commands.run("echo before; exit 3")
        raise AssertionError("a failing command did not raise")
    except CommandExitException as e:
        assert e.exit_code == 3 and e.stdout == "before\n", (e.exit_code, e.stdout)
    chunks = []
    sbx.commands.run("for i in 1 2 3; do echo line$i; sleep 0.2; done", on_stdout=chunks.append)
    assert "".join(chunks) == "line1\nline2\nline3\n", chunks


def background(sbx):
    step("background")
    h = sbx.commands.run("sleep 600", background=True)
    assert any(p.pid == h.pid for p in sbx.commands.list()), "the background process is not listed"
    again = sbx.commands.connect(h.pid)
    assert sbx.commands.kill(h.pid) is True
    try:
        again.wait()
        raise AssertionError("a killed process ended well")
    except CommandExitException as e:
        assert e.exit_code != 0, e
    assert sbx.commands.kill(h.pid) is False, "killing a gone process"
    cat = sbx.commands.run("cat", background=True, stdin=True)
    sbx.commands.send_stdin(cat.pid, "piped\n")
    sbx.commands.close_stdin(cat.pid)
    assert cat.wait().stdout == "piped\n"


def pty(sbx):
    step("pty")
    from e2b import PtySize

    h = sbx.pty.create(PtySize(rows=24, cols=80))
    sbx.pty.resize(h.pid, PtySize(rows=30, cols=100))
    sbx.pty.send_stdin(h.pid, b"stty size; echo pty-$((6*7)); tty; exit 3\n")
    out = []
    try:
        h.wait(on_pty=out.append)
        raise AssertionError("the terminal's shell did not exit 3")
    except CommandExitException as e:
        assert e.exit_code == 3, e
    text = b"".join(bytes(d) for d in out).decode(errors="replace")
    assert "30 100" in text and "pty-42" in text and "/dev/pts/" in text, repr(text)


def files(sbx):
    step("files")
    sbx.files.write("/home/user/a.txt", "hello")
    assert sbx.files.read("/home/user/a.txt") == "hello"
    sbx.files.write("rel/b.txt", "world")  # relative: against the user's home
    names = {e.name for e in sbx.files.list("/home/user")}
    assert {"a.txt", "rel"} <= names, names
    assert sbx.files.exists("a.txt") and not sbx.files.exists("nope.txt")
    sbx.files.rename("a.txt", "c.txt")
    info = sbx.files.get_info("c.txt")
    assert info.name == "c.txt" and info.size == 5 and info.owner == "user", info
    assert sbx.files.make_dir("d1") is True and sbx.files.make_dir("d1") is False
    sbx.files.remove("c.txt")
    assert not sbx.files.exists("c.txt")
    out = sbx.commands.run("cat rel/b.txt; echo; stat -c %U rel/b.txt").stdout
    assert out == "world\nuser\n", repr(out)
    blob = bytes(range(256)) * 4096  # 1 MiB, every byte value
    sbx.files.write("/tmp/blob.bin", blob)
    assert sbx.files.read("/tmp/blob.bin", format="bytes") == blob


def watch(sbx):
    step("watch")
    from e2b import FilesystemEventType as T

    sbx.files.make_dir("watched")
    h = sbx.files.watch_dir("watched", recursive=True)
    sbx.files.write("watched/a.txt", "1")
    sbx.commands.run("cd ~/watched && mkdir -p sub/deeper && echo x > sub/deeper/b.txt && mv a.txt c.txt && rm c.txt")
    want = {("a.txt", T.CREATE), ("sub", T.CREATE), ("sub/deeper/b.txt", T.CREATE), ("a.txt", T.RENAME),
            ("c.txt", T.CREATE), ("c.txt", T.REMOVE)}
    seen = set()

    def got_all():
        seen.update((e.name, e.type) for e in h.get_new_events())
        return want <= seen

    wait_until(f"watch events {want}", got_all, within=60)
    h.stop()
    try:
        h.get_new_events()
        raise AssertionError("a stopped watcher answered")
    except Exception as e:
        assert "stopped" in str(e), e


def idle_wake(sbx):
    step("idle_wake")
    # What idling does to a session, done at once: flintd hibernates it (not an E2B pause). The next SDK call
    # wakes it, and nothing of it is lost.
    import json
    import os
    import subprocess

    sbx.commands.run("echo before-idle > /tmp/idle-mark")

    def flint(*args):
        cli = [os.environ["FLINT_CLI"], "--socket", os.environ["FLINT_SOCKET"], *args]
        return subprocess.run(cli, check=True, capture_output=True).stdout

    def state():
        return json.loads(flint("--json", "session", "get", sbx.sandbox_id))["state"]

    flint("session", "hibernate", sbx.sandbox_id)
    assert state() == "hibernated", state()
    # The first command after a wake: WAKE_TIMEOUT, not the SDK's 60 s.
    assert sbx.commands.run("cat /tmp/idle-mark", timeout=WAKE_TIMEOUT).stdout == "before-idle\n"
    assert state() == "running", state()
    assert sbx.get_info().state == "running"


def info_and_list(sbx):
    step("info_and_list")
    info = sbx.get_info()
    assert info.sandbox_id == sbx.sandbox_id and info.metadata.get("suite") == "flint", info
    listed = Sandbox.list(query=SandboxQuery(metadata={"suite": "flint"})).next_items()
    assert sbx.sandbox_id in [s.sandbox_id for s in listed], listed
    assert not Sandbox.list(query=SandboxQuery(metadata={"suite": "other"})).next_items()


def pause_and_connect(sbx):
    step("pause_and_connect")
    sbx.commands.run("echo kept > /tmp/mark")
    # A process is memory: one that lives through the pause proves the guest was not rebooted.
    sleeper = sbx.commands.run("sleep 100000", background=True)
    sbx.pause()
    assert not sbx.is_running(), "a paused sandbox says it runs"
    assert sbx.get_info().state == "paused"
    resumed = Sandbox.connect(sbx.sandbox_id)
    assert resumed.is_running()
    out = resumed.commands.run(f"cat /tmp/mark; kill -0 {sleeper.pid} && echo alive", timeout=WAKE_TIMEOUT).stdout
    assert out == "kept\nalive\n", repr(out)


def timeout_and_kill():
    step("timeout_and_kill")
    short = Sandbox.create(template="base", timeout=300)
    short.set_timeout(2)
    wait_until("the sandbox ends at its new deadline", lambda: not short.is_running())
    assert Sandbox.kill(short.sandbox_id) is False


def two_sandboxes():
    step("two_sandboxes")
    # The SDK keeps one connection per origin: requests for both sandboxes share it.
    a, b = Sandbox.create(template="base"), Sandbox.create(template="base")
    for _ in range(3):
        assert a.commands.run("hostname").stdout.strip() == a.sandbox_id
        assert b.commands.run("hostname").stdout.strip() == b.sandbox_id
    assert a.kill() and b.kill()


def code_interpreter():
    step("code_interpreter")
    from e2b_code_interpreter import Sandbox as CodeSandbox
    from e2b.exceptions import TimeoutException

    ci = CodeSandbox.create()
    ex = ci.run_code("x = 41\nx + 1")
    assert ex.text == "42", ex
    assert ci.run_code("x").text == "41", "state is kept between cells"
    out, err = [], []
    ex = ci.run_code("import sys\nprint('a')\nprint('b', file=sys.stderr)", on_stdout=out.append, on_stderr=err.append)
    assert [m.line for m in out] == ["a\n"] and [m.line for m in err] == ["b\n"], (out, err)
    assert ex.logs.stdout == ["a\n"], ex.logs
    ex = ci.run_code("def f():\n    return 1/0\nf()")
    assert ex.error.name == "ZeroDivisionError" and "division by zero" in ex.error.value, ex.error
    assert "f()" in ex.error.traceback, ex.error.traceback
    assert ci.run_code("'supertest'").text == "supertest"
    try:
        ci.run_code("while True: pass", timeout=3)
        raise AssertionError("an endless cell did not time out")
    except TimeoutException:
        pass
    # The abandoned cell was interrupted: the next one runs at once, the state is still there.
    assert ci.run_code("x + 1", timeout=60).text == "42"
    ctx = ci.create_code_context()
    ci.run_code("x = 'other'", context=ctx)
    assert ci.run_code("x", context=ctx).text == "other" and ci.run_code("x").text == "41"
    assert ci.kill()


FLOWS = ["commands", "background", "pty", "files", "watch", "info_and_list", "idle_wake", "pause_and_connect"]


def main():
    want = sys.argv[1] if len(sys.argv) > 1 else "all"
    names = set(want.split(","))
    if want == "all" or names & set(FLOWS):
        sbx = Sandbox.create(template="base", timeout=600, metadata={"suite": "flint"}, envs={"FLINT_ENV": "from-create"})
        assert sbx.is_running()
        for name in FLOWS:
            if want == "all" or name in names:
                globals()[name](sbx)
        assert sbx.kill() is True
        assert Sandbox.kill(sbx.sandbox_id) is False, "a second kill finds nothing"
        assert not sbx.is_running()
    for name, fn in [("timeout_and_kill", timeout_and_kill), ("two_sandboxes", two_sandboxes),
                     ("code_interpreter", code_interpreter)]:
        if want == "all" or name in names:
            fn()
    print("ALL OK", flush=True)


if __name__ == "__main__":
    main()
