"""E2B's unchanged Python SDK against a fleet (tests/tests/fleet.rs runs this with E2B_API_KEY, E2B_API_URL and
E2B_SANDBOX_URL at flint-router's E2B endpoint). argv[1] is the step: `create` (prints `SANDBOX <id>`), `resume
ID` or `finish ID`; the test moves the sandbox between hosts in between. Any failed assertion exits non-zero."""
import sys

from e2b import Sandbox, SandboxQuery
from e2b.exceptions import AuthenticationException


def create():
    try:
        Sandbox.list(api_key="e2b_00000000000000000000000000000000000000ff").next_items()
        raise AssertionError("a key the router does not accept was let in")
    except AuthenticationException:
        pass
    sbx = Sandbox.create(template="tmpl-t", timeout=600, metadata={"suite": "fleet"}, envs={"FLEET_ENV": "set"})
    out = sbx.commands.run("echo hi; echo $FLEET_ENV").stdout
    assert out == "hi\nset\n", repr(out)
    assert sbx.pause() is True
    assert sbx.get_info().state == "paused"
    assert not sbx.is_running(), "a paused sandbox says it runs"
    listed = Sandbox.list(query=SandboxQuery(metadata={"suite": "fleet"})).next_items()
    assert [(s.sandbox_id, s.state.value) for s in listed] == [(sbx.sandbox_id, "paused")], listed
    print(f"SANDBOX {sbx.sandbox_id}", flush=True)


def resume(sandbox_id):
    sbx = Sandbox.connect(sandbox_id)
    assert sbx.is_running()
    out = sbx.commands.run("echo again; echo $FLEET_ENV").stdout
    assert out == "again\nset\n", repr(out)


def finish(sandbox_id):
    listed = Sandbox.list(query=SandboxQuery(metadata={"suite": "fleet"})).next_items()
    assert [(s.sandbox_id, s.state.value) for s in listed] == [(sandbox_id, "running")], listed
    assert Sandbox.kill(sandbox_id) is True
    assert Sandbox.kill(sandbox_id) is False, "a second kill finds nothing"
    assert not Sandbox.list(query=SandboxQuery(metadata={"suite": "fleet"})).next_items()


def main():
    step = sys.argv[1]
    if step == "create":
        create()
    elif step == "resume":
        resume(sys.argv[2])
    elif step == "finish":
        finish(sys.argv[2])
    else:
        raise SystemExit(f"unknown step {step}")
    print("ALL OK", flush=True)


if __name__ == "__main__":
    main()
