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
