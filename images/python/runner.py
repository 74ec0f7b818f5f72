"""Flint's warm Python runner (docs/agent-protocol.md, "Runners").

flint-agent starts this at boot and keeps it running; a template's snapshot captures it warm (interpreter
started, common modules imported), so a clone answers its first cell without starting Python.

Protocol: one JSON object per line. Requests arrive on fd 3: {"id": N, "code": "...", "reseed": bool,
"context": name-or-null, "env": {...}} (a context is a namespace of its own; env is set for that run only);
replies leave on fd 4: first {"ready": true, ...} once, then one {"id": N, "status": "ok"|"error"|
"interrupted", "value": repr-or-null, "error": {"name", "message", "traceback"}-or-null} per request.
The code's stdout and stderr are this process's fds 1 and 2, which the agent streams to the caller. State
(globals) lives on from one request to the next, like a notebook kernel. The agent interrupts a request that
runs past its timeout with SIGINT (KeyboardInterrupt); the runner answers and takes the next one.

The interrupt is safe wherever it lands: it raises KeyboardInterrupt only inside the cell's code; one that
arrives while a request is being read or answered is held and raised as the cell starts (so the request still
ends "interrupted"), and one that arrives between requests (a late interrupt of a run that had just answered) is
dropped. The runner's own loop never sees it.
"""
import ast
import itertools
import json
import linecache
import os
import random
import signal
import sys
import traceback

# Warm: what most cells import, loaded before the template's snapshot.
import collections  # noqa: F401
import datetime  # noqa: F401
import hashlib  # noqa: F401
import math  # noqa: F401
import re  # noqa: F401
import sqlite3  # noqa: F401
import ssl  # noqa: F401

REQUESTS = os.fdopen(3, "rb", buffering=0)
REPLIES = os.fdopen(4, "wb", buffering=0)


class _Interrupts:
    """Where SIGINT may raise: `armed` while the cell's code runs; `busy` from a request's arrival to its
    answer (an interrupt then is `pending` until the cell starts)."""
    armed = False
    busy = False
    pending = False


def _on_sigint(signum, frame):
    if _Interrupts.armed:
        raise KeyboardInterrupt
    if _Interrupts.busy:
        _Interrupts.pending = True


def _arm():
    _Interrupts.armed = True
    if _Interrupts.pending:
        _Interrupts.pending = False
        raise KeyboardInterrupt


def reply(obj):
    REPLIES.write((json.dumps(obj) + "\n").encode())


def user_traceback(exc):
    """The traceback without the runner's own frames."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename == __file__:
        tb = tb.tb_next
    return "".join(traceback.format_exception(type(exc), exc, tb))


def failure(status, exc):
    return {"status": status, "value": None,
            "error": {"name": type(exc).__name__, "message": str(exc), "traceback": user_traceback(exc)}}


_cells = itertools.count(1)


def run(code, namespace):
    # Each cell's source under a name of its own, so that tracebacks show its lines (also of functions it
    # defined, called from later cells), as notebooks do.
    name = f"<cell-{next(_cells)}>"
    linecache.cache[name] = (len(code), None, code.splitlines(True), name)
    try:
        tree = ast.parse(code, name, "exec")
    except SyntaxError as e:
        return {"status": "error", "value": None,
                "error": {"name": "SyntaxError", "message": str(e),
                          "traceback": "".join(traceback.format_exception_only(type(e), e))}}
    last = None
    if tree.body and isinstance(tree.body[-1], ast.Expr):
        last = ast.Expression(tree.body.pop().value)
    try:
        try:
            _arm()
            exec(compile(tree, name, "exec"), namespace)
            value = None
            if last is not None:
                result = eval(compile(last, name, "eval"), namespace)
                if result is not None:
                    namespace["_"] = result
                    value = repr(result)
        finally:
            _Interrupts.armed = False
        return {"status": "ok", "value": value, "error": None}
    except KeyboardInterrupt as e:
        return failure("interrupted", e)
    except BaseException as e:  # SystemExit too: exit() in a cell ends the cell, not the runner
        return failure("error", e)
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass


def fresh_namespace():
    return {"__name__": "__main__", "__builtins__": __builtins__}


def with_env(env, fn):
    """fn() with `env` set in os.environ, then the previous values back."""
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update({str(k): str(v) for k, v in env.items()})
    try:
        return fn()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def main():
    sys.stdin = open(os.devnull)
    signal.signal(signal.SIGINT, _on_sigint)
    namespace = fresh_namespace()
    contexts = {}
    reply({"ready": True, "python": sys.version.split()[0], "pid": os.getpid()})
    while True:
        _Interrupts.busy = False
        _Interrupts.pending = False
        line = REQUESTS.readline()
        _Interrupts.busy = True
        if not line:
            return  # the agent went away
        try:
            req = json.loads(line)
            rid, code = req["id"], req["code"]
        except (ValueError, KeyError, TypeError) as e:
            reply({"id": None, "status": "error", "value": None,
                   "error": {"name": "ProtocolError", "message": str(e), "traceback": ""}})
            continue
        if req.get("reseed"):
            # A restored clone: its interpreter's PRNG state is the template's. Fresh seed from the guest's
            # entropy pool, which the agent refreshed.
            random.seed()
        ctx = req.get("context")
        ns = namespace if not ctx else contexts.setdefault(str(ctx), fresh_namespace())
        env = req.get("env") or {}
        out = with_env(env, lambda: run(code, ns)) if env else run(code, ns)
        out["id"] = rid
        reply(out)


if __name__ == "__main__":
    main()
