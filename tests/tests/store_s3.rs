//! The snapshot store against a real S3-compatible server (s3s-fs) started on loopback by the harness.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use flint_snapshot_store::{
    error_chain, ImageSource, S3Config, Secret, SnapshotDraft, Store, StoreConfig, StoreError, DEFAULT_CHUNK_SIZE,
};
use flint_tests::{bin_dir, S3Server, TempDir, S3_ACCESS_KEY, S3_SECRET_KEY};

const MIB: u64 = 1 << 20;
const PAGE: usize = 4096;

fn set_credentials() {
    // The store reads credentials the standard AWS way; every test uses the same server keys.
    std::env::set_var("AWS_ACCESS_KEY_ID", S3_ACCESS_KEY);
    std::env::set_var("AWS_SECRET_ACCESS_KEY", S3_SECRET_KEY);
    std::env::set_var("AWS_REGION", "us-east-1");
}

fn store_cfg(dir: &Path, s3: &S3Server) -> StoreConfig {
    set_credentials();
    let mut cfg = StoreConfig::new(dir);
    let mut s3c = S3Config::new(&s3.bucket);
    s3c.endpoint = Some(s3.endpoint());
    s3c.prefix = "snapshots".into();
    s3c.timeout_s = 3;
    s3c.max_retries = 1;
    cfg.s3 = Some(s3c);
    cfg
}

/// xorshift: deterministic incompressible bytes.
fn fill_random(buf: &mut [u8], mut seed: u64) {
    for word in buf.chunks_mut(8) {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let b = seed.to_le_bytes();
        word.copy_from_slice(&b[..word.len()]);
    }
}

/// A 512 MiB sparse memory-like image: 64 MiB random, 64 MiB of one repeated 256 KiB block, 32 MiB of text-like
/// compressible data, the rest zero.
fn write_test_image(path: &Path) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::create(path).unwrap();
    f.set_len(512 * MIB).unwrap();
    let mut buf = vec![0u8; 8 * MIB as usize];
    for i in 0..8 {
        fill_random(&mut buf, 0x9e37_79b9 + i);
        f.write_all_at(&buf, 16 * MIB + i * 8 * MIB).unwrap();
    }
    let mut block = vec![0u8; DEFAULT_CHUNK_SIZE as usize];
    fill_random(&mut block, 7);
    for i in 0..256u64 {
        f.write_all_at(&block, 128 * MIB + i * DEFAULT_CHUNK_SIZE as u64).unwrap();
    }
    let text: Vec<u8> =
        (0..32 * MIB as usize).map(|i| b"flint snapshot store test line\n"[i % 31] ^ ((i >> 16) as u8 & 1)).collect();
    f.write_all_at(&text, 300 * MIB).unwrap();
    f.sync_all().unwrap();
}

fn file_hash(path: &Path) -> blake3::Hash {
    let mut h = blake3::Hasher::new();
    h.update_mmap(path).unwrap();
    h.finalize()
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

#[test]
fn round_trip_dedup_and_one_percent_change() {
    let s3 = S3Server::start();
    let work = TempDir::new("store-rt");
    let img = work.path().join("mem1");
    write_test_image(&img);
    rt().block_on(async {
        let writer = Store::open(store_cfg(&work.path().join("l1-writer"), &s3)).unwrap();
        let (m1, put) =
            writer.put(SnapshotDraft::new("base").image("memory", ImageSource::File(img.clone())), true).await.unwrap();
        println!("put 512 MiB: {put:?}");
        assert_eq!(put.chunks, 2048);
        // 64 MiB random + 64 MiB repeated + 32 MiB text are non-zero; the repeated block is one chunk, the text
        // (a 31-byte line) repeats every 31 chunks.
        assert_eq!(put.zero_chunks, 2048 - (256 + 256 + 128));
        assert_eq!(put.new_chunks, 256 + 1 + 31);
        assert!(put.new_stored_bytes < 66 * MIB + 2 * MIB, "random data plus well-compressed rest: {put:?}");

        // A host with an empty cache gets it back byte-exact from S3.
        let reader = Store::open(store_cfg(&work.path().join("l1-reader"), &s3)).unwrap();
        let out = work.path().join("mem1.out");
        let got = reader.get_image("base", "memory", &out).await.unwrap();
        assert_eq!(file_hash(&img), file_hash(&out), "512 MiB image differs after the S3 round trip");
        assert_eq!(got.fetched_chunks, 288);
        assert_eq!(got.fetched_bytes, m1.stored_bytes());
        std::fs::remove_file(&out).unwrap();

        // Change 1% of the pages, in runs as a guest writes them (heap, page cache), at unaligned places.
        let pages = (512 * MIB) as usize / PAGE;
        let changed_pages = pages / 100;
        let run = 64;
        {
            use std::os::unix::fs::FileExt;
            let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
            let mut buf = vec![0u8; run * PAGE];
            for r in 0..changed_pages / run {
                fill_random(&mut buf, 1000 + r as u64);
                let page = (r * 2011 + 37) % (pages - run);
                f.write_all_at(&buf, (page * PAGE) as u64).unwrap();
            }
        }
        let (_, put2) =
            writer.put(SnapshotDraft::new("next").image("memory", ImageSource::File(img.clone())), true).await.unwrap();
        let changed = (changed_pages / run * run * PAGE) as f64;
        let ratio = put2.new_plain_bytes as f64 / changed;
        println!("1% change: {} new plain bytes for {} changed bytes ({ratio:.2}x)", put2.new_plain_bytes, changed);
        assert!(put2.new_plain_bytes as f64 <= 0.025 * (512 * MIB) as f64, "{put2:?}");
        assert!((1.0..2.5).contains(&ratio), "new chunk bytes should track the change: {put2:?}");
        reader.get_image("next", "memory", &out).await.unwrap();
        assert_eq!(file_hash(&img), file_hash(&out));

        // Concurrent readers of one missing chunk share one fetch.
        let third = Store::open(store_cfg(&work.path().join("l1-third"), &s3)).unwrap();
        let m = third.manifest("base").await.unwrap();
        let id = m.images[0].chunks.iter().flatten().next().unwrap().id;
        let tasks: Vec<_> = (0..8)
            .map(|_| {
                let s = third.clone();
                tokio::spawn(async move { s.chunk(&id).await.map(|c| c.len()) })
            })
            .collect();
        for t in tasks {
            assert_eq!(t.await.unwrap().unwrap(), DEFAULT_CHUNK_SIZE as usize);
        }
        assert_eq!(third.stats().remote_fetches, 1, "eight readers, one fetch");

        // GC: after `base` is deleted everywhere, only chunks `next` does not use go.
        writer.delete("base", true).await.unwrap();
        let mut cfg = store_cfg(&work.path().join("l1-writer"), &s3);
        cfg.gc_grace = Duration::ZERO;
        let gc_store = Store::open(cfg).unwrap();
        let gc = gc_store.gc(true).await.unwrap();
        println!("gc: {gc:?}");
        assert!(gc.deleted_chunks > 0 && gc.deleted_chunks < 40, "{gc:?}");
        let v = gc_store.verify("next", false).await.unwrap();
        assert!(v.problems.is_empty(), "{v:?}");
        let list = gc_store.list().await.unwrap();
        assert_eq!(list.iter().map(|s| s.id.as_str()).collect::<Vec<_>>(), vec!["next"]);
    });
}

#[test]
fn kill_mid_publish_leaves_nothing_visible_and_retry_succeeds() {
    let s3 = S3Server::start();
    let work = TempDir::new("store-kill");
    let img = work.path().join("big");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&img).unwrap();
        let mut buf = vec![0u8; 8 * MIB as usize];
        for i in 0..24 {
            fill_random(&mut buf, 77 + i);
            f.write_all(&buf).unwrap();
        }
    }
    let l1 = work.path().join("l1");
    let flint_store = |args: &[&str]| {
        let mut cmd = Command::new(bin_dir().join("flint-store"));
        cmd.arg("--dir").arg(&l1).args(["--s3-prefix", "snapshots"]).args(args).envs(s3.env());
        cmd
    };
    let mut child = flint_store(&["put", "big", &format!("memory={}", img.display()), "--publish"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("flint-store binary (cargo build --workspace --bins)");
    // Wait until the upload is under way (some chunk objects exist on the server), then kill -9.
    let chunks_dir = s3.object_path("snapshots/chunks");
    let deadline = Instant::now() + Duration::from_secs(120);
    let count = || walk_count(&chunks_dir);
    while count() < 20 {
        assert!(Instant::now() < deadline, "the upload never started");
        assert!(child.try_wait().unwrap().is_none(), "flint-store finished before it could be killed");
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let uploaded = count();
    println!("killed with {uploaded} of 768 chunks uploaded");
    assert!(uploaded < 768, "the kill came too late to test anything");
    assert!(!s3.object_path("snapshots/manifests/big").exists());

    rt().block_on(async {
        let other = Store::open(store_cfg(&work.path().join("other-host"), &s3)).unwrap();
        assert!(other.list().await.unwrap().is_empty(), "a half-published snapshot is visible");
        match other.manifest("big").await {
            Err(StoreError::NotFound { .. }) => {}
            r => panic!("expected not found, got {r:?}"),
        }
    });

    // Retry: the local copy is complete (the kill hit the upload), so publishing again finishes the job.
    let out = flint_store(&["publish", "big"]).output().unwrap();
    assert!(out.status.success(), "retry failed: {}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["already_present"].as_u64().unwrap() + report["uploaded_chunks"].as_u64().unwrap(), 768);
    assert!(report["already_present"].as_u64().unwrap() >= uploaded as u64 - 16, "retry re-sent finished chunks");
    rt().block_on(async {
        let other = Store::open(store_cfg(&work.path().join("other-host2"), &s3)).unwrap();
        let dest = work.path().join("big.out");
        other.get_image("big", "memory", &dest).await.unwrap();
        assert_eq!(file_hash(&img), file_hash(&dest));
    });
}

fn walk_count(dir: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    entries
        .flatten()
        .map(|e| {
            if e.path().is_dir() {
                walk_count(&e.path())
            } else {
                usize::from(!e.file_name().to_string_lossy().starts_with('.'))
            }
        })
        .sum()
}

#[test]
fn outage_corruption_and_encryption() {
    let mut s3 = S3Server::start();
    let work = TempDir::new("store-outage");
    let mut a = vec![0u8; 4 * MIB as usize];
    fill_random(&mut a, 1);
    let mut b = vec![0u8; 4 * MIB as usize];
    fill_random(&mut b, 2);
    let rt = rt();
    rt.block_on(async {
        let writer = Store::open(store_cfg(&work.path().join("w"), &s3)).unwrap();
        writer.put(SnapshotDraft::new("a").image("memory", ImageSource::Bytes(a.clone().into())), true).await.unwrap();
        writer.put(SnapshotDraft::new("b").image("memory", ImageSource::Bytes(b.clone().into())), true).await.unwrap();

        // This host pulled `a` (it restored it before) but never saw `b`.
        let host = Store::open(store_cfg(&work.path().join("host"), &s3)).unwrap();
        host.pull("a").await.unwrap();
        let listed = host.list().await.unwrap();
        assert!(listed.iter().any(|s| s.id == "a" && s.local_complete));
        assert!(listed.iter().any(|s| s.id == "b" && !s.local && s.remote));
        drop(host);

        s3.stop();
        let host = Store::open(store_cfg(&work.path().join("host"), &s3)).unwrap();
        let out = work.path().join("a.out");
        host.get_image("a", "memory", &out).await.expect("a snapshot in L1 restores with S3 down");
        assert_eq!(std::fs::read(&out).unwrap(), a);
        let started = Instant::now();
        let err = host.get_image("b", "memory", &work.path().join("b.out")).await.unwrap_err();
        let msg = error_chain(&err);
        println!("with S3 down: {msg} (after {:?})", started.elapsed());
        assert!(matches!(err, StoreError::Unavailable(_)), "{msg}");
        assert!(msg.contains("s3://flint/snapshots"), "the error names the tier: {msg}");
        assert!(started.elapsed() < Duration::from_secs(30), "an outage must fail fast, not hang");
        assert!(!work.path().join("b.out").exists(), "no partial image left behind");
    });
    s3.resume();
    rt.block_on(async {
        // A flipped byte in S3 is detected; in L1 it is detected and healed from S3.
        let host = Store::open(store_cfg(&work.path().join("host2"), &s3)).unwrap();
        let m = host.manifest("b").await.unwrap();
        let first = m.images[0].chunks[0].unwrap().id;
        let key = host.chunk_key(&first);
        let object = s3.object_path(&format!("snapshots/{key}"));
        let pristine = std::fs::read(&object).unwrap();
        let mut bad = pristine.clone();
        bad[pristine.len() / 2] ^= 0x01;
        std::fs::write(&object, &bad).unwrap();
        let err = host.get_image("b", "memory", &work.path().join("b.out")).await.unwrap_err();
        let msg = error_chain(&err);
        assert!(matches!(err, StoreError::Corrupt { .. }), "{msg}");
        assert!(msg.contains(&key), "the error names the chunk: {msg}");
        let v = host.verify("b", false).await.unwrap();
        assert_eq!(v.problems.len(), 1, "{v:?}");
        std::fs::write(&object, &pristine).unwrap();

        host.pull("b").await.unwrap();
        let local = work.path().join("host2").join(&key);
        let mut l1 = std::fs::read(&local).unwrap();
        let n = l1.len();
        l1[n - 3] ^= 0x80;
        std::fs::write(&local, &l1).unwrap();
        let out = work.path().join("b.out");
        host.get_image("b", "memory", &out).await.unwrap();
        assert_eq!(std::fs::read(&out).unwrap(), b);
        assert_eq!(host.stats().corrupt, 2, "the S3 copy earlier, the L1 copy now");
        assert!(host.verify("b", true).await.unwrap().problems.is_empty(), "L1 was healed");
    });
    rt.block_on(encryption_at_rest_hides_plaintext_and_needs_the_secret(work.path(), &s3));
}

/// Encryption at rest: no plaintext and no plaintext hashes reach the bucket; the right secret reads it back, a
/// wrong one is refused.
async fn encryption_at_rest_hides_plaintext_and_needs_the_secret(work: &Path, s3: &S3Server) {
    let marker = b"FLINT-PLAINTEXT-MARKER-0123456789".repeat(8000);
    let mut cfg = store_cfg(&work.join("enc"), s3);
    cfg.s3.as_mut().unwrap().prefix = "sealed".into();
    cfg.secret = Some(Secret([42; 32]));
    let sealed = Store::open(cfg.clone()).unwrap();
    let (m, _) = sealed
        .put(SnapshotDraft::new("s").image("memory", ImageSource::Bytes(marker.clone().into())), true)
        .await
        .unwrap();
    let plain_id = m.images[0].chunks[0].unwrap().id.to_hex();
    let mut found_plain = false;
    visit(&s3.object_path("sealed"), &mut |p| {
        let data = std::fs::read(p).unwrap();
        found_plain |= data.windows(23).any(|w| w == b"FLINT-PLAINTEXT-MARKER-");
        found_plain |= p.to_string_lossy().contains(&plain_id);
        found_plain |= String::from_utf8_lossy(&data).contains(&plain_id);
    });
    assert!(!found_plain, "plaintext or its hash is visible in the bucket");
    cfg.local_dir = work.join("enc2");
    let reader = Store::open(cfg.clone()).unwrap();
    let out = work.join("s.out");
    reader.get_image("s", "memory", &out).await.unwrap();
    assert_eq!(std::fs::read(&out).unwrap(), marker);
    cfg.local_dir = work.join("enc3");
    cfg.secret = Some(Secret([43; 32]));
    let wrong = Store::open(cfg).unwrap();
    let err = wrong.manifest("s").await.unwrap_err();
    assert!(error_chain(&err).contains("authentication"), "{}", error_chain(&err));
}

fn visit(dir: &Path, f: &mut dyn FnMut(&Path)) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for e in entries.flatten() {
        if e.path().is_dir() {
            visit(&e.path(), f);
        } else {
            f(&e.path());
        }
    }
}

/// Two hosts, one bucket: an id another host published is refused even for a snapshot kept local, a push never
/// replaces another host's manifest (S3 `If-None-Match: *`), and that host's snapshot stays whole after GC; a
/// retried push of our own manifest is fine.
#[test]
fn same_id_from_two_hosts_never_replaces_a_published_manifest() {
    let s3 = S3Server::start();
    let work = TempDir::new("store-clash");
    rt().block_on(async {
        let a = Store::open(store_cfg(&work.path().join("a"), &s3)).unwrap();
        let b = Store::open(store_cfg(&work.path().join("b"), &s3)).unwrap();
        let image = |seed: u64| {
            let mut buf = vec![0u8; 3 * DEFAULT_CHUNK_SIZE as usize];
            fill_random(&mut buf, seed);
            ImageSource::Bytes(buf.into())
        };
        a.put(SnapshotDraft::new("x").image("memory", image(1)), true).await.unwrap();
        // Kept local (publish: false) with an id host A published: refused now, not at the later push.
        match b.put(SnapshotDraft::new("x").image("memory", image(2)), false).await {
            Err(StoreError::Exists { id, .. }) => assert_eq!(id, "x"),
            other => panic!("expected an id clash: {:?}", other.map(|r| r.0.id)),
        }
        // Both hosts make `y` locally (neither published yet); A pushes first, B's push is refused.
        b.put(SnapshotDraft::new("y").image("memory", image(3)), false).await.unwrap();
        a.put(SnapshotDraft::new("y").image("memory", image(4)), false).await.unwrap();
        a.publish("y").await.unwrap();
        let e = b.publish("y").await.unwrap_err();
        assert!(matches!(e, StoreError::Exists { .. }) && error_chain(&e).contains("stays local"), "{e}");
        a.publish("y").await.expect("a retried push of the same manifest");
        // The bucket holds A's `y`, whole after a remote GC (B's chunks for `y` are unreferenced: collectable).
        a.gc(true).await.unwrap();
        let c = Store::open(store_cfg(&work.path().join("c"), &s3)).unwrap();
        let dest = work.path().join("y.out");
        c.get_image("y", "memory", &dest).await.unwrap();
        let mut want = vec![0u8; 3 * DEFAULT_CHUNK_SIZE as usize];
        fill_random(&mut want, 4);
        assert!(std::fs::read(&dest).unwrap() == want, "the bucket's `y` is host A's");
        assert_eq!(c.verify("y", false).await.unwrap().problems, Vec::<String>::new());
    });
}

/// `flint-store gc` (another process) on flintd's cache: it waits for a put in flight instead of deleting its
/// chunks, and a put after a GC rewrites chunks the GC removed even though the writer's index still lists them.
#[test]
fn gc_in_another_process_never_takes_chunks_of_a_snapshot_being_written() {
    let work = TempDir::new("store-gc-lease");
    let l1 = work.path().join("l1");
    let img = work.path().join("img");
    {
        let mut buf = vec![0u8; 64 * MIB as usize];
        fill_random(&mut buf, 99);
        std::fs::write(&img, &buf).unwrap();
    }
    let gc_dir = l1.clone();
    let gc = move || {
        let out = Command::new(bin_dir().join("flint-store")).arg("--dir").arg(&gc_dir).arg("gc").output().unwrap();
        assert!(out.status.success(), "gc: {}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
    };
    rt().block_on(async {
        let store = Store::open(StoreConfig::new(&l1)).unwrap();
        // GC races a put of 64 MiB of incompressible data many times; the snapshot is always whole afterwards.
        for round in 0..3 {
            let id = format!("s{round}");
            let put = {
                let store = store.clone();
                let img = img.clone();
                let id = id.clone();
                tokio::spawn(async move {
                    store.put(SnapshotDraft::new(&id).image("memory", ImageSource::File(img)), false).await
                })
            };
            tokio::time::sleep(Duration::from_millis(30 * round)).await;
            let report = tokio::task::spawn_blocking(gc.clone()).await.unwrap();
            put.await.unwrap().unwrap();
            assert_eq!(
                store.verify(&id, true).await.unwrap().problems,
                Vec::<String>::new(),
                "round {round}: {report}"
            );
            // Delete it: its chunks are now unreferenced; a GC (another process) removes them while this
            // process's index still lists them; the next put of the same data must write them again.
            store.delete(&id, false).await.unwrap();
            let report = gc();
            assert!(report["deleted_chunks"].as_u64().unwrap() > 0, "{report}");
        }
    });
}

/// The coordination objects hosts agree through (session leases): the bucket honours conditional writes (the
/// probe), a second create of one object fails and leaves the first, a write naming a stale version changes
/// nothing, and a remote GC leaves coordination objects alone. (Sequential on purpose: s3s-fs checks the
/// condition and then writes, so two *concurrent* creates can both succeed there; AWS S3 decides them
/// atomically. docs/sessions.md says what that means for a bucket on such a server.)
#[test]
fn conditional_writes_give_one_winner_and_stale_versions_change_nothing() {
    let s3 = S3Server::start();
    let work = TempDir::new("store-coord");
    rt().block_on(async {
        let a = Store::open(store_cfg(&work.path().join("a"), &s3)).unwrap();
        let b = Store::open(store_cfg(&work.path().join("b"), &s3)).unwrap();
        a.probe_conditional_writes("a").await.expect("s3s-fs honours If-None-Match and If-Match");
        let (va, vb) = ("a".to_string(), "b".to_string());
        for round in 0..3 {
            let name = format!("race-{round}");
            let (first, second) = if round % 2 == 0 { (&a, &b) } else { (&b, &a) };
            assert!(first.coord_put("test", &name, &va, None).await.unwrap().is_some());
            assert!(second.coord_put("test", &name, &vb, None).await.unwrap().is_none(), "a second create fails");
            assert_eq!(second.coord_get::<String>("test", &name).await.unwrap().unwrap().value, "a");
        }
        let v1 = a.coord_get::<String>("test", "race-0").await.unwrap().unwrap();
        let v2 = b.coord_put("test", "race-0", &"b2".to_string(), Some(&v1.version)).await.unwrap();
        assert!(v2.is_some(), "a write naming the current version succeeds");
        let stale = a.coord_put("test", "race-0", &"a2".to_string(), Some(&v1.version)).await.unwrap();
        assert!(stale.is_none(), "a write naming a replaced version fails");
        assert_eq!(a.coord_get::<String>("test", "race-0").await.unwrap().unwrap().value, "b2");
        a.gc(true).await.unwrap();
        assert!(a.coord_get::<String>("test", "race-1").await.unwrap().is_some(), "GC keeps coordination objects");
        a.coord_delete("test", "race-1").await.unwrap();
        assert!(a.coord_get::<String>("test", "race-1").await.unwrap().is_none());
    });
}
