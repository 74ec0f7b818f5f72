//! The VM layer, continued: re-adoption, snapshots with drives, the shape of clones, legacy manifests, and its
//! independence from the services.
use super::*;

/// VMs in every status, and a VMM no record owns, as a flintd crash leaves them.
async fn crashed_daemon(env: &Env, l: &FakeLauncher) -> (Vec<crate::launcher::Proc>, std::path::PathBuf) {
    let d = env.open(l);
    for id in ["running", "paused", "starting", "stopping", "gone", "failed", "mid-pause", "mid-resume"] {
        let req = CreateVm { id: Some(id.into()), env: [("K".into(), "v".into())].into(), ..Default::default() };
        d.vms.create(req, None).await.unwrap();
    }
    d.vms.pause("paused").await.unwrap();
    d.vms.pause("mid-resume").await.unwrap();
    // Killed mid-operation: the VMM changed run state, the record (written when an operation ends) did not.
    l.vmm(&d.vms.vm_dir("mid-pause"), false).pause().await.unwrap();
    l.vmm(&d.vms.vm_dir("mid-resume"), false).resume().await.unwrap();
    let set = |id: &str, f: &dyn Fn(&mut VmRecord)| {
        let mut rec = d.vms.get(id).unwrap();
        f(&mut rec);
        d.db.put(crate::db::VMS, id, &rec).unwrap();
    };
    set("starting", &|r| r.status = VmStatus::Starting);
    set("stopping", &|r| r.status = VmStatus::Stopping);
    set("failed", &|r| {
        r.status = VmStatus::Failed;
        r.error = Some("boom".into());
    });
    let procs: Vec<_> =
        ["gone", "stopping", "failed"].iter().map(|id| d.vms.get(id).unwrap().proc().unwrap()).collect();
    l.kill(procs[2]);
    // A VMM started just before a crash, whose pid never reached a record.
    let orphan_dir = d.vms.vm_dir("orphan");
    std::fs::create_dir_all(&orphan_dir).unwrap();
    let mut config = flint_vmm_api::config::VmConfig::new(env.cfg.images["default"].join("vmlinux"));
    config.initramfs = Some(env.cfg.images["default"].join("initramfs.cpio"));
    let spec = flint_vmm_api::LaunchSpec {
        api_sock: None,
        seccomp: true,
        jail: None,
        fence: None,
        vcpu_sched_idle: false,
        launch: flint_vmm_api::spec::Launch::Boot(config),
    };
    let orphan = l.spawn(&orphan_dir, &spec, None).unwrap();
    // flintd "crashes": nothing is stopped.
    crate::fake::crash(d).await;
    l.kill(procs[0]); // a VMM dies while no flintd watches
    (vec![procs[1], orphan], orphan_dir)
}

/// Finding 11 of #26: VM disks are sparse, so they are counted at their full size against
/// `limits.max_total_disk_mib`, and none is made while the data filesystem is below `limits.min_free_disk_mib`;
/// a refusal leaves nothing behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disks_fit_a_budget_and_a_free_space_watermark() {
    let mut env = Env::new("disks");
    let img = env.dir.join("disky");
    std::fs::create_dir_all(&img).unwrap();
    for f in ["vmlinux", "initramfs.cpio", "rootfs.ext4"] {
        std::fs::write(img.join(f), b"x").unwrap();
    }
    let json = format!(r#"{{"name":"disky","root":"disk","disk_mib":512,"rootfs_sha256":"{}"}}"#, "ab".repeat(32));
    std::fs::write(img.join("image.json"), json).unwrap();
    env.cfg.images.insert("disky".into(), img);
    env.cfg.vm.mount_slot_mib = 256;
    env.cfg.limits.max_total_disk_mib = 700;
    let l = FakeLauncher::default();
    let d = env.open(&l);
    let req = |id: &str| CreateVm { id: Some(id.into()), image: Some("disky".into()), ..Default::default() };
    let e = d.vms.create(req("big"), None).await.unwrap_err().to_string();
    assert!(e.contains("768 MiB would pass limits.max_total_disk_mib = 700"), "{e}");
    assert!(env.leftovers(&d, "big").is_empty());
    // A VM without disks is not held to it.
    d.vms.create(CreateVm { id: Some("plain".into()), ..Default::default() }, None).await.unwrap();
    crate::fake::crash(d).await;
    env.cfg.limits.max_total_disk_mib = 0;
    env.cfg.limits.min_free_disk_mib = u64::MAX >> 21;
    let d = env.open(&l);
    let e = d.vms.create(req("low"), None).await.unwrap_err();
    assert_eq!(crate::error::Classify::kind(&e), crate::error::Kind::Quota);
    assert!(e.to_string().contains("below limits.min_free_disk_mib"), "{e}");
    assert!(env.leftovers(&d, "low").is_empty());
}

/// A fence's tools: freeze and kill reach the VMM at once, even while an operation holds the VM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn freeze_and_kill_do_not_wait_for_an_operation() {
    let env = Env::new("freeze");
    let l = FakeLauncher::default();
    let d = env.open(&l);
    d.vms.create(CreateVm { id: Some("f".into()), ..Default::default() }, None).await.unwrap();
    let dir = d.vms.vm_dir("f");
    let held = d.vms.vm("f").unwrap();
    let _op = held.rec.op.lock().await; // an operation in progress (a long snapshot, say)
    d.vms.freeze("f", true).unwrap();
    assert!(l.frozen(&dir));
    d.vms.freeze("f", false).unwrap();
    assert!(!l.frozen(&dir));
    d.vms.kill_now("f").unwrap();
    assert_eq!(l.pid_of(&dir), None, "the VMM is gone");
    drop(_op);
    wait_for("the exit noticed", || d.vms.get("f").unwrap().status == VmStatus::Failed).await;
    assert!(matches!(d.vms.freeze("nope", true), Err(VmError::NotFound(_))));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readoption_after_a_restart_handles_every_status() {
    let env = Env::new("adopt");
    let l = FakeLauncher::default();
    let (stopped, orphan_dir) = crashed_daemon(&env, &l).await;
    let d = env.open(&l);
    wait_for("adoption settled", || {
        d.vms.get("stopping").is_err() && d.vms.get("starting").is_ok_and(|r| r.status == VmStatus::Running)
    })
    .await;
    let status = |id: &str| d.vms.get(id).unwrap().status;
    assert_eq!(
        [status("running"), status("paused"), status("gone"), status("failed")],
        [VmStatus::Running, VmStatus::Paused, VmStatus::Lost, VmStatus::Failed]
    );
    // The record wins: the VMMs are brought back to it.
    for (id, want) in [("mid-pause", RunState::Running), ("mid-resume", RunState::Paused)] {
        let vmm = l.vmm(&d.vms.vm_dir(id), false);
        let deadline = Instant::now() + Duration::from_secs(10);
        while vmm.describe().await.unwrap().state != want {
            assert!(Instant::now() < deadline, "{id}: the VMM was not brought back to its record");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    assert!(stopped.iter().all(|p| !l.alive(*p)), "the interrupted delete was finished, the orphan stopped");
    assert!(!orphan_dir.exists(), "and the orphan's directory removed");
    // The VM that was starting got its env through the agent after the restart.
    let a = d.vms.agent("starting").await.unwrap();
    let req = flint_agent::protocol::ExecRequest {
        argv: vec!["/bin/sh".into(), "-c".into(), "echo $K".into()],
        ..Default::default()
    };
    assert_eq!(String::from_utf8_lossy(&a.exec_output(req).await.unwrap().stdout), "v\n");
    for id in ["running", "paused", "starting", "gone", "failed"] {
        assert_eq!(d.vms.durable(id).as_ref(), Some(&d.vms.get(id).unwrap()), "{id}");
    }
    assert_eq!(d.vms.holds("running"), ["allocation", "directory", "process"], "the stack rebuilt");
    // An adopted VM's exit is still noticed.
    l.kill(d.vms.get("running").unwrap().proc().unwrap());
    wait_for("the adopted VMM's exit noticed", || status("running") == VmStatus::Failed).await;
    d.vms.stop_all().await;
    assert_eq!(l.running(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_shapes_are_400s_and_clones_keep_the_snapshots_shape() {
    let env = Env::new("shape");
    let l = FakeLauncher::default();
    let d = env.open(&l);
    for (req, want) in [
        (CreateVm { vcpus: Some(9), ..Default::default() }, "vcpus must be between 1 and 8, not 9"),
        (CreateVm { mem_mib: Some(257), ..Default::default() }, "mem_mib must be a multiple of 2"),
        (CreateVm { vcpus: Some(0), ..Default::default() }, "vcpus must be between 1 and 8, not 0"),
    ] {
        let e = d.vms.create(req, None).await.unwrap_err();
        assert_eq!(crate::error::Classify::kind(&e), crate::error::Kind::Invalid, "{e}");
        assert!(e.to_string().contains(want), "{e}");
    }
    assert!(d.vms.is_empty() && l.running() == 0, "nothing was started");
    let req = CreateVm { id: Some("src".into()), vcpus: Some(2), mem_mib: Some(512), ..Default::default() };
    let src = d.vms.create(req, None).await.unwrap();
    assert_eq!((src.vcpus, src.mem_mib), (2, 512));
    d.vms.snapshot("src", "two", &how(false)).await.unwrap();
    for _ in 0..3 {
        let c = d.vms.restore(restore("two")).await.unwrap();
        assert_eq!((c.vcpus, c.mem_mib, c.status), (2, 512, VmStatus::Running), "{c:?}");
        assert_eq!(d.vms.durable(&c.id).as_ref(), Some(&c));
    }
    d.vms.stop_all().await;
}

/// A snapshot of a VM with drives holds their content; every clone gets its own copy of each, and a snapshot of
/// a clone holds the clone's own drive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clones_get_their_own_copy_of_each_drive() {
    let env = Env::new("drives");
    let l = FakeLauncher::default();
    let d = env.open(&l);
    let (disk, ro) = (env.dir.join("disk.img"), env.dir.join("ro.img"));
    let limit = flint_vmm_api::config::RateLimiterConfig {
        bandwidth: Some(flint_vmm_api::config::TokenBucketConfig {
            size: 4096,
            one_time_burst: 0,
            refill_time_ms: 250,
        }),
        ops: None,
    };
    std::fs::write(&disk, b"before".repeat(1000)).unwrap();
    std::fs::write(&ro, b"read-only").unwrap();
    let drives = vec![
        DriveSpec { path: disk.clone(), read_only: false, rate_limiter: Some(limit.clone()), image: None },
        DriveSpec { path: ro.clone(), read_only: true, rate_limiter: None, image: None },
    ];
    let src = d.vms.create(CreateVm { id: Some("w".into()), drives, ..Default::default() }, None).await.unwrap();
    d.vms.snapshot("w", "drv", &how(false)).await.unwrap();
    assert_eq!(l.vmm(&src.dir, false).describe().await.unwrap().state, RunState::Running, "resumed after the copies");
    std::fs::write(&disk, b"after").unwrap(); // the snapshot keeps what the drive held when it was taken
    let mut paths = Vec::new();
    for _ in 0..2 {
        let c = d.vms.restore(restore("drv")).await.unwrap();
        assert!(c.drives[0].path.starts_with(&c.dir) && !c.drives[0].read_only && c.drives[1].read_only, "{c:?}");
        assert_eq!((c.drives[0].rate_limiter.as_ref(), c.drives[1].rate_limiter.as_ref()), (Some(&limit), None));
        assert_eq!(std::fs::read(&c.drives[0].path).unwrap(), b"before".repeat(1000));
        assert_eq!(std::fs::read(&c.drives[1].path).unwrap(), b"read-only");
        paths.push((c.id.clone(), c.drives[0].path.clone()));
    }
    std::fs::write(&paths[0].1, b"clone 0 was here").unwrap();
    assert_eq!(std::fs::read(&paths[1].1).unwrap(), b"before".repeat(1000), "clones share no drive file");
    d.vms.snapshot(&paths[0].0, "drv2", &how(false)).await.unwrap();
    let again = d.vms.restore(restore("drv2")).await.unwrap();
    assert_eq!(std::fs::read(&again.drives[0].path).unwrap(), b"clone 0 was here");
    d.vms.stop_all().await;
}

/// A snapshot whose manifest carries the metadata keys flintd wrote before the versioned record (0eb4d43)
/// restores with its drives; one that claims drives it has no images for, or a newer metadata version, is
/// refused before anything starts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn legacy_and_forged_manifests() {
    let env = Env::new("legacy");
    let l = FakeLauncher::default();
    let d = env.open(&l);
    let disk = env.dir.join("disk.img");
    std::fs::write(&disk, b"legacy").unwrap();
    let drives = vec![DriveSpec { path: disk, ..Default::default() }];
    d.vms
        .create(CreateVm { id: Some("w".into()), drives, mem_mib: Some(128), ..Default::default() }, None)
        .await
        .unwrap();
    d.vms.snapshot("w", "new", &how(false)).await.unwrap();
    let m = d.store.manifest("new").await.unwrap();
    let rewrite = |id: &str, metadata: &[(&str, &str)]| {
        let mut m = m.clone();
        m.id = id.into();
        m.metadata = metadata.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let path = env.cfg.data_dir.join("store/manifests").join(id);
        std::fs::write(path, serde_json::to_vec(&m).unwrap()).unwrap();
        let _ = d.store.rescan();
    };
    // What 0eb4d43 wrote for such a snapshot.
    rewrite("old", &[("vm", "w"), ("mem_mib", "128"), ("vcpus", "1"), ("drives", "1"), ("drives_read_only", "0")]);
    let c = d.vms.restore(restore("old")).await.unwrap();
    assert_eq!((c.mem_mib, c.drives.len()), (128, 1));
    assert_eq!(std::fs::read(&c.drives[0].path).unwrap(), b"legacy");
    let running = l.running();
    rewrite("forged", &[("mem_mib", "128"), ("drives", "3"), ("drives_read_only", "0,0,0")]);
    let e = d.vms.restore(restore("forged")).await.unwrap_err().to_string();
    assert!(e.contains("no image `drive1`"), "{e}");
    rewrite("future", &[("flint", r#"{"version":99,"mem_mib":128,"vcpus":1}"#)]);
    let e = d.vms.restore(restore("future")).await.unwrap_err().to_string();
    assert!(e.contains("newer flintd") && e.contains("version 99"), "{e}");
    assert_eq!(l.running(), running, "nothing started for the refused ones");
    d.vms.stop_all().await;
}

/// The VM layer imports no service: sessions, pools, templates and networking services use it, never the other
/// way round (docs/design.md).
#[test]
fn the_vm_layer_imports_no_service() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src/vm");
    let mut files = vec![dir.clone()];
    let mut checked = 0;
    while let Some(p) = files.pop() {
        if p.is_dir() {
            files.extend(std::fs::read_dir(&p).unwrap().flatten().map(|e| e.path()));
            continue;
        }
        if p.extension().is_none_or(|e| e != "rs") || p.ends_with("tests.rs") || p.ends_with("more.rs") {
            continue;
        }
        let text = std::fs::read_to_string(&p).unwrap();
        for forbidden in ["crate::services", "crate::daemon", "crate::api", "crate::cli", "crate::client"] {
            assert!(!text.contains(forbidden), "{} imports {forbidden}", p.display());
        }
        checked += 1;
    }
    assert!(checked >= 8, "only {checked} files checked");
}
