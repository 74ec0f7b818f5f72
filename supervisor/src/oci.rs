//! OCI image import (docs/images.md, "Importing an OCI image"): an OCI image layout (a directory or a tar of one)
//! or a `docker save` archive becomes a disk-rooted Flint image, with no registry access.
//!
//! The layers are applied in order to a model of the tree (path → node), never to the host's file system:
//! whiteouts (`.wh.NAME`) and opaque directories (`.wh..wh..opq`) remove what lower layers made, and a path under a
//! symlink is resolved inside the model, as if the image were its own root. What Flint adds to the tree (`/tmp`,
//! the mount points, the hook directories, `/etc/flint/image.json`) is applied to the same model as a last layer,
//! so it lands where the guest will look for it and never where an image's symlink points on the host. Only then
//! is the final tree written, into a fresh staging directory, every path resolved beneath it without following
//! symlinks ([`crate::beneath`]): nothing an archive says can reach outside it. Blob digests are checked;
//! uncompressed bytes and entries are bounded.
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Component, Path, PathBuf};

use serde::Deserialize;
use sha2::{Digest, Sha256};

/// Bounds on what one import may unpack.
#[derive(Clone, Copy, Debug)]
pub struct Bounds {
    /// Uncompressed bytes of all layers together.
    pub max_bytes: u64,
    /// Entries of all layers together.
    pub max_entries: usize,
}

impl Default for Bounds {
    fn default() -> Self {
        Bounds { max_bytes: 8 << 30, max_entries: 1_000_000 }
    }
}

/// What the image's configuration says, and what was imported.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Imported {
    pub env: BTreeMap<String, String>,
    pub workdir: Option<String>,
    /// Entrypoint + Cmd, for the record (the agent is the guest's init; execs name their own commands).
    pub command: Vec<String>,
    /// The manifest's digest (OCI) or the config's name (docker save).
    pub source: String,
    pub layers: usize,
    pub files: usize,
    pub bytes: u64,
    /// Device nodes left out (the guest's /dev is a devtmpfs).
    pub skipped_devices: usize,
}

#[derive(Clone, Debug, PartialEq)]
enum Kind {
    Dir,
    /// Written from entry `entry` of layer `layer`.
    File {
        layer: usize,
        entry: usize,
    },
    Symlink(String),
    /// A hard link to another path of the tree.
    Hardlink(String),
    Fifo,
    /// What Flint adds: file `n` of [`Additions::files`].
    Added(usize),
}

/// What Flint adds to an imported tree: directories (created if missing; `force_mode` also changes an existing
/// one's mode and makes it root's) and files (replacing whatever the image had there).
#[derive(Clone, Debug, Default)]
pub struct Additions {
    /// (path, mode, force_mode)
    pub dirs: Vec<(String, u32, bool)>,
    /// (path, mode, content)
    pub files: Vec<(String, u32, Vec<u8>)>,
}

#[derive(Clone, Debug)]
struct Node {
    kind: Kind,
    mode: u32,
    uid: u32,
    gid: u32,
    /// The layer that made it (whiteouts remove only lower layers' nodes).
    layer: usize,
}

/// The merged tree: relative paths (`usr/bin/python3`, no leading slash) to nodes.
#[derive(Default)]
struct Tree {
    nodes: BTreeMap<String, Node>,
}

/// Why an image could not be imported.
#[derive(Debug, thiserror::Error)]
pub enum OciError {
    /// The layout, a blob or a layer is malformed, tampered with or out of bounds.
    #[error("{0}")]
    Invalid(String),
    /// Writing the tree failed (flintd's side: a full disk, say).
    #[error("{0}")]
    Write(String),
}

impl crate::error::Classify for OciError {
    fn kind(&self) -> crate::error::Kind {
        match self {
            OciError::Invalid(_) => crate::error::Kind::Invalid,
            OciError::Write(_) => crate::error::Kind::Internal,
        }
    }
}

fn bad(msg: impl Into<String>) -> OciError {
    OciError::Invalid(msg.into())
}

fn write_err(msg: impl Into<String>) -> OciError {
    OciError::Write(msg.into())
}

/// `p` as normal components (a leading `/` or `./` dropped); `..` anywhere is refused.
fn clean(p: &Path) -> Result<Vec<String>, OciError> {
    let mut out = Vec::new();
    for c in p.components() {
        match c {
            Component::Normal(s) => {
                out.push(s.to_str().ok_or_else(|| bad(format!("`{}` is not UTF-8", p.display())))?.to_string())
            }
            Component::CurDir | Component::RootDir => {}
            Component::ParentDir | Component::Prefix(_) => {
                return Err(bad(format!("entry `{}` climbs out of the image root", p.display())))
            }
        }
    }
    Ok(out)
}

impl Tree {
    /// Resolves `parts` (the parent directories of an entry) inside the tree: symlinks are followed as if the tree
    /// were `/` (`..` stops at the root), missing directories are made. Returns the resolved path.
    fn resolve_dirs(&mut self, parts: &[String], layer: usize) -> Result<String, OciError> {
        let mut todo: Vec<String> = parts.iter().rev().cloned().collect();
        let mut cur: Vec<String> = Vec::new();
        let mut hops = 0;
        while let Some(part) = todo.pop() {
            match part.as_str() {
                "" | "." => continue,
                ".." => {
                    cur.pop();
                    continue;
                }
                _ => {}
            }
            let mut path = cur.clone();
            path.push(part.clone());
            let key = path.join("/");
            match self.nodes.get(&key).map(|n| n.kind.clone()) {
                Some(Kind::Dir) => cur = path,
                Some(Kind::Symlink(target)) => {
                    hops += 1;
                    if hops > 40 {
                        return Err(bad(format!("too many symlinks resolving `{}`", parts.join("/"))));
                    }
                    if target.starts_with('/') {
                        cur.clear();
                    }
                    for t in target.split('/').rev() {
                        todo.push(t.to_string());
                    }
                }
                Some(_) => return Err(bad(format!("`{key}` is not a directory, yet an entry lies under it"))),
                None => {
                    self.nodes.insert(key, Node { kind: Kind::Dir, mode: 0o755, uid: 0, gid: 0, layer });
                    cur = path;
                }
            }
        }
        Ok(cur.join("/"))
    }

    fn remove_under(&mut self, key: &str, below_layer: usize, with_self: bool) {
        let prefix = if key.is_empty() { String::new() } else { format!("{key}/") };
        let doomed: Vec<String> = self
            .nodes
            .range(prefix.clone()..)
            .take_while(|(k, _)| k.starts_with(&prefix))
            .filter(|(_, n)| n.layer < below_layer)
            .map(|(k, _)| k.clone())
            .collect();
        for k in doomed {
            self.nodes.remove(&k);
        }
        if with_self && self.nodes.get(key).is_some_and(|n| n.layer < below_layer) {
            self.nodes.remove(key);
        }
    }

    /// Applies one entry of layer `layer`. Returns the key a file's content goes to (pass 2 writes it).
    fn apply(&mut self, layer: usize, entry: usize, e: &EntryInfo) -> Result<Option<String>, OciError> {
        let parts = clean(&e.path)?;
        let Some((name, parents)) = parts.split_last() else {
            return Ok(None); // the root directory itself
        };
        let dir = self.resolve_dirs(parents, layer)?;
        let join = |n: &str| if dir.is_empty() { n.to_string() } else { format!("{dir}/{n}") };
        if name == ".wh..wh..opq" {
            self.remove_under(&dir, layer, false);
            return Ok(None);
        }
        if let Some(hidden) = name.strip_prefix(".wh.") {
            self.remove_under(&join(hidden), layer, true);
            return Ok(None);
        }
        let key = join(name);
        let kind = match e.kind {
            EntryKind::Dir => Kind::Dir,
            EntryKind::File => Kind::File { layer, entry },
            EntryKind::Symlink => {
                Kind::Symlink(e.link.clone().ok_or_else(|| bad(format!("symlink `{key}` has no target")))?)
            }
            EntryKind::Hardlink => {
                let target = clean(Path::new(e.link.as_deref().unwrap_or("")))?.join("/");
                Kind::Hardlink(target)
            }
            EntryKind::Fifo => Kind::Fifo,
            EntryKind::Device | EntryKind::Other => return Ok(None),
        };
        // A directory over a directory keeps what is below it; anything else replaces the old node and its subtree.
        let keep_children = kind == Kind::Dir && self.nodes.get(&key).is_some_and(|n| n.kind == Kind::Dir);
        if !keep_children {
            self.remove_under(&key, usize::MAX, false);
        }
        let is_file = matches!(kind, Kind::File { .. });
        self.nodes.insert(key.clone(), Node { kind, mode: e.mode & 0o7777, uid: e.uid, gid: e.gid, layer });
        Ok(is_file.then_some(key))
    }

    /// Applies Flint's additions as layer `layer`, the last: parents resolve inside the model as the guest will
    /// resolve them; the last component is never followed (a symlink there is replaced).
    fn add(&mut self, layer: usize, add: &Additions) -> Result<(), OciError> {
        let place = |tree: &mut Tree, path: &str, kind: Kind, mode: u32, force: bool| -> Result<(), OciError> {
            let parts = clean(Path::new(path))?;
            let Some((name, parents)) = parts.split_last() else { return Ok(()) };
            let dir = tree.resolve_dirs(parents, layer)?;
            let key = if dir.is_empty() { name.clone() } else { format!("{dir}/{name}") };
            if kind == Kind::Dir {
                if let Some(n) = tree.nodes.get_mut(&key).filter(|n| n.kind == Kind::Dir) {
                    if force {
                        (n.mode, n.uid, n.gid) = (mode, 0, 0);
                    }
                    return Ok(());
                }
            }
            tree.remove_under(&key, usize::MAX, false);
            tree.nodes.insert(key, Node { kind, mode, uid: 0, gid: 0, layer });
            Ok(())
        };
        for (path, mode, force) in &add.dirs {
            place(self, path, Kind::Dir, *mode, *force)?;
        }
        for (i, (path, mode, _)) in add.files.iter().enumerate() {
            place(self, path, Kind::Added(i), *mode, true)?;
        }
        Ok(())
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum EntryKind {
    Dir,
    File,
    Symlink,
    Hardlink,
    Fifo,
    Device,
    Other,
}

struct EntryInfo {
    path: PathBuf,
    kind: EntryKind,
    link: Option<String>,
    mode: u32,
    uid: u32,
    gid: u32,
}

fn entry_info<R: Read>(e: &tar::Entry<'_, R>) -> Result<EntryInfo, OciError> {
    let h = e.header();
    let kind = match h.entry_type() {
        tar::EntryType::Directory => EntryKind::Dir,
        tar::EntryType::Regular | tar::EntryType::Continuous => EntryKind::File,
        tar::EntryType::Symlink => EntryKind::Symlink,
        tar::EntryType::Link => EntryKind::Hardlink,
        tar::EntryType::Fifo => EntryKind::Fifo,
        tar::EntryType::Char | tar::EntryType::Block => EntryKind::Device,
        _ => EntryKind::Other,
    };
    let link =
        e.link_name().map_err(|err| bad(format!("bad link name: {err}")))?.map(|l| l.to_string_lossy().into_owned());
    Ok(EntryInfo {
        path: e.path().map_err(|err| bad(format!("bad entry name: {err}")))?.into_owned(),
        kind,
        link,
        mode: h.mode().unwrap_or(0o644),
        uid: h.uid().unwrap_or(0).min(u64::from(u32::MAX)) as u32,
        gid: h.gid().unwrap_or(0).min(u64::from(u32::MAX)) as u32,
    })
}

/// A reader that hashes what passes through it.
struct Hashing<R> {
    inner: R,
    hash: Sha256,
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hash.update(&buf[..n]);
        Ok(n)
    }
}

/// A reader that fails past a byte budget shared by all layers (a decompression bomb stops here).
struct Bounded<'a, R> {
    inner: R,
    left: &'a mut u64,
}

impl<R: Read> Read for Bounded<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        *self.left = self
            .left
            .checked_sub(n as u64)
            .ok_or_else(|| std::io::Error::other("the layers unpack to more bytes than allowed"))?;
        Ok(n)
    }
}

/// A layer: its blob and, for OCI, the digest it must have.
struct Layer {
    path: PathBuf,
    digest: Option<String>,
}

/// Opens a layer blob, decompressing gzip or zstd (by magic), under the shared byte budget; the returned closure
/// checks the compressed bytes' digest once the whole blob was read.
fn open_layer<'a>(layer: &Layer, left: &'a mut u64) -> Result<tar::Archive<Box<dyn Read + 'a>>, OciError> {
    let mut f = std::fs::File::open(&layer.path).map_err(|e| bad(format!("open {}: {e}", layer.path.display())))?;
    let mut magic = [0u8; 4];
    let n = f.read(&mut magic).map_err(|e| bad(e.to_string()))?;
    let prefix = std::io::Cursor::new(magic[..n].to_vec());
    let raw = prefix.chain(f);
    let decoded: Box<dyn Read> = if n >= 2 && magic[..2] == [0x1f, 0x8b] {
        Box::new(flate2::read::GzDecoder::new(raw))
    } else if n == 4 && magic == [0x28, 0xb5, 0x2f, 0xfd] {
        Box::new(zstd::stream::read::Decoder::new(raw).map_err(|e| bad(e.to_string()))?)
    } else {
        Box::new(raw)
    };
    Ok(tar::Archive::new(Box::new(Bounded { inner: decoded, left })))
}

/// Checks a blob's sha256 against `digest` (`sha256:HEX`).
fn check_digest(path: &Path, digest: &str) -> Result<(), OciError> {
    let f = std::fs::File::open(path).map_err(|e| bad(format!("open {}: {e}", path.display())))?;
    let mut h = Hashing { inner: f, hash: Sha256::new() };
    std::io::copy(&mut h, &mut std::io::sink()).map_err(|e| bad(format!("read {}: {e}", path.display())))?;
    let got = format!("sha256:{}", hex(&h.hash.finalize()));
    if got != digest {
        return Err(bad(format!("blob {} has digest {got}, the manifest says {digest}", path.display())));
    }
    Ok(())
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn blob_path(dir: &Path, digest: &str) -> Result<PathBuf, OciError> {
    let hexpart = digest
        .strip_prefix("sha256:")
        .filter(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()))
        .ok_or_else(|| bad(format!("digest `{digest}`: only sha256:<64 lowercase hex> is supported")))?;
    let p = dir.join("blobs").join("sha256").join(hexpart);
    if !p.is_file() {
        return Err(bad(format!("blob {digest} is missing (blobs/sha256/{hexpart})")));
    }
    Ok(p)
}

fn read_json<T: for<'de> Deserialize<'de>>(path: &Path, what: &str) -> Result<T, OciError> {
    let bytes = std::fs::read(path).map_err(|e| bad(format!("{what}: read {}: {e}", path.display())))?;
    if bytes.len() > 4 << 20 {
        return Err(bad(format!("{what}: {} is larger than 4 MiB", path.display())));
    }
    serde_json::from_slice(&bytes).map_err(|e| bad(format!("{what} ({}) is malformed: {e}", path.display())))
}

#[derive(Deserialize)]
struct Descriptor {
    #[serde(rename = "mediaType", default)]
    media_type: String,
    digest: String,
    #[serde(default)]
    platform: Option<Platform>,
}

#[derive(Deserialize)]
struct Platform {
    #[serde(default)]
    architecture: String,
    #[serde(default)]
    os: String,
}

#[derive(Deserialize)]
struct Index {
    manifests: Vec<Descriptor>,
}

#[derive(Deserialize)]
struct Manifest {
    config: Descriptor,
    layers: Vec<Descriptor>,
}

#[derive(Deserialize, Default)]
struct ImageConfigFile {
    #[serde(default)]
    config: Option<ContainerConfig>,
}

#[derive(Deserialize, Default)]
struct ContainerConfig {
    #[serde(rename = "Env", default)]
    env: Option<Vec<String>>,
    #[serde(rename = "WorkingDir", default)]
    working_dir: Option<String>,
    #[serde(rename = "Entrypoint", default)]
    entrypoint: Option<Vec<String>>,
    #[serde(rename = "Cmd", default)]
    cmd: Option<Vec<String>>,
}

#[derive(Deserialize)]
struct DockerManifest {
    #[serde(rename = "Config")]
    config: String,
    #[serde(rename = "Layers")]
    layers: Vec<String>,
}

/// The layers and configuration of the layout in `dir`.
fn resolve(dir: &Path) -> Result<(Vec<Layer>, ImageConfigFile, String), OciError> {
    if dir.join("index.json").is_file() {
        let index: Index = read_json(&dir.join("index.json"), "index.json")?;
        let mut desc = pick(index.manifests, "index.json")?;
        // One level of image index (a multi-platform image): pick linux/amd64 in it.
        if desc.media_type.contains("image.index") || desc.media_type.contains("manifest.list") {
            let p = blob_path(dir, &desc.digest)?;
            check_digest(&p, &desc.digest)?;
            let nested: Index = read_json(&p, "image index")?;
            desc = pick(nested.manifests, "image index")?;
        }
        let mpath = blob_path(dir, &desc.digest)?;
        check_digest(&mpath, &desc.digest)?;
        let manifest: Manifest = read_json(&mpath, "image manifest")?;
        let cpath = blob_path(dir, &manifest.config.digest)?;
        check_digest(&cpath, &manifest.config.digest)?;
        let config: ImageConfigFile = read_json(&cpath, "image config")?;
        let layers = manifest
            .layers
            .iter()
            .map(|l| Ok(Layer { path: blob_path(dir, &l.digest)?, digest: Some(l.digest.clone()) }))
            .collect::<Result<_, OciError>>()?;
        return Ok((layers, config, desc.digest));
    }
    if dir.join("manifest.json").is_file() {
        let list: Vec<DockerManifest> = read_json(&dir.join("manifest.json"), "manifest.json")?;
        let [m] = <[DockerManifest; 1]>::try_from(list)
            .map_err(|l| bad(format!("manifest.json lists {} images; import one at a time", l.len())))?;
        let inside = |rel: &str| -> Result<PathBuf, OciError> {
            let parts = clean(Path::new(rel))?;
            let p = parts.iter().fold(dir.to_path_buf(), |p, c| p.join(c));
            p.is_file().then_some(p).ok_or_else(|| bad(format!("manifest.json names `{rel}`, which is missing")))
        };
        let config: ImageConfigFile = read_json(&inside(&m.config)?, "image config")?;
        let layers =
            m.layers.iter().map(|l| Ok(Layer { path: inside(l)?, digest: None })).collect::<Result<_, OciError>>()?;
        return Ok((layers, config, m.config));
    }
    Err(bad(format!(
        "{} is neither an OCI image layout (no index.json) nor a docker save archive (no manifest.json)",
        dir.display()
    )))
}

fn pick(manifests: Vec<Descriptor>, what: &str) -> Result<Descriptor, OciError> {
    let n = manifests.len();
    if n == 1 {
        return Ok(manifests.into_iter().next().expect("one"));
    }
    manifests
        .into_iter()
        .find(|d| d.platform.as_ref().is_some_and(|p| p.os == "linux" && p.architecture == "amd64"))
        .ok_or_else(|| bad(format!("{what} lists {n} manifests and none for linux/amd64")))
}

/// Unpacks a tar of a layout (or a docker save archive) into `into`: regular files and directories only, by clean
/// relative names.
fn unpack_archive(tar_path: &Path, into: &Path, bounds: Bounds) -> Result<(), OciError> {
    let f = std::fs::File::open(tar_path).map_err(|e| bad(format!("open {}: {e}", tar_path.display())))?;
    let mut left = bounds.max_bytes;
    let mut a = tar::Archive::new(Bounded { inner: f, left: &mut left });
    for e in a.entries().map_err(|e| bad(format!("{}: not a tar archive: {e}", tar_path.display())))? {
        let mut e = e.map_err(|e| bad(format!("{}: {e}", tar_path.display())))?;
        let info = entry_info(&e)?;
        let parts = clean(&info.path)?;
        if parts.is_empty() {
            continue;
        }
        let dst = parts.iter().fold(into.to_path_buf(), |p, c| p.join(c));
        match info.kind {
            EntryKind::Dir => {
                std::fs::create_dir_all(&dst).map_err(|e| write_err(format!("{}: {e}", dst.display())))?
            }
            EntryKind::File => {
                if let Some(p) = dst.parent() {
                    std::fs::create_dir_all(p).map_err(|e| bad(format!("{}: {e}", p.display())))?;
                }
                let mut out = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .custom_flags(libc::O_NOFOLLOW)
                    .open(&dst)
                    .map_err(|e| bad(format!("{}: {e}", dst.display())))?;
                std::io::copy(&mut e, &mut out).map_err(|e| bad(format!("{}: {e}", dst.display())))?;
            }
            // The archive around a layout holds blobs and JSON files; a link in it is not ours to follow.
            _ => {
                return Err(bad(format!(
                    "{}: entry `{}` is not a file or directory",
                    tar_path.display(),
                    info.path.display()
                )))
            }
        }
    }
    Ok(())
}

/// Imports the image at `source` (a layout directory or a tar of one, or a `docker save` archive) as a tree in
/// `root` (which must not exist), with Flint's `additions` on top; `scratch` holds an unpacked archive meanwhile.
/// `additions` may depend on the image's configuration (its `Env`): it is called once that is read.
pub fn import_tree(
    source: &Path,
    root: &Path,
    scratch: &Path,
    bounds: Bounds,
    additions: impl FnOnce(&Imported) -> Additions,
) -> Result<Imported, OciError> {
    let meta = std::fs::metadata(source).map_err(|e| bad(format!("{}: {e}", source.display())))?;
    let layout = if meta.is_dir() {
        source.to_path_buf()
    } else {
        let into = scratch.join("archive");
        std::fs::create_dir_all(&into).map_err(|e| write_err(e.to_string()))?;
        unpack_archive(source, &into, bounds)?;
        into
    };
    let (layers, config, source_id) = resolve(&layout)?;
    let cfg = config.config.unwrap_or_default();
    let mut imported = Imported { source: source_id, layers: layers.len(), ..Default::default() };
    for kv in cfg.env.unwrap_or_default() {
        if let Some((k, v)) = kv.split_once('=') {
            imported.env.insert(k.to_string(), v.to_string());
        }
    }
    imported.workdir = cfg.working_dir.filter(|w| !w.is_empty());
    imported.command = cfg.entrypoint.unwrap_or_default().into_iter().chain(cfg.cmd.unwrap_or_default()).collect();

    // Pass 1: the model, and each layer's digest.
    let mut tree = Tree::default();
    let mut left = bounds.max_bytes;
    let mut entries = 0usize;
    for (li, layer) in layers.iter().enumerate() {
        if let Some(d) = &layer.digest {
            check_digest(&layer.path, d).map_err(|e| bad(format!("layer {}: {e}", li + 1)))?;
        }
        let mut a = open_layer(layer, &mut left)?;
        for (ei, e) in a.entries().map_err(|e| bad(format!("layer {}: not a tar: {e}", li + 1)))?.enumerate() {
            let e = e.map_err(|e| bad(format!("layer {}: {e}", li + 1)))?;
            entries += 1;
            if entries > bounds.max_entries {
                return Err(bad(format!("the layers hold more than {} entries", bounds.max_entries)));
            }
            let info = entry_info(&e).map_err(|e| bad(format!("layer {}: {e}", li + 1)))?;
            if info.kind == EntryKind::Device {
                imported.skipped_devices += 1;
            }
            tree.apply(li, ei, &info).map_err(|e| bad(format!("layer {}: {e}", li + 1)))?;
        }
    }

    let added = additions(&imported);
    tree.add(layers.len(), &added)?;

    // Pass 2: write the final tree, every path resolved beneath `root` without following a symlink (the model
    // guarantees every parent is a directory; this makes it so even if the model were wrong). Directories first
    // (owner-writable until the end), then every file from the layer entry that won, then links.
    std::fs::create_dir(root).map_err(|e| write_err(format!("create {}: {e}", root.display())))?;
    let b = crate::beneath::Beneath::open(root).map_err(|e| bad(e.to_string()))?;
    let at = |key: &str| PathBuf::from(key);
    for (key, n) in &tree.nodes {
        if n.kind == Kind::Dir {
            b.create_dir(&at(key), 0o700, false).map_err(|e| write_err(format!("mkdir {key}: {e}")))?;
        }
    }
    let mut wanted: BTreeMap<(usize, usize), String> = BTreeMap::new();
    for (key, n) in &tree.nodes {
        match n.kind {
            Kind::File { layer, entry } => {
                wanted.insert((layer, entry), key.clone());
            }
            Kind::Added(i) => {
                b.write_new(&at(key), 0o600, &added.files[i].2).map_err(|e| write_err(format!("write {key}: {e}")))?;
            }
            _ => {}
        }
    }
    let mut left = bounds.max_bytes;
    for (li, layer) in layers.iter().enumerate() {
        if !wanted.keys().any(|(l, _)| *l == li) {
            continue;
        }
        let mut a = open_layer(layer, &mut left)?;
        for (ei, e) in a.entries().map_err(|e| bad(format!("layer {}: {e}", li + 1)))?.enumerate() {
            let mut e = e.map_err(|e| bad(format!("layer {}: {e}", li + 1)))?;
            let Some(key) = wanted.get(&(li, ei)) else { continue };
            let mut out = b.create_file(&at(key), 0o600).map_err(|e| write_err(format!("write {key}: {e}")))?;
            imported.bytes += std::io::copy(&mut e, &mut out).map_err(|e| write_err(format!("write {key}: {e}")))?;
            out.flush().map_err(|e| write_err(e.to_string()))?;
            imported.files += 1;
        }
    }
    for (key, n) in &tree.nodes {
        match &n.kind {
            Kind::Symlink(target) => {
                b.symlink(Path::new(target), &at(key)).map_err(|e| write_err(format!("symlink {key}: {e}")))?
            }
            Kind::Hardlink(target) => {
                if !matches!(tree.nodes.get(target).map(|t| &t.kind), Some(Kind::File { .. })) {
                    return Err(bad(format!("hard link `{key}` names `{target}`, which is not a file of the image")));
                }
                b.hard_link(&at(target), &at(key)).map_err(|e| write_err(format!("link {key}: {e}")))?;
            }
            Kind::Fifo => b.mkfifo(&at(key), 0o600).map_err(|e| write_err(format!("mkfifo {key}: {e}")))?,
            _ => {}
        }
    }
    // Owners and modes last (deepest first, so a read-only directory is fixed after what is inside it).
    for (key, n) in tree.nodes.iter().rev() {
        let p = at(key);
        if !matches!(n.kind, Kind::Hardlink(_)) {
            b.lchown(&p, n.uid, n.gid).map_err(|e| write_err(format!("chown {key}: {e}")))?;
        }
        if !matches!(n.kind, Kind::Symlink(_) | Kind::Hardlink(_)) {
            b.chmod(&p, n.mode).map_err(|e| write_err(format!("chmod {key}: {e}")))?;
        }
    }
    Ok(imported)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(path: &str, kind: EntryKind, link: Option<&str>) -> EntryInfo {
        EntryInfo { path: path.into(), kind, link: link.map(String::from), mode: 0o755, uid: 0, gid: 0 }
    }

    fn keys(t: &Tree) -> Vec<String> {
        t.nodes.keys().cloned().collect()
    }

    #[test]
    fn whiteouts_opaque_dirs_and_symlinked_parents() {
        let mut t = Tree::default();
        for (i, e) in [
            entry("./etc/", EntryKind::Dir, None),
            entry("etc/a", EntryKind::File, None),
            entry("etc/b", EntryKind::File, None),
            entry("data/x/y", EntryKind::File, None),
            entry("lib", EntryKind::Symlink, Some("usr/lib")),
            entry("usr/lib/", EntryKind::Dir, None),
        ]
        .iter()
        .enumerate()
        {
            t.apply(0, i, e).unwrap();
        }
        // Layer 1: remove etc/a, make data opaque, write through the lib symlink.
        t.apply(1, 0, &entry("etc/.wh.a", EntryKind::File, None)).unwrap();
        t.apply(1, 1, &entry("data/.wh..wh..opq", EntryKind::File, None)).unwrap();
        t.apply(1, 2, &entry("data/new", EntryKind::File, None)).unwrap();
        assert_eq!(
            t.apply(1, 3, &entry("lib/libz.so", EntryKind::File, None)).unwrap().as_deref(),
            Some("usr/lib/libz.so")
        );
        assert_eq!(keys(&t), ["data", "data/new", "etc", "etc/b", "lib", "usr", "usr/lib", "usr/lib/libz.so"]);
        // A file replacing a directory takes its subtree with it.
        t.apply(2, 0, &entry("usr/lib", EntryKind::File, None)).unwrap();
        assert!(!t.nodes.contains_key("usr/lib/libz.so"));
        // Escapes are refused; an absolute symlink resolves from the image's root.
        assert!(t
            .apply(3, 0, &entry("../etc/passwd", EntryKind::File, None))
            .unwrap_err()
            .to_string()
            .contains("climbs out"));
        t.apply(3, 1, &entry("abs", EntryKind::Symlink, Some("/etc"))).unwrap();
        assert_eq!(t.apply(3, 2, &entry("abs/c", EntryKind::File, None)).unwrap().as_deref(), Some("etc/c"));
        t.apply(3, 3, &entry("up", EntryKind::Symlink, Some("../../../etc"))).unwrap();
        assert_eq!(t.apply(3, 4, &entry("up/d", EntryKind::File, None)).unwrap().as_deref(), Some("etc/d"));
        t.apply(3, 5, &entry("loop", EntryKind::Symlink, Some("loop"))).unwrap();
        assert!(t
            .apply(3, 6, &entry("loop/x", EntryKind::File, None))
            .unwrap_err()
            .to_string()
            .contains("too many symlinks"));
        assert!(t
            .apply(3, 7, &entry("etc/b/x", EntryKind::File, None))
            .unwrap_err()
            .to_string()
            .contains("not a directory"));
    }
    /// A layer whose `tmp` is a symlink to a host directory and whose `etc/flint/image.json` is a symlink to a host
    /// file: Flint's additions replace the links inside the image; the host directory keeps its mode and stays
    /// empty, the host file keeps its content (the critical finding of docs/security.md).
    #[test]
    fn additions_never_write_through_the_images_symlinks() {
        use std::os::unix::fs::PermissionsExt;
        let base = std::env::temp_dir().join(format!("flint-oci-additions-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        let (layout, host_dir, host_file) = (base.join("layout"), base.join("host-dir"), base.join("host-file.sh"));
        std::fs::create_dir_all(layout.join("blobs/sha256")).unwrap();
        std::fs::create_dir_all(&host_dir).unwrap();
        std::fs::set_permissions(&host_dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::write(&host_file, b"# host\n").unwrap();
        let blob = |bytes: &[u8]| {
            let d = hex(&Sha256::digest(bytes));
            std::fs::write(layout.join("blobs/sha256").join(&d), bytes).unwrap();
            (format!("sha256:{d}"), bytes.len())
        };
        let mut tar = tar::Builder::new(Vec::new());
        let mut link = |path: &str, target: &Path| {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(tar::EntryType::Symlink);
            h.set_size(0);
            h.set_mode(0o777);
            tar.append_link(&mut h, path, target).unwrap();
        };
        link("tmp", &host_dir);
        link("etc/flint/image.json", &host_file);
        link("run", Path::new("../../../../../../run/flint-oci-test-nowhere"));
        let layer = blob(&tar.into_inner().unwrap());
        let config = blob(br#"{"config":{"Env":["PATH=/bin"]}}"#);
        let manifest = blob(
            format!(
                r#"{{"config":{{"digest":"{}","size":{}}},"layers":[{{"digest":"{}","size":{}}}]}}"#,
                config.0, config.1, layer.0, layer.1
            )
            .as_bytes(),
        );
        std::fs::write(
            layout.join("index.json"),
            format!(
                r#"{{"manifests":[{{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"{}"}}]}}"#,
                manifest.0
            ),
        )
        .unwrap();
        let root = base.join("tree");
        let imported = import_tree(&layout, &root, &base, Bounds::default(), |i| {
            let mut add = Additions::default();
            for d in ["etc/flint/hooks", "run"] {
                add.dirs.push((d.into(), 0o755, false));
            }
            add.dirs.push(("tmp".into(), 0o1777, true));
            add.files.push(("etc/flint/image.json".into(), 0o644, format!("{:?}", i.env).into_bytes()));
            add
        })
        .unwrap();
        assert_eq!(imported.env.get("PATH").map(String::as_str), Some("/bin"));
        // The host's directory and file are as they were.
        assert_eq!(std::fs::metadata(&host_dir).unwrap().permissions().mode() & 0o7777, 0o755);
        assert_eq!(std::fs::read_dir(&host_dir).unwrap().count(), 0);
        assert_eq!(std::fs::read(&host_file).unwrap(), b"# host\n");
        // Inside the image: real directories and a real file where the links were.
        let tmp = std::fs::symlink_metadata(root.join("tmp")).unwrap();
        assert!(tmp.is_dir() && tmp.permissions().mode() & 0o7777 == 0o1777, "{tmp:?}");
        assert!(std::fs::symlink_metadata(root.join("run")).unwrap().is_dir());
        let json = std::fs::symlink_metadata(root.join("etc/flint/image.json")).unwrap();
        assert!(json.is_file(), "{json:?}");
        assert!(std::fs::read_to_string(root.join("etc/flint/image.json")).unwrap().contains("PATH"));
        std::fs::remove_dir_all(&base).unwrap();
    }

    /// Flint's additions resolve parents inside the model (as the guest does) and replace a link at the last
    /// component; a forced mode changes an existing directory, an unforced one keeps the image's.
    #[test]
    fn additions_resolve_inside_the_model() {
        let mut t = Tree::default();
        t.apply(0, 0, &entry("etc", EntryKind::Symlink, Some("/srv/etc"))).unwrap();
        t.apply(0, 1, &entry("root/", EntryKind::Dir, None)).unwrap();
        t.nodes.get_mut("root").unwrap().mode = 0o700;
        t.apply(0, 2, &entry("tmp", EntryKind::Symlink, Some("/elsewhere"))).unwrap();
        let add = Additions {
            dirs: vec![("root".into(), 0o755, false), ("tmp".into(), 0o1777, true)],
            files: vec![("etc/flint/image.json".into(), 0o644, b"{}".to_vec())],
        };
        t.add(1, &add).unwrap();
        assert_eq!(t.nodes["srv/etc/flint/image.json"].kind, Kind::Added(0), "through the image's own etc link");
        assert_eq!(t.nodes["root"].mode, 0o700, "the image's mode is kept");
        assert_eq!((t.nodes["tmp"].kind.clone(), t.nodes["tmp"].mode), (Kind::Dir, 0o1777));
    }
}
