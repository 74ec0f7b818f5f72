//! The API edge: error statuses (the same as the front end's), streamed files, the OpenAPI document.
use std::time::Duration;

use crate::error::{Classify, Kind, Refusal};
use crate::fake::{wait_for, FakeLauncher, TestEnv as Env};
use crate::vm::CreateVm;

/// An error as each edge turns it into an answer (built twice: errors hold sources and are not Clone).
fn both<E: Classify>(make: impl Fn() -> E) -> (Kind, super::ApiError, Refusal) {
    (make().kind(), super::ApiError::from(make()), Refusal::from(make()))
}

/// One error of each kind, from each layer that makes them.
fn errors() -> Vec<(Kind, super::ApiError, Refusal)> {
    use crate::services::sessions::SessionError;
    use crate::vm::{StartError, VmError, VmStatus};
    vec![
        both(|| VmError::NotFound("x".into())),
        both(|| VmError::WrongStatus { id: "x".into(), status: VmStatus::Paused, want: "running" }),
        both(|| VmError::Invalid("bad".into())),
        both(|| VmError::Agent { id: "x".into(), what: "w".into(), why: "gone".into(), code: None }),
        both(|| StartError::Quota("full".into())),
        both(|| StartError::Died { id: "x".into(), why: "boom".into() }),
        both(|| SessionError::Failed("lost".into())),
        both(|| SessionError::Unavailable("bucket".into())),
        both(|| SessionError::Internal("bug".into())),
        both(|| crate::net::NetError::NotRoot),
        both(|| crate::net::PolicyError("nope".into())),
        both(|| crate::daemon::CallError::NotFound("x".into(), String::new())),
    ]
}

/// The API and the front end give every error the same status (both use `Kind::status`, nothing else).
#[test]
fn the_api_and_the_front_end_agree() {
    use axum::response::IntoResponse;
    let mut kinds = std::collections::HashSet::new();
    for (kind, api, front) in errors() {
        let api_status = api.into_response().status().as_u16();
        let reply = crate::net::front::reply(&front);
        let line = String::from_utf8_lossy(&reply).lines().next().unwrap_or("").to_string();
        let front_status: u16 = line.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap();
        assert_eq!((api_status, front_status), (kind.status(), kind.status()), "{kind:?}: {line}");
        kinds.insert(kind);
    }
    assert!(kinds.len() >= 6, "the errors cover several kinds: {kinds:?}");
}

/// What a guest sends cannot grow flintd: a file download is streamed and capped (a 4 GiB file is a 413 before
/// any byte moves; an endless device ends at the cap), whatever size the guest reports.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guest_files_are_streamed_and_capped() {
    let mut env = Env::new("files");
    env.cfg.max_file_read_bytes = 1 << 20;
    let l = FakeLauncher::default();
    let d = env.open(&l);
    d.vms.create(CreateVm { id: Some("f".into()), ..Default::default() }, None).await.unwrap();
    let root = crate::fake::agent_root();
    let big = root.join("big-4g");
    std::fs::File::create(&big).unwrap().set_len(4 << 30).unwrap();
    let (sock, server) = serve(&env, &d);
    let get = |path: String| {
        let sock = sock.clone();
        async move { crate::http::request(&sock, "GET", &path, None, Duration::from_secs(60)).await }
    };
    let (status, body) = get("/v1/vms/f/files?path=/big-4g".into()).await.unwrap();
    assert_eq!(status, 413, "{}", String::from_utf8_lossy(&body));
    assert!(
        String::from_utf8_lossy(&body).contains("over the 1048576-byte limit"),
        "{}",
        String::from_utf8_lossy(&body)
    );
    let (status, body) = get("/v1/vms/f/files?path=/big-4g&limit=100".into()).await.unwrap();
    assert_eq!((status, body.len()), (200, 100));
    // Through the client too: without a limit, a file over the client's maximum is an error, not an allocation of
    // the size the guest reports; with one, exactly that much arrives.
    let a = d.vms.agent("f").await.unwrap();
    let e = a.read_file_limit("/big-4g", None).await.unwrap_err();
    assert_eq!(e.code(), Some(flint_agent::protocol::ErrorCode::TooLarge), "{e}");
    assert_eq!(a.read_file_limit("/big-4g", Some(3 << 20)).await.unwrap().len(), 3 << 20);
    // A device reports size 0 and never ends: the body stops at the cap, never complete.
    let zero = root.join("zero-dev");
    let _ = std::fs::remove_file(&zero);
    let c = std::ffi::CString::new(zero.to_str().unwrap()).unwrap();
    // SAFETY: mknod(2) with a valid C path: a character device 1:5 (/dev/zero) in the test's own directory.
    if unsafe { libc::mknod(c.as_ptr(), libc::S_IFCHR | 0o600, libc::makedev(1, 5)) } == 0 {
        match get("/v1/vms/f/files?path=/zero-dev".into()).await {
            Ok((200, body)) => panic!("an endless device came back whole ({} bytes)", body.len()),
            Ok((status, body)) => assert!(status >= 400, "{status} {}", body.len()),
            Err(e) => assert!(e.to_string().contains("malformed"), "{e}"),
        }
        let (status, body) = get("/v1/vms/f/files?path=/zero-dev&limit=4096".into()).await.unwrap();
        assert_eq!((status, body.len()), (200, 4096));
        let _ = std::fs::remove_file(&zero);
    }
    // Uploads stream: 8 MiB (past axum's 2 MiB default for a buffered body) arrive whole.
    let blob: Vec<u8> = (0..8u32 << 20).map(|i| (i.wrapping_mul(2654435761) >> 11) as u8).collect();
    let (status, body) =
        crate::http::request(&sock, "PUT", "/v1/vms/f/files?path=/up.bin", Some(&blob), Duration::from_secs(60))
            .await
            .unwrap();
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    assert_eq!(std::fs::read(root.join("up.bin")).unwrap(), blob);
    let _ = std::fs::remove_file(root.join("up.bin"));
    let _ = std::fs::remove_file(&big);
    server.abort();
    d.vms.stop_all().await;
}

/// The answers of the main routes conform to the schemas docs/api/flintd.yaml gives them (a VM, a session, a
/// template, a snapshot, the health, lists of them).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_conform_to_the_openapi_schemas() {
    let env = Env::new("openapi");
    let l = FakeLauncher::default();
    let d = env.open(&l);
    d.vms.create(CreateVm { id: Some("v".into()), ..Default::default() }, None).await.unwrap();
    let t = crate::services::templates::CreateTemplate { name: "t".into(), ..Default::default() };
    d.create_template(t).await.unwrap();
    let s = crate::services::sessions::CreateSession {
        template: Some("t".into()),
        id: Some("s".into()),
        ..Default::default()
    };
    d.sessions.create(s).await.unwrap();
    let (sock, server) = serve(&env, &d);
    let spec = crate::openapi::Spec::repo().unwrap();
    let mut checked = 0;
    for (path, doc_path) in [
        ("/v1/health", "/v1/health"),
        ("/v1/vms", "/v1/vms"),
        ("/v1/vms/v", "/v1/vms/{id}"),
        ("/v1/sessions", "/v1/sessions"),
        ("/v1/sessions/s", "/v1/sessions/{id}"),
        ("/v1/templates", "/v1/templates"),
        ("/v1/snapshots", "/v1/snapshots"),
        ("/v1/images", "/v1/images"),
    ] {
        let (status, body) = crate::http::request(&sock, "GET", path, None, Duration::from_secs(30)).await.unwrap();
        assert_eq!(status, 200, "{path}: {}", String::from_utf8_lossy(&body));
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        let schema = spec.response_schema("get", doc_path, 200).unwrap_or_else(|| panic!("{doc_path}: no schema"));
        assert_eq!(spec.check(schema, &v), Vec::<String>::new(), "{path}: {v}");
        checked += 1;
    }
    assert_eq!(checked, 8);
    server.abort();
    d.vms.stop_all().await;
}

/// A caller of a (non-interactive) exec that goes away ends the process, a silent one too (it never writes, so a
/// failed send could never tell): flintd drops the agent's stream, which kills the process group.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exec_whose_caller_goes_away_is_killed() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let env = Env::new("exec-gone");
    let l = FakeLauncher::default();
    let d = env.open(&l);
    d.vms.create(CreateVm { id: Some("e".into()), ..Default::default() }, None).await.unwrap();
    let (sock, server) = serve(&env, &d);
    let pidfile = env.dir.join("silent.pid");
    let script = format!("echo $$ > {}.tmp; mv {0}.tmp {0}; exec sleep 1000", pidfile.display());
    let body = serde_json::json!({ "argv": ["/bin/sh", "-c", script] }).to_string();
    let mut conn = tokio::net::UnixStream::connect(&sock).await.unwrap();
    let head = format!(
        "POST /v1/vms/e/exec HTTP/1.1\r\nHost: flintd\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    conn.write_all(format!("{head}{body}").as_bytes()).await.unwrap();
    let mut answer = [0u8; 12];
    conn.read_exact(&mut answer).await.unwrap();
    assert_eq!(&answer, b"HTTP/1.1 200", "the exec's answer began");
    wait_for("the process wrote its pid", || pidfile.exists()).await;
    let pid: u32 = std::fs::read_to_string(&pidfile).unwrap().trim().parse().unwrap();
    let alive = || {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        !stat.is_empty() && !stat.contains(") Z ")
    };
    assert!(alive(), "the silent process runs while its caller waits");
    drop(conn);
    wait_for("the process of a caller that went away ended", || !alive()).await;
    server.abort();
    d.vms.stop_all().await;
}

/// The API of daemon `d` on a socket in the test's directory: its path, and the server's task.
fn serve(
    env: &Env,
    d: &std::sync::Arc<crate::daemon::Daemon>,
) -> (std::path::PathBuf, tokio::task::JoinHandle<std::io::Result<()>>) {
    let sock = env.dir.join("api.sock");
    let listener = tokio::net::UnixListener::bind(&sock).unwrap();
    let app = super::router(d.clone());
    (sock, tokio::spawn(async move { axum::serve(listener, app).await }))
}

/// Listings show an exposed port's token as `(set)` wherever it sits; the call that made it shows it in clear;
/// text that only looks like a token key (in a value) is left alone, and an answer without tokens is the same JSON
/// either way.
#[test]
fn answers_redact_tokens_and_only_tokens() {
    use serde_json::{json, Value};
    let shown = |v: &Value, redact: bool| -> Value {
        serde_json::from_slice(&super::answer_bytes(v, redact).unwrap()).unwrap()
    };
    let port = crate::net::ExposedPort { token: Some("a-token-of-22-chars-ok".into()), tcp_listen: None };
    let rec = json!({"id": "s1", "metadata": {"note": "\"token\":\"x\""}, "network": {"ports": {"8080": port}}});
    let listed = shown(&rec, true);
    assert_eq!(listed["network"]["ports"]["8080"]["token"], "(set)");
    assert_eq!(listed["metadata"]["note"], "\"token\":\"x\"");
    assert_eq!(shown(&rec, false)["network"]["ports"]["8080"]["token"], "a-token-of-22-chars-ok");
    let listed = shown(&json!([rec, rec]), true);
    assert!(listed.as_array().unwrap().iter().all(|r| r["network"]["ports"]["8080"]["token"] == "(set)"));
    for plain in [json!({"id": "s2", "metadata": {"token": 7}}), json!({"id": "s3", "tokens": ["a"]})] {
        assert_eq!(shown(&plain, true), plain);
    }
}
