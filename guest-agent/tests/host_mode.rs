//! The agent in host mode (`--listen unix:PATH`), driven through the client library.
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use flint_agent::client::{AgentClient, ClientError, Endpoint, ExecEvent};
use flint_agent::protocol::{ErrorCode, ExecRequest, FileKind, Frame, FsOp, Request, Response};
use tokio::io::AsyncWriteExt;

struct Agent {
    child: Child,
    dir: PathBuf,
    sock: PathBuf,
}

impl Agent {
    fn start(tag: &str, extra: &[&str]) -> Agent {
        Self::start_prepared(tag, extra, |_| ())
    }

    /// Starts the agent after `prepare` has filled its root.
    fn start_prepared(tag: &str, extra: &[&str], prepare: impl FnOnce(&Path)) -> Agent {
        let dir = std::env::temp_dir().join(format!("flint-agent-test-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("root")).unwrap();
        prepare(&dir.join("root"));
        let sock = dir.join("agent.sock");
        let child = Command::new(env!("CARGO_BIN_EXE_flint-agent"))
            .arg("--listen")
            .arg(format!("unix:{}", sock.display()))
            .arg("--root")
            .arg(dir.join("root"))
            .arg("--hooks-dir")
            .arg(dir.join("hooks"))
            .args(extra)
            // What a pvm-native kernel command line hands PID 1: passed on to every process. The
            // rest of the agent's environment is not.
            .env("GLIBC_TUNABLES", "glibc.cpu.hwcaps=-AVX2")
            .env("FLINT_TEST_PRIVATE", "agent-only")
            .spawn()
            .unwrap();
        let t = Instant::now();
        while !sock.exists() {
            assert!(t.elapsed() < Duration::from_secs(10), "agent did not start");
            std::thread::sleep(Duration::from_millis(10));
        }
        // The socket appears where it was asked for only once it listens; its staging name is gone.
        assert!(!dir.join("agent.sock~").exists(), "staging socket left behind");
        Agent { child, dir, sock }
    }

    fn root(&self) -> PathBuf {
        self.dir.join("root")
    }

    async fn client(&self) -> AgentClient {
        AgentClient::connect(&Endpoint::Unix(self.sock.clone()), Duration::from_secs(5)).await.unwrap()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn sh(script: &str) -> ExecRequest {
    ExecRequest { argv: vec!["/bin/sh".into(), "-c".into(), script.into()], ..Default::default() }
}

#[tokio::test]
async fn health_and_simple_exec() {
    let a = Agent::start("health", &[]);
    let c = a.client().await;
    let h = c.health().await.unwrap();
    assert_eq!(h.protocol, 1);
    assert!(h.mem_total_kb > 0);
    let out = c.run(&["/bin/echo", "hello", "world"]).await.unwrap();
    assert_eq!(out.stdout, b"hello world\n");
    assert_eq!(out.code, Some(0));
    let out = c.exec_output(sh("echo out; echo err >&2; exit 3")).await.unwrap();
    assert_eq!((out.stdout.as_slice(), out.stderr.as_slice(), out.code), (&b"out\n"[..], &b"err\n"[..], Some(3)));
    // env and cwd
    std::fs::create_dir_all(a.root().join("work")).unwrap();
    let mut req = sh("echo $GREETING; pwd");
    req.env.insert("GREETING".into(), "hi".into());
    req.cwd = Some("/work".into());
    let out = c.exec_output(req).await.unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), format!("hi\n{}\n", a.root().join("work").display()));
    let out = c.exec_output(sh("echo \"$GLIBC_TUNABLES|$FLINT_TEST_PRIVATE\"")).await.unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "glibc.cpu.hwcaps=-AVX2|\n");
    // a program that does not exist
    let e = c.run(&["/no/such/program"]).await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::NotFound), "{e}");
}

#[tokio::test]
async fn concurrent_execs_interleave_output() {
    let a = Agent::start("concurrent", &[]);
    let c = a.client().await;
    // Each prints a line, then waits for the other's marker file before finishing: they can
    // only both finish if both run at the same time on the one connection.
    let root = a.root();
    let s1 = format!(
        "echo one-start; touch {r}/m1; while [ ! -e {r}/m2 ]; do sleep 0.01; done; echo one-end",
        r = root.display()
    );
    let s2 = format!(
        "echo two-start; touch {r}/m2; while [ ! -e {r}/m1 ]; do sleep 0.01; done; echo two-end",
        r = root.display()
    );
    let (o1, o2) = tokio::time::timeout(Duration::from_secs(20), async {
        tokio::join!(c.exec_output(sh(&s1)), c.exec_output(sh(&s2)))
    })
    .await
    .expect("both execs finish");
    assert_eq!(o1.unwrap().stdout, b"one-start\none-end\n");
    assert_eq!(o2.unwrap().stdout, b"two-start\ntwo-end\n");
}

#[tokio::test]
async fn output_streams_as_it_is_produced() {
    let a = Agent::start("stream", &[]);
    let c = a.client().await;
    // The process prints its second line only once the test has seen the first: output that
    // arrived only at exit would never let it finish (no timing window, however loaded the host).
    let go = a.root().join("go");
    let mut s = c
        .exec(sh(&format!("echo first; while [ ! -e {} ]; do sleep 0.01; done; echo second", go.display())))
        .await
        .unwrap();
    let first = tokio::time::timeout(Duration::from_secs(60), s.next())
        .await
        .expect("the first chunk arrives while the process still runs")
        .unwrap();
    assert_eq!(first, Some(ExecEvent::Stdout(b"first\n".to_vec())));
    std::fs::write(&go, b"").unwrap();
    let mut rest = Vec::new();
    while let Some(ev) = s.next().await.unwrap() {
        rest.push(ev);
    }
    assert_eq!(rest.first(), Some(&ExecEvent::Stdout(b"second\n".to_vec())));
    assert!(matches!(rest.last(), Some(ExecEvent::Exit { code: Some(0), .. })));
}

#[tokio::test]
async fn stdin_streams_to_the_process() {
    let a = Agent::start("stdin", &[]);
    let c = a.client().await;
    let mut req = ExecRequest { argv: vec!["/usr/bin/wc".into(), "-c".into()], ..Default::default() };
    req.stdin = true;
    let mut s = c.exec(req).await.unwrap();
    let data = vec![b'x'; 300_000];
    s.write_stdin(&data).await.unwrap();
    s.close_stdin().await.unwrap();
    let mut out = Vec::new();
    while let Some(ev) = s.next().await.unwrap() {
        if let ExecEvent::Stdout(b) = ev {
            out.extend(b);
        }
    }
    assert_eq!(String::from_utf8_lossy(&out).trim(), "300000");
}

/// A terminal session: the process has a tty of the requested size as stdin/stdout/stderr and controlling
/// terminal, typed input reaches it, a resize is seen, ^D (EOF) and `exit` end it with its status.
#[tokio::test]
async fn a_tty_exec_is_a_terminal_that_resizes() {
    let a = Agent::start("tty", &[]);
    let c = a.client().await;
    let req = ExecRequest {
        argv: vec!["/bin/sh".into()],
        stdin: true,
        tty: Some(flint_agent::protocol::TtySize { rows: 30, cols: 100 }),
        ..Default::default()
    };
    let mut s = c.exec(req).await.unwrap();
    let mut out = String::new();
    async fn until(s: &mut flint_agent::client::ExecStream<'_>, out: &mut String, want: &str) -> Option<ExecEvent> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while !out.contains(want) {
            match tokio::time::timeout_at(deadline, s.next()).await {
                Ok(Ok(Some(ExecEvent::Stdout(b)))) => out.push_str(&String::from_utf8_lossy(&b)),
                Ok(Ok(Some(ev @ ExecEvent::Exit { .. }))) => return Some(ev),
                other => panic!("waiting for {want:?}: {other:?}; output so far: {out:?}"),
            }
        }
        None
    }
    s.write_stdin(b"test -t 0 && test -t 2 && echo IS-A-$((6*7))-TTY; stty size; tty\n").await.unwrap();
    until(&mut s, &mut out, "IS-A-42-TTY").await;
    until(&mut s, &mut out, "30 100").await;
    until(&mut s, &mut out, "/dev/pts/").await;
    s.resize(40, 120).await.unwrap();
    s.write_stdin(b"stty size | tr ' ' x\n").await.unwrap();
    until(&mut s, &mut out, "40x120").await;
    s.write_stdin(b"exit 3\n").await.unwrap();
    let exit = until(&mut s, &mut out, "\u{0}never").await;
    assert!(matches!(exit, Some(ExecEvent::Exit { code: Some(3), .. })), "{exit:?} {out:?}");
}

#[tokio::test]
async fn kill_and_timeout() {
    let a = Agent::start("kill", &[]);
    let c = a.client().await;
    let mut s = c.exec(sh("sleep 30")).await.unwrap();
    s.signal(libc::SIGTERM).await.unwrap();
    let mut exit = None;
    while let Some(ev) = tokio::time::timeout(Duration::from_secs(10), s.next()).await.unwrap().unwrap() {
        if let ExecEvent::Exit { signal, timed_out, .. } = ev {
            exit = Some((signal, timed_out));
        }
    }
    assert_eq!(exit, Some((Some(libc::SIGTERM), false)));

    let mut req = sh("sleep 30 | cat");
    req.timeout_ms = Some(300);
    let t = Instant::now();
    let out = c.exec_output(req).await.unwrap();
    assert!(out.timed_out);
    assert_eq!(out.signal, Some(libc::SIGKILL));
    assert!(t.elapsed() < Duration::from_secs(10), "timeout killed the whole pipeline");
}

fn checksum(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3))
}

#[tokio::test]
async fn files_round_trip_50_mib() {
    let a = Agent::start("files", &[]);
    let c = a.client().await;
    let mut data = vec![0u8; 50 << 20];
    let mut x = 0x1234_5678u32;
    for b in data.iter_mut() {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        *b = x as u8;
    }
    c.mkdir("/data/nested").await.unwrap();
    let n = c.write_file("/data/nested/blob.bin", 0o600, &data).await.unwrap();
    assert_eq!(n, data.len() as u64);
    let st = c.stat("/data/nested/blob.bin").await.unwrap();
    assert_eq!((st.kind, st.size, st.mode), (FileKind::File, data.len() as u64, 0o600));
    let back = c.read_file("/data/nested/blob.bin").await.unwrap();
    assert_eq!(back.len(), data.len());
    assert_eq!(checksum(&back), checksum(&data));
    // The bytes on disk are the same too (the agent's root is a plain directory here).
    assert_eq!(checksum(&std::fs::read(a.root().join("data/nested/blob.bin")).unwrap()), checksum(&data));

    let names: Vec<String> = c.list("/data/nested").await.unwrap().into_iter().map(|e| e.name).collect();
    assert_eq!(names, vec!["blob.bin".to_string()]);
    c.rename("/data/nested/blob.bin", "/data/moved.bin").await.unwrap();
    assert_eq!(c.stat("/data/nested/blob.bin").await.unwrap_err().code(), Some(ErrorCode::NotFound));
    c.remove("/data", true).await.unwrap();
    assert_eq!(c.stat("/data").await.unwrap_err().code(), Some(ErrorCode::NotFound));
}

#[tokio::test]
async fn file_errors_are_clear() {
    let a = Agent::start("errors", &["--max-file-bytes", "1000"]);
    let c = a.client().await;
    std::fs::write(a.root().join("plain"), b"x").unwrap();
    assert_eq!(c.read_file("/missing").await.unwrap_err().code(), Some(ErrorCode::NotFound));
    assert_eq!(c.list("/plain").await.unwrap_err().code(), Some(ErrorCode::NotADirectory));
    assert_eq!(c.stat("/plain/x").await.unwrap_err().code(), Some(ErrorCode::NotADirectory));
    assert_eq!(c.read_file("/../etc/passwd").await.unwrap_err().code(), Some(ErrorCode::BadPath));
    assert_eq!(c.stat("relative").await.unwrap_err().code(), Some(ErrorCode::BadPath));
    assert_eq!(c.read_file("/").await.unwrap_err().code(), Some(ErrorCode::IsADirectory));
    let e = c.write_file("/big", 0o644, &[0u8; 5000]).await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::TooLarge), "{e}");
    assert!(!a.root().join("big").exists(), "a refused upload leaves nothing behind");
    assert_eq!(c.remove("/", true).await.unwrap_err().code(), Some(ErrorCode::BadPath));
    assert_eq!(c.remove("/nope", false).await.unwrap_err().code(), Some(ErrorCode::NotFound));
    // The connection is still good after all those errors.
    assert!(c.health().await.is_ok());
}

/// Files and directories made for a user are that user's (parents included); stat and list name owners and
/// groups from the image's own /etc/passwd and /etc/group, and give a symlink's target.
#[tokio::test]
async fn files_can_be_owned_by_a_user_and_say_whose_they_are() {
    let a = Agent::start_prepared("owners", &[], |root| {
        std::fs::create_dir_all(root.join("etc")).unwrap();
        std::fs::write(root.join("etc/passwd"), "root:x:0:0::/root:/bin/sh\nuser:x:4242:4343::/home/user:/bin/bash\n")
            .unwrap();
        std::fs::write(root.join("etc/group"), "root:x:0:\nusers:x:4343:\n").unwrap();
    });
    let c = a.client().await;
    c.write_file_as("/home/user/sub/f.txt", 0o644, Some("user"), &b"hi"[..]).await.unwrap();
    for p in ["/home/user/sub/f.txt", "/home/user/sub", "/home/user"] {
        let st = c.stat(p).await.unwrap();
        assert_eq!((st.owner.as_str(), st.group.as_str()), ("user", "users"), "{p}");
    }
    c.mkdir_as("/home/user/d1/d2", Some("4242"), false).await.unwrap();
    assert_eq!(c.stat("/home/user/d1").await.unwrap().owner, "user");
    let e = c.mkdir_as("/home/user/d1", Some("user"), true).await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::AlreadyExists), "{e}");
    c.mkdir_as("/home/user/d1", Some("user"), false).await.unwrap();
    assert_eq!(c.mkdir_as("/x", Some("nobody-here"), false).await.unwrap_err().code(), Some(ErrorCode::Invalid));
    std::os::unix::fs::symlink("sub/f.txt", a.root().join("home/user/link")).unwrap();
    let entries = c.list("/home/user").await.unwrap();
    let link = entries.iter().find(|e| e.name == "link").unwrap();
    assert_eq!(
        (link.kind, link.target.as_deref(), link.owner.as_str()),
        (FileKind::Symlink, Some("sub/f.txt"), "root")
    );
    let f = entries.iter().find(|e| e.name == "sub").unwrap();
    assert!(f.mtime_s > 0 && f.owner == "user", "{f:?}");
}

#[tokio::test]
async fn refresh_and_hooks() {
    let a = Agent::start("refresh", &[]);
    let hooks = a.dir.join("hooks/after-restore.d");
    std::fs::create_dir_all(&hooks).unwrap();
    let marker = a.dir.join("hook-ran");
    let hook = hooks.join("10-mark");
    std::fs::write(&hook, format!("#!/bin/sh\necho ran > {}\n", marker.display())).unwrap();
    std::os::unix::fs::PermissionsExt::set_mode(&mut std::fs::metadata(&hook).unwrap().permissions(), 0o755);
    std::fs::set_permissions(&hook, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let c = a.client().await;
    let mut env = std::collections::BTreeMap::new();
    env.insert("FLINT_CLONE_ID".into(), "clone-7".into());
    match c.refresh(env, None).await.unwrap() {
        Response::Refreshed { clock_step_ns, entropy_bytes, hooks_run, guest_us, steps_us } => {
            assert!(clock_step_ns.unwrap().abs() < 1_000_000_000);
            assert_eq!((entropy_bytes, hooks_run), (64, 1));
            // The agent accounts for its time, step by step.
            let steps: Vec<&str> = steps_us.keys().map(String::as_str).collect();
            assert_eq!(steps, ["clock", "entropy", "env_hostname", "hooks"]);
            assert!(guest_us.unwrap() >= steps_us.values().sum::<u64>());
        }
        other => panic!("{other:?}"),
    }
    assert!(marker.exists());
    let out = c.exec_output(sh("echo $FLINT_CLONE_ID")).await.unwrap();
    assert_eq!(out.stdout, b"clone-7\n");
    assert!(out.guest_us.is_some_and(|us| us > 0), "the exit says how long the agent took");
    c.before_checkpoint().await.unwrap();
    // A host-mode agent refuses to shut the host down.
    assert_eq!(c.shutdown().await.unwrap_err().code(), Some(ErrorCode::Invalid));
}

#[tokio::test]
async fn bad_versions_and_malformed_frames_do_not_hurt_the_agent() {
    let a = Agent::start("malformed", &[]);
    // Wrong protocol version: a clear error.
    let mut s = tokio::net::UnixStream::connect(&a.sock).await.unwrap();
    flint_agent::protocol::write_frame(&mut s, &Frame::json(1, &Request::Hello { version: 99 })).await.unwrap();
    let f = flint_agent::protocol::read_frame(&mut s).await.unwrap();
    let r: Response = serde_json::from_slice(&f.payload).unwrap();
    assert!(matches!(r, Response::Error { code: ErrorCode::UnsupportedVersion, .. }), "{r:?}");
    // Garbage: an oversized length, then random bytes.
    let mut s = tokio::net::UnixStream::connect(&a.sock).await.unwrap();
    s.write_all(&[0xff, 0xff, 0xff, 0xff, 1, 2, 3]).await.unwrap();
    let mut s2 = tokio::net::UnixStream::connect(&a.sock).await.unwrap();
    s2.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
    drop(s2);
    // JSON that is not a request, after a good hello.
    let mut s3 = tokio::net::UnixStream::connect(&a.sock).await.unwrap();
    flint_agent::protocol::write_frame(&mut s3, &Frame::json(1, &Request::Hello { version: 1 })).await.unwrap();
    flint_agent::protocol::write_frame(&mut s3, &Frame { kind: 1, stream: 2, payload: b"{\"type\":\"exec\"".to_vec() })
        .await
        .unwrap();
    let _ = flint_agent::protocol::read_frame(&mut s3).await.unwrap();
    let f = flint_agent::protocol::read_frame(&mut s3).await.unwrap();
    let r: Response = serde_json::from_slice(&f.payload).unwrap();
    assert!(matches!(r, Response::Error { code: ErrorCode::Invalid, .. }), "{r:?}");
    // Still healthy for a new client.
    let c = a.client().await;
    assert!(c.health().await.is_ok());
    assert!(Path::new(&a.sock).exists());
    let e = AgentClient::connect(&Endpoint::Unix(a.dir.join("nope.sock")), Duration::from_secs(1)).await.err().unwrap();
    assert!(matches!(e, ClientError::Connect(..)), "{e}");
}

/// The Python image's runner (images/python/runner.py) under the host's python3: state between runs, values,
/// tracebacks, timeouts that keep the runner, a runner that ignores the interrupt is replaced.
#[tokio::test]
async fn python_runner_keeps_state_and_survives_timeouts() {
    use flint_agent::protocol::{RunRequest, RunStatus};
    if Command::new("python3").arg("-c").arg("pass").status().map(|s| !s.success()).unwrap_or(true) {
        panic!("python3 is needed on the host for this test (Debian package python3)");
    }
    let runner = Path::new(env!("CARGO_MANIFEST_DIR")).join("../images/python/runner.py");
    let a = Agent::start_prepared("runner", &[], |root| {
        std::fs::create_dir_all(root.join("etc/flint")).unwrap();
        let cfg = serde_json::json!({
            "name": "test",
            "env": {"FLINT_IMAGE_VAR": "from-image"},
            "runners": {"python": {"argv": ["python3", "-u", runner.canonicalize().unwrap()]}}
        });
        std::fs::write(root.join("etc/flint/image.json"), cfg.to_string()).unwrap();
    });
    let c = a.client().await;
    let run = py_cell;
    let o = c.run_code(run("print(6*7)", None)).await.unwrap();
    let d = o.done.clone().unwrap();
    assert_eq!((String::from_utf8_lossy(&o.stdout).as_ref(), d.status, d.value), ("42\n", RunStatus::Ok, None));
    let d = c
        .run_code(run("import json, sqlite3, hashlib, ssl, os\nx = 1\nos.environ['FLINT_IMAGE_VAR']", None))
        .await
        .unwrap()
        .done
        .unwrap();
    assert_eq!((d.status, d.value.as_deref()), (RunStatus::Ok, Some("'from-image'")), "{d:?}");
    let d = c.run_code(run("x + 1", None)).await.unwrap().done.unwrap();
    assert_eq!(d.value.as_deref(), Some("2"));
    // An exception: a traceback of the cell's frames only, and the runner lives on.
    let o = c.run_code(run("def f():\n    return 1/0\nf()", None)).await.unwrap();
    let d = o.done.unwrap();
    let e = d.error.clone().unwrap();
    assert_eq!((d.status, e.name.as_str()), (RunStatus::Error, "ZeroDivisionError"), "{d:?}");
    assert!(
        e.traceback.contains("<cell-") && e.traceback.contains("return 1/0") && !e.traceback.contains("runner.py"),
        "{}",
        e.traceback
    );
    let d = c.run_code(run("exit(3)", None)).await.unwrap().done.unwrap();
    assert_eq!((d.status, d.error.unwrap().name.as_str()), (RunStatus::Error, "SystemExit"));
    let d = c.run_code(run("1 +", None)).await.unwrap().done.unwrap();
    assert_eq!((d.status, d.error.unwrap().name.as_str()), (RunStatus::Error, "SyntaxError"));
    // Output streams while the code runs, stderr apart.
    let o = c
        .run_code(run("import sys\nfor i in range(3000): print('y' * 99)\nprint('oops', file=sys.stderr)", None))
        .await
        .unwrap();
    assert_eq!((o.stdout.len(), String::from_utf8_lossy(&o.stderr).as_ref()), (300_000, "oops\n"));
    a_timeout_interrupts_the_code_not_the_runner(&c).await;
    // Contexts: namespaces of their own in the one runner; env set for one run only.
    let ctx = |code: &str, context: &str| RunRequest {
        language: "python".into(),
        code: code.into(),
        context: Some(context.into()),
        env: [("FLINT_CELL_VAR".to_string(), "cell".to_string())].into(),
        ..Default::default()
    };
    let d = c.run_code(ctx("x = 'in-b'\nimport os\nos.environ['FLINT_CELL_VAR']", "b")).await.unwrap().done.unwrap();
    assert_eq!(d.value.as_deref(), Some("'cell'"), "{d:?}");
    assert_eq!(c.run_code(ctx("x", "b")).await.unwrap().done.unwrap().value.as_deref(), Some("'in-b'"));
    let d = c.run_code(run("import os\n(x, os.environ.get('FLINT_CELL_VAR'))", None)).await.unwrap().done.unwrap();
    assert_eq!(d.value.as_deref(), Some("(1, None)"), "the default context is untouched, the env restored");
    // Code that ignores the interrupt costs the runner: killed, replaced, and the answer says the state is gone.
    let code = "import signal, time\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\nwhile True: time.sleep(0.01)";
    let d = c.run_code(run(code, Some(300))).await.unwrap().done.unwrap();
    assert_eq!((d.status, d.restarted), (RunStatus::Timeout, true), "{d:?}");
    let d = c.run_code(run("'x' in globals()", None)).await.unwrap().done.unwrap();
    assert_eq!((d.status, d.value.as_deref()), (RunStatus::Ok, Some("False")));
    // No such runner: a clear error.
    let err =
        c.run_code(RunRequest { language: "ruby".into(), code: "1".into(), ..Default::default() }).await.unwrap_err();
    assert!(
        matches!(&err, ClientError::Agent { code: ErrorCode::NotFound, message } if message.contains("it has: python")),
        "{err}"
    );
}

/// A Python cell of the default context.
fn py_cell(code: &str, timeout_ms: Option<u64>) -> flint_agent::protocol::RunRequest {
    flint_agent::protocol::RunRequest { language: "python".into(), code: code.into(), timeout_ms, ..Default::default() }
}

/// A timeout interrupts the code, not the runner (`x` stays 1); so does the host's interrupt of a run.
async fn a_timeout_interrupts_the_code_not_the_runner(c: &AgentClient) {
    use flint_agent::protocol::RunStatus;
    let run = py_cell;
    // A timeout interrupts the code, not the runner: the state is still there. The interrupt is safe wherever it
    // lands: with timeouts of a few milliseconds it arrives while the runner still reads or parses the request
    // (held, then raised as the cell starts), never killing the runner however loaded the machine is.
    // A long cell (a comment near MAX_RUN_CODE, escaped in JSON) keeps the runner in its own code (reading,
    // decoding) for a while.
    let long = format!("# {}\nwhile True: pass", "\\\"".repeat(60_000));
    for (code, timeout_ms) in [("while True: pass", 500), (long.as_str(), 1), (long.as_str(), 2), (long.as_str(), 4)]
        .into_iter()
        .chain([1, 2, 3, 5, 8, 13, 21].map(|t| ("while True: pass", t)))
    {
        let d = c.run_code(run(code, Some(timeout_ms))).await.unwrap().done.unwrap();
        assert_eq!(
            (d.status, d.restarted, d.error.as_ref().map(|e| e.name.as_str())),
            (RunStatus::Timeout, false, Some("KeyboardInterrupt")),
            "timeout {timeout_ms} ms: {d:?}"
        );
    }
    let d = c.run_code(run("x", None)).await.unwrap().done.unwrap();
    assert_eq!(d.value.as_deref(), Some("1"));
    // The host may interrupt a run without a timeout (its caller went away).
    let mut s = c.run_code_stream(run("while True: pass", None)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    s.interrupt().await.unwrap();
    let done = loop {
        if let Some(flint_agent::client::RunEvent::Done(d)) = s.next().await.unwrap() {
            break d;
        }
    };
    assert_eq!((done.status, done.restarted), (RunStatus::Timeout, false), "{done:?}");
    drop(s);
}

/// Reads a watch's batches until `want` are all among them (in any order, others allowed), within a minute.
async fn watch_until(
    w: &mut flint_agent::client::WatchStream<'_>,
    seen: &mut Vec<(String, FsOp)>,
    want: &[(&str, FsOp)],
) {
    let all = |seen: &Vec<(String, FsOp)>| want.iter().all(|(n, op)| seen.iter().any(|(m, o)| m == n && o == op));
    let deadline = Instant::now() + Duration::from_secs(60);
    while !all(seen) {
        let left = deadline.saturating_duration_since(Instant::now());
        let batch = tokio::time::timeout(left, w.next()).await.unwrap_or_else(|_| panic!("never {want:?}: {seen:?}"));
        seen.extend(batch.unwrap().expect("the watch ended early").into_iter().map(|e| (e.name, e.op)));
    }
}

#[tokio::test]
async fn a_watch_reports_changes_below_a_directory_until_stopped() {
    use FsOp::*;
    let a = Agent::start("watch", &[]);
    let c = a.client().await;
    let w_dir = a.root().join("w");
    std::fs::create_dir_all(w_dir.join("old/deep")).unwrap();
    let err = c.watch("/nope", false).await.err().unwrap();
    assert_eq!(err.code(), Some(ErrorCode::NotFound), "{err}");
    std::fs::write(a.root().join("file"), b"x").unwrap();
    assert_eq!(c.watch("/file", false).await.err().unwrap().code(), Some(ErrorCode::NotADirectory));

    let mut w = c.watch("/w", true).await.unwrap();
    let mut seen = Vec::new();
    std::fs::write(w_dir.join("a.txt"), b"1").unwrap();
    std::io::Write::write_all(&mut std::fs::OpenOptions::new().append(true).open(w_dir.join("a.txt")).unwrap(), b"2")
        .unwrap();
    std::fs::set_permissions(w_dir.join("a.txt"), std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    std::fs::rename(w_dir.join("a.txt"), w_dir.join("b.txt")).unwrap();
    std::fs::remove_file(w_dir.join("b.txt")).unwrap();
    watch_until(&mut w, &mut seen, &[("a.txt", Create), ("a.txt", Write), ("a.txt", Chmod), ("a.txt", Rename)]).await;
    watch_until(&mut w, &mut seen, &[("b.txt", Create), ("b.txt", Remove)]).await;
    // Directories that existed before the watch, and those made after it, with what is made in them at once.
    std::fs::write(w_dir.join("old/deep/x"), b"").unwrap();
    std::fs::create_dir_all(w_dir.join("new/sub")).unwrap();
    std::fs::write(w_dir.join("new/sub/f"), b"").unwrap();
    watch_until(&mut w, &mut seen, &[("old/deep/x", Create), ("new", Create), ("new/sub/f", Create)]).await;
    std::fs::write(w_dir.join("new/sub/g"), b"").unwrap();
    watch_until(&mut w, &mut seen, &[("new/sub/g", Create)]).await;
    w.stop().await.unwrap();
    while w.next().await.unwrap().is_some() {}

    // Not recursive: a subdirectory's contents are not reported; the directory going ends the watch.
    let mut w = c.watch("/w", false).await.unwrap();
    std::fs::write(w_dir.join("old/deep/y"), b"").unwrap();
    std::fs::write(w_dir.join("top"), b"").unwrap();
    let mut seen = Vec::new();
    watch_until(&mut w, &mut seen, &[("top", Create)]).await;
    assert!(!seen.iter().any(|(n, _)| n.contains("deep")), "{seen:?}");
    std::fs::remove_dir_all(&w_dir).unwrap();
    let t = Instant::now();
    while let Some(batch) = w.next().await.unwrap() {
        assert!(t.elapsed() < Duration::from_secs(60), "the watch never ended: {batch:?}");
    }
    // The connection still serves calls.
    assert!(c.health().await.is_ok());
}
