//! Process hardening and locked secret memory for devid.
//!
//! This is the one crate of the workspace that contains `unsafe` code, and all of it sits in
//! the private [`sys`] module: a handful of libc calls (`prctl`, `setrlimit`, `mlock`), each
//! with a `// SAFETY:` comment. Everything else is safe Rust.
//!
//! * [`harden_process`] makes the process non-dumpable and sets `RLIMIT_CORE` to zero. Every
//!   devid binary calls it before it unseals anything (THREATS.md T7).
//! * [`SecretBytes`] is a fixed-size buffer that is `mlock`ed (so it is not written to swap),
//!   zeroized on drop and never printed by `Debug`.

use std::fmt;

use zeroize::Zeroize;

mod sys;

/// Errors from hardening the process.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HardenError {
    /// `prctl(PR_SET_DUMPABLE, 0)` failed.
    #[error("could not make the process non-dumpable: {0}")]
    Dumpable(std::io::Error),
    /// `setrlimit(RLIMIT_CORE, 0)` failed.
    #[error("could not disable core files: {0}")]
    CoreLimit(std::io::Error),
}

/// What the kernel reports about this process's exposure to memory dumps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hygiene {
    /// `prctl(PR_GET_DUMPABLE)`: false once [`harden_process`] ran.
    pub dumpable: bool,
    /// Soft `RLIMIT_CORE` in bytes: 0 once [`harden_process`] ran.
    pub core_limit: u64,
}

/// Disable core dumps and make the process non-dumpable (no core file, no `ptrace` attach by
/// unprivileged users, `/proc/PID/mem` closed to other users).
pub fn harden_process() -> Result<(), HardenError> {
    sys::set_core_limit_zero().map_err(HardenError::CoreLimit)?;
    sys::set_non_dumpable().map_err(HardenError::Dumpable)?;
    Ok(())
}

/// Read back what [`harden_process`] set, as the kernel sees it.
pub fn hygiene() -> Hygiene {
    Hygiene {
        dumpable: sys::is_dumpable(),
        core_limit: sys::core_limit(),
    }
}

/// A secret byte string held in locked, zeroize-on-drop memory.
///
/// The buffer is allocated once at its final size so it is never reallocated (a reallocation
/// would leave an unzeroized copy behind). Locking is best effort: where `RLIMIT_MEMLOCK`
/// forbids it, [`SecretBytes::is_locked`] says so and the bytes are still zeroized on drop.
pub struct SecretBytes {
    buf: Box<[u8]>,
    locked: bool,
}

impl SecretBytes {
    /// Copy `bytes` into a new locked buffer. The caller remains responsible for its own copy.
    pub fn from_slice(bytes: &[u8]) -> Self {
        let mut buf = vec![0u8; bytes.len()].into_boxed_slice();
        let locked = sys::lock(&buf);
        buf.copy_from_slice(bytes);
        Self { buf, locked }
    }

    /// Move the contents of `v` into a locked buffer and zeroize `v`.
    pub fn from_vec(mut v: Vec<u8>) -> Self {
        let s = Self::from_slice(&v);
        v.zeroize();
        s
    }

    /// A zero-filled locked buffer of `len` bytes, to be filled in place.
    pub fn zeroed(len: usize) -> Self {
        let buf = vec![0u8; len].into_boxed_slice();
        let locked = sys::lock(&buf);
        Self { buf, locked }
    }

    /// The secret bytes. Keep the borrow short and never log it.
    pub fn expose(&self) -> &[u8] {
        &self.buf
    }

    /// Mutable access, for filling a buffer made with [`SecretBytes::zeroed`].
    pub fn expose_mut(&mut self) -> &mut [u8] {
        &mut self.buf
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.buf.len()
    }

    /// True when the buffer holds no bytes.
    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// True when the pages holding the secret are locked in RAM.
    pub fn is_locked(&self) -> bool {
        self.locked
    }
}

impl Clone for SecretBytes {
    fn clone(&self) -> Self {
        Self::from_slice(&self.buf)
    }
}

impl Drop for SecretBytes {
    fn drop(&mut self) {
        self.buf.zeroize();
        if self.locked {
            sys::unlock(&self.buf);
        }
    }
}

impl fmt::Debug for SecretBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretBytes([redacted; {} bytes])", self.buf.len())
    }
}

impl PartialEq for SecretBytes {
    /// Constant-time in the length of the buffers.
    fn eq(&self, other: &Self) -> bool {
        if self.buf.len() != other.buf.len() {
            return false;
        }
        self.buf
            .iter()
            .zip(other.buf.iter())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
    }
}

impl Eq for SecretBytes {}

/// The supplementary groups of the peer of a connected Unix socket (`SO_PEERGROUPS`): read
/// from the socket, not from `/proc`, so the check works under `ProtectProc=invisible` and
/// does not race with PID reuse.
pub fn socket_peer_groups(fd: std::os::fd::BorrowedFd<'_>) -> std::io::Result<Vec<u32>> {
    sys::peer_groups(fd)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_prints_the_secret() {
        let s = SecretBytes::from_slice(b"hunter2-secret");
        let shown = format!("{s:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("14 bytes"));
    }

    #[test]
    fn from_vec_keeps_the_bytes() {
        let s = SecretBytes::from_vec(b"abc".to_vec());
        assert_eq!(s.expose(), b"abc");
        assert_eq!(s, SecretBytes::from_slice(b"abc"));
        assert_ne!(s, SecretBytes::from_slice(b"abd"));
    }

    #[test]
    fn hardening_is_visible_to_the_kernel() {
        harden_process().expect("harden");
        let h = hygiene();
        assert!(!h.dumpable);
        assert_eq!(h.core_limit, 0);
        let limits = std::fs::read_to_string("/proc/self/limits").expect("limits");
        let core = limits
            .lines()
            .find(|l| l.starts_with("Max core file size"))
            .expect("core line");
        assert!(core.split_whitespace().nth(4) == Some("0"), "{core}");
    }
}
