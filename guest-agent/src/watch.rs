//! Directory watches for `watch` requests: one inotify instance per watch, one inotify watch per directory
//! (the root, and with `recursive` every directory below it, those made later included).
//!
//! A directory made (or moved in) below a recursive watch is watched as soon as its `create` is read, then
//! scanned: what was made in it before its watch was in place is reported as `create` too, so a `mkdir -p a/b &&
//! touch a/b/f` is never half seen (an entry made between the watch and the scan may be reported twice).
use std::collections::HashMap;
use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use tokio::io::unix::AsyncFd;

use crate::protocol::{ErrorCode, FsEvent, FsOp};

/// Most directories one watch holds (inotify watches are a per-user kernel resource).
pub const MAX_DIRS: usize = 8192;

const MASK: u32 = libc::IN_CREATE
    | libc::IN_MODIFY
    | libc::IN_ATTRIB
    | libc::IN_DELETE
    | libc::IN_MOVED_FROM
    | libc::IN_MOVED_TO
    | libc::IN_DELETE_SELF
    | libc::IN_MOVE_SELF
    | libc::IN_ONLYDIR
    | libc::IN_DONT_FOLLOW;

/// The size of `struct inotify_event` before its name.
const EVENT_HEAD: usize = 16;

/// One watch.
pub struct Watcher {
    fd: AsyncFd<OwnedFd>,
    root: PathBuf,
    recursive: bool,
    /// Watch descriptor → the directory's path relative to the root ("" for the root).
    dirs: HashMap<i32, String>,
    root_wd: i32,
    done: bool,
    /// Where events are read into (kept: a watch reads many times).
    buf: Vec<u8>,
}

impl Watcher {
    /// Watches `root`, a directory. Needs a Tokio runtime (the descriptor is registered with its reactor).
    pub fn new(root: &Path, recursive: bool) -> Result<Watcher, (ErrorCode, String)> {
        let meta = std::fs::metadata(root).map_err(|e| (ErrorCode::from_io(&e), format!("{}: {e}", root.display())))?;
        if !meta.is_dir() {
            return Err((ErrorCode::NotADirectory, format!("{} is not a directory", root.display())));
        }
        // SAFETY: inotify_init1 takes flags only; the descriptor it returns is owned by the OwnedFd below.
        let raw = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
        if raw < 0 {
            let e = std::io::Error::last_os_error();
            return Err((ErrorCode::Io, format!("inotify_init1: {e}")));
        }
        // SAFETY: `raw` is a descriptor this function just opened and nothing else owns.
        let owned = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: the OwnedFd is moved into the AsyncFd, which deregisters it before it is closed; nothing
        // else holds or replaces the descriptor meanwhile.
        let fd = unsafe { AsyncFd::register(owned) }.map_err(|e| (ErrorCode::Io, format!("inotify: {e}")))?;
        let mut w = Watcher {
            fd,
            root: root.to_path_buf(),
            recursive,
            dirs: HashMap::new(),
            root_wd: -1,
            done: false,
            buf: vec![0u8; 64 * 1024],
        };
        // The root may be named through a symlink: follow it (subdirectories are never followed).
        w.root_wd = w.add(root, "", false).map_err(|e| (ErrorCode::from_io(&e), format!("{}: {e}", root.display())))?;
        if recursive {
            w.scan("", None).map_err(|e| (ErrorCode::from_io(&e), e.to_string()))?;
        }
        Ok(w)
    }

    fn add(&mut self, path: &Path, rel: &str, no_follow: bool) -> std::io::Result<i32> {
        if self.dirs.len() >= MAX_DIRS {
            return Err(std::io::Error::other(format!("more than {MAX_DIRS} directories to watch")));
        }
        let c = CString::new(path.as_os_str().as_bytes()).map_err(|_| std::io::Error::other("a NUL in a path"))?;
        let mask = if no_follow { MASK } else { MASK & !libc::IN_DONT_FOLLOW };
        // SAFETY: the inotify descriptor is ours and `c` is a NUL-terminated path that lives across the call.
        let wd = unsafe { libc::inotify_add_watch(self.fd.get_ref().as_raw_fd(), c.as_ptr(), mask) };
        if wd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        self.dirs.insert(wd, rel.to_string());
        Ok(wd)
    }

    /// Watches every directory below `rel` (not through symlinks); with `report`, each entry found is a `create`
    /// in it.
    fn scan(&mut self, rel: &str, mut report: Option<&mut Vec<FsEvent>>) -> std::io::Result<()> {
        let mut todo = vec![rel.to_string()];
        while let Some(dir) = todo.pop() {
            let abs = self.root.join(&dir);
            let Ok(rd) = std::fs::read_dir(&abs) else { continue };
            for ent in rd.flatten() {
                let name = join(&dir, &ent.file_name().to_string_lossy());
                if let Some(out) = report.as_deref_mut() {
                    out.push(FsEvent { name: name.clone(), op: FsOp::Create });
                }
                if ent.file_type().is_ok_and(|t| t.is_dir()) {
                    match self.add(&abs.join(ent.file_name()), &name, true) {
                        Ok(_) => todo.push(name),
                        // Gone already, or not a directory any more: its own events say so.
                        Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ENOTDIR)) => {}
                        Err(e) => return Err(e),
                    }
                }
            }
        }
        Ok(())
    }

    /// Stops watching `rel` and every directory below it (it was moved away).
    fn forget(&mut self, rel: &str) {
        let prefix = format!("{rel}/");
        let gone: Vec<i32> =
            self.dirs.iter().filter(|(_, d)| *d == rel || d.starts_with(&prefix)).map(|(wd, _)| *wd).collect();
        for wd in gone {
            self.dirs.remove(&wd);
            // SAFETY: removes a watch of our own descriptor; a watch the kernel dropped already gives EINVAL.
            unsafe { libc::inotify_rm_watch(self.fd.get_ref().as_raw_fd(), wd) };
        }
    }

    /// The next changes, in order (an empty batch: nothing that is reported, e.g. a queue overflow). `None`: the
    /// watched directory itself was removed or moved; the watch is over.
    pub async fn next(&mut self) -> std::io::Result<Option<Vec<FsEvent>>> {
        if self.done {
            return Ok(None);
        }
        let Watcher { fd, buf, .. } = self;
        let n = loop {
            let mut guard = fd.readable().await?;
            match guard.try_io(|fd| {
                // SAFETY: reads into `buf`, which is valid for its whole length, from our own descriptor.
                let n = unsafe { libc::read(fd.get_ref().as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
                if n < 0 {
                    Err(std::io::Error::last_os_error())
                } else {
                    Ok(n as usize)
                }
            }) {
                Ok(r) => break r?,
                Err(_would_block) => continue,
            }
        };
        let raw = parse(&self.buf[..n]);
        let mut out = Vec::new();
        let mut ended = false;
        for (wd, mask, name) in raw {
            if mask & libc::IN_IGNORED != 0 {
                self.dirs.remove(&wd);
                ended |= wd == self.root_wd;
                continue;
            }
            if wd == self.root_wd && mask & (libc::IN_DELETE_SELF | libc::IN_MOVE_SELF) != 0 {
                ended = true;
                continue;
            }
            let Some(dir) = self.dirs.get(&wd).cloned() else { continue };
            if name.is_empty() {
                // A watched subdirectory's own removal or move: its parent reports it by name.
                continue;
            }
            let rel = join(&dir, &name);
            let is_dir = mask & libc::IN_ISDIR != 0;
            let op = if mask & (libc::IN_CREATE | libc::IN_MOVED_TO) != 0 {
                FsOp::Create
            } else if mask & libc::IN_DELETE != 0 {
                FsOp::Remove
            } else if mask & libc::IN_MOVED_FROM != 0 {
                FsOp::Rename
            } else if mask & libc::IN_MODIFY != 0 {
                FsOp::Write
            } else if mask & libc::IN_ATTRIB != 0 {
                FsOp::Chmod
            } else {
                continue;
            };
            out.push(FsEvent { name: rel.clone(), op });
            if is_dir && self.recursive {
                match op {
                    // Best effort: a directory past MAX_DIRS is reported, not watched.
                    FsOp::Create if self.add(&self.root.join(&rel), &rel, true).is_ok() => {
                        let _ = self.scan(&rel, Some(&mut out));
                    }
                    FsOp::Rename => self.forget(&rel),
                    _ => {}
                }
            }
        }
        if ended {
            // What came with the end is reported first; the next call sees the end.
            self.done = true;
            if out.is_empty() {
                return Ok(None);
            }
        }
        Ok(Some(out))
    }
}

fn join(dir: &str, name: &str) -> String {
    if dir.is_empty() {
        name.to_string()
    } else {
        format!("{dir}/{name}")
    }
}

/// `struct inotify_event`s: (watch descriptor, mask, name). A truncated tail is ignored (the kernel never
/// splits an event across reads).
pub fn parse(mut b: &[u8]) -> Vec<(i32, u32, String)> {
    let mut out = Vec::new();
    while b.len() >= EVENT_HEAD {
        let wd = i32::from_ne_bytes([b[0], b[1], b[2], b[3]]);
        let mask = u32::from_ne_bytes([b[4], b[5], b[6], b[7]]);
        let len = u32::from_ne_bytes([b[12], b[13], b[14], b[15]]) as usize;
        let Some(name) = b.get(EVENT_HEAD..EVENT_HEAD + len) else { break };
        let end = name.iter().position(|c| *c == 0).unwrap_or(name.len());
        out.push((wd, mask, String::from_utf8_lossy(&name[..end]).into_owned()));
        b = &b[EVENT_HEAD + len..];
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(wd: i32, mask: u32, name: &[u8], pad: usize) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend(wd.to_ne_bytes());
        b.extend(mask.to_ne_bytes());
        b.extend(0u32.to_ne_bytes());
        b.extend(((name.len() + pad) as u32).to_ne_bytes());
        b.extend(name);
        b.extend(std::iter::repeat_n(0u8, pad));
        b
    }

    #[test]
    fn events_parse_with_their_padding_and_a_cut_tail_is_dropped() {
        let mut b = event(1, libc::IN_CREATE, b"a.txt", 3);
        b.extend(event(2, libc::IN_DELETE_SELF, b"", 0));
        let cut = event(3, libc::IN_MODIFY, b"long-name", 7);
        b.extend(&cut[..cut.len() - 4]);
        assert_eq!(
            parse(&b),
            vec![(1, libc::IN_CREATE, "a.txt".to_string()), (2, libc::IN_DELETE_SELF, String::new())]
        );
        assert_eq!(join("", "x"), "x");
        assert_eq!(join("a/b", "x"), "a/b/x");
    }
}
