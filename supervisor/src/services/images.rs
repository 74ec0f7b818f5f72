//! The images a host has (the configuration's and imported ones under `<data_dir>/images`), and OCI imports:
//! an OCI image layout (directory or tar) or a `docker save` archive becomes a disk-rooted image.
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use flint_agent::runner::ImageConfig;
use serde::{Deserialize, Serialize};
use tracing::info;

use crate::error::{Classify, Kind};
use crate::image::{ImageError, Root};
use crate::vm;

/// `POST /v1/images`: an OCI image layout (directory or tar) or a `docker save` archive, by host path.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ImportImage {
    pub name: String,
    pub oci: PathBuf,
    /// The writable disk of the image's VMs, MiB (default 256).
    #[serde(default)]
    pub disk_mib: Option<u64>,
}

/// One image, as `GET /v1/images` lists it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImageInfo {
    pub name: String,
    pub dir: PathBuf,
    /// `initramfs` or `disk`; none when the image could not be loaded (`error` says why).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub root: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_mib: Option<u64>,
    #[serde(default)]
    pub runners: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// What an import made.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImportReport {
    pub name: String,
    pub dir: PathBuf,
    pub root: String,
    pub disk_mib: u64,
    pub env: BTreeMap<String, String>,
    pub workdir: Option<String>,
    pub layers: usize,
    pub files: usize,
    pub bytes: u64,
    pub source: String,
    pub ms: f64,
}

/// Where an imported image came from (kept in its image.json).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct ImportSource {
    oci: String,
    layers: usize,
    files: usize,
    bytes: u64,
    command: Vec<String>,
    skipped_devices: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Exists(String),
    #[error("import {}: {source}", path.display())]
    Oci { path: PathBuf, source: crate::oci::OciError },
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
}

impl Classify for ImportError {
    fn kind(&self) -> Kind {
        match self {
            ImportError::Invalid(_) => Kind::Invalid,
            ImportError::Exists(_) => Kind::Conflict,
            ImportError::Oci { source, .. } => source.kind(),
            ImportError::Image(e) => e.kind(),
            ImportError::Io { .. } => Kind::Internal,
        }
    }
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> ImportError {
    let what = what.into();
    move |source| ImportError::Io { what, source }
}

pub struct Images {
    vms: Arc<vm::Manager>,
}

impl Images {
    pub fn new(vms: Arc<vm::Manager>) -> Images {
        Images { vms }
    }

    pub fn list(&self) -> Vec<ImageInfo> {
        self.vms
            .images()
            .into_iter()
            .map(|(name, dir)| match crate::image::Image::load(&name, &dir) {
                Ok(img) => {
                    let (root, disk_mib) = match &img.root {
                        Root::Initramfs => ("initramfs", None),
                        Root::Disk { disk_mib, .. } => ("disk", Some(*disk_mib)),
                    };
                    ImageInfo { name, dir, root: Some(root.into()), disk_mib, runners: img.runners, error: None }
                }
                Err(e) => {
                    ImageInfo { name, dir, root: None, disk_mib: None, runners: Vec::new(), error: Some(e.to_string()) }
                }
            })
            .collect()
    }

    /// Imports an OCI image layout (directory or tar) or a `docker save` archive as the disk-rooted image `name`
    /// under `<data_dir>/images/` (docs/images.md). The kernel and the agent's initramfs are the default image's.
    /// Appears whole or not at all.
    pub async fn import(&self, req: ImportImage) -> Result<ImportReport, ImportError> {
        vm::valid_id("image name", &req.name).map_err(|e| ImportError::Invalid(e.to_string()))?;
        if self.vms.images().contains_key(&req.name) {
            return Err(ImportError::Exists(format!("image `{}` already exists", req.name)));
        }
        if !req.oci.is_absolute() {
            return Err(ImportError::Invalid(format!("oci: `{}` must be an absolute path", req.oci.display())));
        }
        let disk_mib = req.disk_mib.unwrap_or(256);
        vm::check_disk_mib(disk_mib, self.vms.cfg.limits.max_disk_mib)
            .map_err(|e| ImportError::Invalid(e.to_string()))?;
        let base = self.vms.image("default")?;
        let boot = base.dir.join("boot.cpio");
        if !boot.is_file() {
            return Err(ImportError::Invalid(format!(
                "the default image ({}) has no boot.cpio (the agent-only initramfs of disk images): rebuild it with \
                 images/build.sh",
                base.dir.display()
            )));
        }
        let images_dir = self.vms.cfg.data_dir.join("images");
        let work = images_dir.join(format!(".import-{}-{}", req.name, self.vms.new_id("x")));
        let started = Instant::now();
        let final_dir = images_dir.join(&req.name);
        let (w, f) = (work.clone(), final_dir.clone());
        let result = tokio::task::spawn_blocking(move || build(&req, &w, &f, &base.dir, disk_mib))
            .await
            .map_err(|e| ImportError::Io { what: "the import".into(), source: std::io::Error::other(e) })
            .and_then(|r| r);
        let _ = std::fs::remove_dir_all(&work);
        let mut report = result?;
        report.ms = crate::ms_since(started);
        info!(image = %report.name, ms = report.ms, "OCI image imported");
        Ok(report)
    }
}

/// The import's blocking part: the tree (with Flint's additions in its model), the root filesystem, image.json,
/// the kernel and initramfs, then the rename that makes the image appear.
fn build(
    req: &ImportImage,
    work: &std::path::Path,
    final_dir: &std::path::Path,
    base: &std::path::Path,
    disk_mib: u64,
) -> Result<ImportReport, ImportError> {
    std::fs::create_dir_all(work).map_err(io(format!("create {}", work.display())))?;
    let tree = work.join("tree");
    let name = req.name.clone();
    // What the agent reads at boot, and the directories it mounts on: added to the image's model, so nothing is
    // written through the image's own symlinks (docs/security.md).
    let additions = |imported: &crate::oci::Imported| {
        let guest = ImageConfig {
            name: name.clone(),
            env: imported.env.clone(),
            workdir: imported.workdir.clone(),
            runners: BTreeMap::new(),
        };
        let mut add = crate::oci::Additions::default();
        for d in [
            "etc",
            "etc/flint",
            "etc/flint/hooks",
            "etc/flint/hooks/after-restore.d",
            "etc/flint/hooks/before-checkpoint.d",
            "dev",
            "proc",
            "sys",
            "run",
        ] {
            add.dirs.push((d.to_string(), 0o755, false));
        }
        add.dirs.push(("root".into(), 0o700, false));
        add.dirs.push(("tmp".into(), 0o1777, true));
        add.files.push(("etc/flint/image.json".into(), 0o644, serde_json::to_vec(&guest).unwrap_or_default()));
        add
    };
    let imported = crate::oci::import_tree(&req.oci, &tree, work, crate::oci::Bounds::default(), additions)
        .map_err(|source| ImportError::Oci { path: req.oci.clone(), source })?;
    let out = work.join("image");
    std::fs::create_dir(&out).map_err(io(format!("create {}", out.display())))?;
    crate::image::make_rootfs(&tree, &out.join("rootfs.ext4"))?;
    let _ = std::fs::remove_dir_all(&tree);
    let sha = crate::image::sha256_file(&out.join("rootfs.ext4"))?;
    let source = ImportSource {
        oci: imported.source.clone(),
        layers: imported.layers,
        files: imported.files,
        bytes: imported.bytes,
        command: imported.command.clone(),
        skipped_devices: imported.skipped_devices,
    };
    let manifest = crate::image::ImageJson {
        name: name.clone(),
        description: format!("imported from {}", req.oci.display()),
        root: "disk".into(),
        disk_mib,
        rootfs_sha256: sha,
        runners: Vec::new(),
        env: imported.env.clone(),
        workdir: imported.workdir.clone(),
        source: serde_json::to_value(&source).unwrap_or_default(),
    };
    let json = serde_json::to_vec_pretty(&manifest).map_err(|e| io("image.json")(std::io::Error::other(e)))?;
    std::fs::write(out.join("image.json"), json).map_err(io("write image.json"))?;
    std::fs::copy(base.join("boot.cpio"), out.join("initramfs.cpio")).map_err(io("copy the initramfs"))?;
    std::fs::copy(base.join("vmlinux"), out.join("vmlinux")).map_err(io("copy the kernel"))?;
    std::fs::rename(&out, final_dir)
        .map_err(|e| ImportError::Exists(format!("image `{name}` appeared meanwhile, or cannot be placed: {e}")))?;
    Ok(ImportReport {
        name,
        dir: final_dir.to_path_buf(),
        root: "disk".into(),
        disk_mib,
        env: imported.env,
        workdir: imported.workdir,
        layers: imported.layers,
        files: imported.files,
        bytes: imported.bytes,
        source: imported.source,
        ms: 0.0,
    })
}
