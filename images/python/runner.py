"""Flint's warm Python runner (docs/agent-protocol.md, "Runners").

flint-agent starts this at boot and keeps it running; a template's snapshot captures it warm (interpreter
started, common modules imported), so a clone answers its first cell without starting Python.

Protocol: one JSON object per line. Requests arrive on fd 3: {"id": N, "code": "...", "reseed": bool};
replies leave on fd 4: first {"ready": true, ...} once, then one {"id": N, "status": "ok"|"error"|
"interrupted", "value": repr-or-null, "error": {"name", "message", "traceback"}-or-null} per request.
The code's stdout and stderr are this process's fds 1 and 2, which the agent streams to the caller. State
(globals) lives on from one request to the next, like a notebook kernel. The agent interrupts a request that
runs past its timeout with SIGINT (KeyboardInterrupt); the runner answers and takes the next one.
"""
import ast
import json
import os
import random
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
CELL = "<cell>"


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


def run(code, namespace):
    try:
        tree = ast.parse(code, CELL, "exec")
    except SyntaxError as e:
        return {"status": "error", "value": None,
                "error": {"name": "SyntaxError", "message": str(e),
                          "traceback": "".join(traceback.format_exception_only(type(e), e))}}
    last = None
    if tree.body and isinstance(tree.body[-1], ast.Expr):
        last = ast.Expression(tree.body.pop().value)
    try:
        exec(compile(tree, CELL, "exec"), namespace)
        value = None
        if last is not None:
            result = eval(compile(last, CELL, "eval"), namespace)
            if result is not None:
                namespace["_"] = result
                value = repr(result)
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


def main():
    sys.stdin = open(os.devnull)
    namespace = {"__name__": "__main__", "__builtins__": __builtins__}
    reply({"ready": True, "python": sys.version.split()[0], "pid": os.getpid()})
    while True:
        try:
            line = REQUESTS.readline()
        except KeyboardInterrupt:
            continue  # an interrupt that arrived between requests
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
        try:
            out = run(code, namespace)
        except KeyboardInterrupt as e:  # landed outside the cell's own handler
            out = failure("interrupted", e)
        out["id"] = rid
        try:
            reply(out)
        except KeyboardInterrupt:
            reply(out)


if __name__ == "__main__":
    main()
