//! Small file helpers shared by the backends and the vault: private files, atomic writes.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

/// Write `data` to `path` atomically and durably, readable by the owner only (0600):
/// write a temp file in the same directory, fsync it, rename it over `path`, fsync the
/// directory. After a power loss the file holds either the old or the new contents.
pub fn write_atomic_private(path: &Path, data: &[u8]) -> std::io::Result<()> {
    write_atomic(path, data, 0o600)
}

/// [`write_atomic_private`] with another file mode (e.g. 0644 for a configuration file that
/// is not secret but must stay root-owned).
///
/// The temp file has a random name and is opened with `O_CREAT | O_EXCL | O_NOFOLLOW`: a
/// symlink or file planted under that name (by someone who can write the directory) makes the
/// write fail instead of writing through it.
pub fn write_atomic(path: &Path, data: &[u8], mode: u32) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "file".into());
    let mut tries = 0;
    let (tmp, mut f) = loop {
        let mut rnd = [0u8; 8];
        rand_core::RngCore::try_fill_bytes(&mut rand_core::OsRng, &mut rnd)
            .map_err(|e| std::io::Error::other(format!("random temp name: {e}")))?;
        let tmp = dir.join(format!(".{name}.tmp.{}", hex::encode(rnd)));
        match OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .custom_flags(libc_flags::O_NOFOLLOW | libc_flags::O_CLOEXEC)
            .open(&tmp)
        {
            Ok(f) => break (tmp, f),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && tries < 8 => tries += 1,
            Err(e) => return Err(e),
        }
    };
    let result = (|| {
        f.set_permissions(fs::Permissions::from_mode(mode))?;
        f.write_all(data)?;
        f.sync_all()?;
        drop(f);
        fs::rename(&tmp, path)?;
        File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Open flags std does not name (values of Linux on every architecture devid supports).
mod libc_flags {
    /// Do not follow a symlink in the last component.
    pub(super) const O_NOFOLLOW: i32 = 0o400000;
    /// Close on exec.
    pub(super) const O_CLOEXEC: i32 = 0o2000000;
}

/// An advisory lock (`flock(LOCK_EX)`) on `<dir>/.lock`, held until dropped. Every devid
/// process takes it around a read-modify-write of the state dir (the agent's renewal,
/// `devid secret put`, `devid config set`), so two writers cannot lose each other's update.
#[derive(Debug)]
pub struct DirLock {
    _file: File,
}

/// Name of the lock file in the state dir.
pub const LOCK_FILE: &str = ".lock";

impl DirLock {
    /// Block until the lock on `dir` is ours.
    pub fn exclusive(dir: &Path) -> std::io::Result<DirLock> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(libc_flags::O_NOFOLLOW | libc_flags::O_CLOEXEC)
            .open(dir.join(LOCK_FILE))?;
        file.lock()?;
        Ok(DirLock { _file: file })
    }
}

/// Why a path is not trusted by [`check_root_owned`].
#[derive(Debug, thiserror::Error)]
#[error("{}: {reason}", path.display())]
pub struct UntrustedPath {
    /// The file or directory that failed the check.
    pub path: std::path::PathBuf,
    /// What is wrong with it, and what to do.
    pub reason: String,
}

/// Check that `path` and every directory above it are owned by root and not writable by group
/// or others (the check sudo and sshd make before trusting a file). With `sticky_ends`, a
/// root-owned sticky directory (such as /tmp) ends the walk up: what is below it is still
/// checked, what is above is not. Symlinks are resolved first, and the resolved path is
/// returned.
pub fn check_root_owned(
    path: &Path,
    sticky_ends: bool,
) -> Result<std::path::PathBuf, UntrustedPath> {
    use std::os::unix::fs::MetadataExt;
    let real = fs::canonicalize(path).map_err(|e| UntrustedPath {
        path: path.to_path_buf(),
        reason: format!("cannot resolve the path: {e}"),
    })?;
    let mut cur: Option<&Path> = Some(&real);
    let mut first = true;
    while let Some(p) = cur {
        let md = fs::metadata(p).map_err(|e| UntrustedPath {
            path: p.to_path_buf(),
            reason: format!("cannot read its owner and mode: {e}"),
        })?;
        let mode = md.mode();
        if md.uid() != 0 {
            return Err(UntrustedPath {
                path: p.to_path_buf(),
                reason: format!(
                    "owned by uid {}, not root: only root-owned files are trusted here                      (chown root:root it)",
                    md.uid()
                ),
            });
        }
        let sticky = md.is_dir() && mode & 0o1000 != 0;
        if !first && sticky && sticky_ends {
            break;
        }
        if mode & 0o022 != 0 {
            return Err(UntrustedPath {
                path: p.to_path_buf(),
                reason: format!(
                    "writable by group or others (mode {:04o}): chmod go-w it",
                    mode & 0o7777
                ),
            });
        }
        first = false;
        cur = p.parent();
    }
    Ok(real)
}
/// Create `dir` (and parents) with mode 0700 if it does not exist.
pub fn ensure_private_dir(dir: &Path) -> std::io::Result<()> {
    if !dir.exists() {
        fs::create_dir_all(dir)?;
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_write_replaces_and_is_private() {
        let d = tempfile::tempdir().expect("tempdir");
        let p = d.path().join("f");
        write_atomic_private(&p, b"one").expect("write");
        write_atomic_private(&p, b"two").expect("write");
        assert_eq!(fs::read(&p).expect("read"), b"two");
        let mode = fs::metadata(&p).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let leftovers: Vec<_> = fs::read_dir(d.path())
            .expect("dir")
            .filter_map(Result::ok)
            .filter(|e| e.file_name().to_string_lossy().contains(".tmp."))
            .collect();
        assert!(leftovers.is_empty());
    }

    #[test]
    fn root_owned_check_refuses_writable_or_foreign_paths() {
        // Tests run as root (swtpm, SoftHSM and setpriv need it too).
        let d = tempfile::tempdir().expect("tempdir");
        let f = d.path().join("conf");
        fs::write(&f, b"x").expect("write");
        fs::set_permissions(&f, fs::Permissions::from_mode(0o644)).expect("chmod");
        // /tmp is sticky: it ends the walk up for a configuration file...
        assert!(check_root_owned(&f, true).is_ok());
        // ...but not for a module (sudo/sshd rules: every directory up to /).
        let e = check_root_owned(&f, false).expect_err("/tmp is world-writable");
        assert!(e.to_string().contains("writable by group or others"), "{e}");
        fs::set_permissions(&f, fs::Permissions::from_mode(0o664)).expect("chmod");
        let e = check_root_owned(&f, true).expect_err("group-writable file");
        assert!(e.reason.contains("writable by group"), "{e}");
        fs::set_permissions(&f, fs::Permissions::from_mode(0o644)).expect("chmod");
        fs::set_permissions(d.path(), fs::Permissions::from_mode(0o777)).expect("chmod");
        assert!(check_root_owned(&f, true).is_err(), "world-writable parent");
        fs::set_permissions(d.path(), fs::Permissions::from_mode(0o700)).expect("chmod");
        std::os::unix::fs::chown(&f, Some(1000), None).expect("chown");
        let e = check_root_owned(&f, true).expect_err("not root-owned");
        assert!(e.reason.contains("not root"), "{e}");
        // A system library passes the strict check.
        assert!(check_root_owned(Path::new("/usr/lib"), false).is_ok());
    }

    #[test]
    fn lock_serialises_holders() {
        let d = tempfile::tempdir().expect("tempdir");
        let held = DirLock::exclusive(d.path()).expect("lock");
        let second = OpenOptions::new()
            .read(true)
            .open(d.path().join(LOCK_FILE))
            .expect("open");
        assert!(second.try_lock().is_err(), "a second holder got the lock");
        drop(held);
        assert!(second.try_lock().is_ok());
    }
}
