//! Small helpers the server crates share that know nothing of devid's domain (like
//! rust-analyzer's `stdx`): private files ([`fs`]), time stamps ([`time`]), rate limits
//! ([`limit`]) and the PROXY protocol v2 header ([`proxy`]).
//!
//! Invariant: depends on no devid crate.
#![forbid(unsafe_code)]

pub mod fs;
pub mod limit;
pub mod proxy;
pub mod time;

pub use time::{now_ms, rfc3339};

/// Lock a mutex, taking the data of a poisoned one: the data the server guards with plain
/// mutexes (queues, maps of live sessions, counters) stays consistent at every await point,
/// so a panic elsewhere must not take the whole process down with it.
pub fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}
