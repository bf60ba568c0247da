//! The only `unsafe` code in devid: thin wrappers over libc calls that have no safe std API.
#![allow(unsafe_code)]

use std::io;

pub(crate) fn set_core_limit_zero() -> io::Result<()> {
    let lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is a valid, initialised rlimit that lives for the duration of the call;
    // setrlimit only reads it.
    let rc = unsafe { libc::setrlimit(libc::RLIMIT_CORE, &lim) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

pub(crate) fn core_limit() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is a valid, writable rlimit owned by this frame; getrlimit writes only it.
    let rc = unsafe { libc::getrlimit(libc::RLIMIT_CORE, &mut lim) };
    if rc == 0 {
        lim.rlim_cur
    } else {
        u64::MAX
    }
}

pub(crate) fn set_non_dumpable() -> io::Result<()> {
    // SAFETY: PR_SET_DUMPABLE takes one integer argument and touches no memory of ours.
    let rc = unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0 as libc::c_ulong, 0, 0, 0) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

pub(crate) fn is_dumpable() -> bool {
    // SAFETY: PR_GET_DUMPABLE takes no pointer arguments and returns the flag.
    let rc = unsafe { libc::prctl(libc::PR_GET_DUMPABLE, 0, 0, 0, 0) };
    rc != 0
}

/// Lock the pages behind `buf` into RAM. Returns false when the kernel refused.
pub(crate) fn lock(buf: &[u8]) -> bool {
    if buf.is_empty() {
        return false;
    }
    // SAFETY: the pointer and length describe memory owned by `buf`, valid for the call;
    // mlock does not read or write it, it only pins the pages.
    unsafe { libc::mlock(buf.as_ptr().cast(), buf.len()) == 0 }
}

/// Undo [`lock`].
pub(crate) fn unlock(buf: &[u8]) {
    if buf.is_empty() {
        return;
    }
    // SAFETY: as for `lock`; the range was locked by `lock` and is still owned by the caller.
    unsafe {
        libc::munlock(buf.as_ptr().cast(), buf.len());
    }
}

/// The supplementary groups of the peer of the connected Unix socket `fd`, as the kernel
/// recorded them at `connect` (`SO_PEERGROUPS`, Linux 4.13+). Needs no `/proc`, so it works
/// under systemd's `ProtectProc=invisible` and cannot race with PID reuse.
pub(crate) fn peer_groups(fd: std::os::fd::BorrowedFd<'_>) -> io::Result<Vec<u32>> {
    use std::os::fd::AsRawFd;
    const GID: usize = std::mem::size_of::<libc::gid_t>();
    let mut groups: Vec<libc::gid_t> = vec![0; 64];
    for _ in 0..4 {
        let mut len = libc::socklen_t::try_from(groups.len() * GID)
            .map_err(|_| io::Error::other("too many peer groups"))?;
        // SAFETY: `groups` is an owned, initialised buffer of `len` bytes that outlives the
        // call; the kernel writes at most `len` bytes into it and stores the length it needs
        // (or wrote) into `len`, which is a valid, writable socklen_t. `fd` is a borrowed,
        // open descriptor.
        let rc = unsafe {
            libc::getsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_PEERGROUPS,
                groups.as_mut_ptr().cast(),
                &mut len,
            )
        };
        let needed = len as usize / GID;
        if rc == 0 {
            groups.truncate(needed.min(groups.len()));
            return Ok(groups);
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ERANGE) && needed > groups.len() {
            groups.resize(needed, 0);
            continue;
        }
        return Err(e);
    }
    Err(io::Error::other("the peer's group list kept growing"))
}
