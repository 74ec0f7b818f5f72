//! A VM's drives in its snapshots: the content of every drive at snapshot time is copied (reflink where the
//! filesystem shares extents, otherwise a sparse copy) while the VM is paused, so that the copy matches the memory
//! image; the copy then goes into the store as an image (`drive0`, `drive1`, ...), chunked and deduplicated like
//! memory. A clone gets its own file for every drive, written from the store: clones never share a host file, and
//! a clone on another host gets the same disk.
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;

/// The store image that holds drive `index`.
pub fn image_name(index: usize) -> String {
    format!("drive{index}")
}

/// The file a restored VM's drive `index` lives in, inside its directory.
pub fn clone_path(dir: &Path, index: usize) -> std::path::PathBuf {
    dir.join(file_name(index))
}

/// The name of that file, relative to the VM's directory.
pub fn file_name(index: usize) -> std::path::PathBuf {
    std::path::PathBuf::from(format!("drive{index}.img"))
}

/// The metadata value that lists which drives are read-only (`"0,1,0"`), and its inverse.
pub fn read_only_list(flags: &[bool]) -> String {
    flags.iter().map(|r| if *r { "1" } else { "0" }).collect::<Vec<_>>().join(",")
}

pub fn parse_read_only_list(text: &str, n: usize) -> Result<Vec<bool>, String> {
    if n == 0 {
        return Ok(Vec::new());
    }
    let flags: Vec<bool> = text
        .split(',')
        .map(|f| match f {
            "0" => Ok(false),
            "1" => Ok(true),
            other => Err(format!("bad read-only flag `{other}`")),
        })
        .collect::<Result<_, _>>()?;
    if flags.len() != n {
        return Err(format!("{} read-only flags for {n} drives", flags.len()));
    }
    Ok(flags)
}

/// Copies `src` to a new file `dst`: a reflink (FICLONE) where the filesystem supports it, otherwise a sparse copy
/// (only the data extents, found with SEEK_DATA/SEEK_HOLE, through copy_file_range). Returns whether it was a
/// reflink. `dst` must not exist.
pub fn copy(src: &Path, dst: &Path) -> io::Result<bool> {
    let from = File::open(src)?;
    let to = std::fs::OpenOptions::new().write(true).create_new(true).open(dst)?;
    let result = copy_files(&from, &to);
    if result.is_err() {
        let _ = std::fs::remove_file(dst);
    }
    result
}

/// Copies open file `from` into the new, empty file `to` (as [`copy`]) and syncs it.
pub fn copy_files(from: &File, to: &File) -> io::Result<bool> {
    let reflinked = copy_fd(from, to)?;
    to.sync_all()?;
    Ok(reflinked)
}

/// Writes the data extents of `from` over `to` (which must be as large and hold only holes where `from` does),
/// without a reflink: `to` keeps its own blocks (a mount slot a VM has open).
pub fn write_over(from: &File, to: &File) -> io::Result<()> {
    copy_extents(from, to)?;
    to.sync_all()
}

fn copy_fd(from: &File, to: &File) -> io::Result<bool> {
    const FICLONE: libc::c_ulong = 0x4004_9409;
    // SAFETY: FICLONE takes the source fd as its argument and changes only the destination file, both fds are
    // open for the duration of the call.
    if unsafe { libc::ioctl(to.as_raw_fd(), FICLONE as _, from.as_raw_fd()) } == 0 {
        return Ok(true);
    }
    copy_extents(from, to)?;
    Ok(false)
}

/// Sizes `to` as `from` and copies `from`'s data extents (SEEK_DATA/SEEK_HOLE) through copy_file_range.
fn copy_extents(from: &File, to: &File) -> io::Result<()> {
    let size = from.metadata()?.len();
    to.set_len(size)?;
    let mut pos: i64 = 0;
    while (pos as u64) < size {
        // SAFETY: lseek on an fd we own; no memory is passed.
        let data = unsafe { libc::lseek(from.as_raw_fd(), pos, libc::SEEK_DATA) };
        if data < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENXIO) {
                break; // only a hole is left
            }
            return Err(e);
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(from.as_raw_fd(), data, libc::SEEK_HOLE) };
        if hole < 0 {
            return Err(io::Error::last_os_error());
        }
        let (mut off_in, mut off_out) = (data, data);
        while off_in < hole {
            let want = (hole - off_in) as usize;
            // SAFETY: both offsets point at local i64s that outlive the call; the kernel copies between the two
            // fds we own and updates the offsets.
            let n =
                unsafe { libc::copy_file_range(from.as_raw_fd(), &mut off_in, to.as_raw_fd(), &mut off_out, want, 0) };
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            if n == 0 {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the drive shrank while being copied"));
            }
        }
        pos = hole;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{FileExt, MetadataExt};

    #[test]
    fn sparse_copy_keeps_data_and_holes() {
        let dir = std::env::temp_dir().join(format!("flint-drives-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let src = dir.join("src");
        let f = File::create(&src).unwrap();
        f.set_len(64 << 20).unwrap();
        f.write_all_at(b"head", 0).unwrap();
        f.write_all_at(b"middle", 32 << 20).unwrap();
        f.write_all_at(b"tail", (64 << 20) - 4).unwrap();
        drop(f);
        let dst = dir.join("dst");
        copy(&src, &dst).unwrap();
        assert_eq!(std::fs::read(&src).unwrap(), std::fs::read(&dst).unwrap());
        // Sparse (or shared extents): far fewer blocks than 64 MiB.
        assert!(std::fs::metadata(&dst).unwrap().blocks() * 512 < 8 << 20);
        // The copy is its own file.
        File::options().write(true).open(&dst).unwrap().write_all_at(b"HEAD", 0).unwrap();
        assert_eq!(&std::fs::read(&src).unwrap()[..4], b"head");
        // Never over an existing file.
        assert_eq!(copy(&src, &dst).unwrap_err().kind(), io::ErrorKind::AlreadyExists);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn read_only_lists_round_trip_and_bad_ones_are_refused() {
        let flags = [false, true, false];
        assert_eq!(parse_read_only_list(&read_only_list(&flags), 3).unwrap(), flags);
        assert!(parse_read_only_list("0,1", 3).is_err());
        assert!(parse_read_only_list("0,x,1", 3).is_err());
        assert_eq!(parse_read_only_list("", 0).unwrap(), Vec::<bool>::new());
    }
}
