//! The table of live MQTT sessions: device id -> a handle that closes the session. The admin
//! state-change path ([`LiveConnections::on_state_change`]) uses it to cut a suspended or
//! revoked device at once; a new session of the same device takes over the old one.
//!
//! Race-free ordering: a session registers here BEFORE it reads the registry. A state change
//! commits and THEN notifies. So either the session's read sees the new state, or the
//! notification finds the registered session.
//!
//! Several nodes sharing one PostgreSQL: a state change is published with
//! `NOTIFY devid_device_state, '<id> <state>'` in the same transaction, and every node's
//! listener (`Store::follow_state_changes`) calls [`LiveConnections::on_state_change`]. The
//! same ordering argument holds across nodes while the listener's `LISTEN` is established
//! (the notice is delivered after the commit). Each time it (re)establishes it, the listener
//! hands over every device that is not active, which covers what was committed while it was
//! not listening. A dead connection is noticed by a probe every 30 s; until the listener is
//! back, the periodic registry re-check (`mqtt.registry_recheck_secs`) bounds how long a
//! session outlives a revocation.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

use devid_proto::DeviceState;
use tokio::sync::Notify;

/// Why a session is told to close.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum CloseReason {
    /// Not set.
    None = 0,
    /// The device was suspended.
    Suspended = 1,
    /// The device was revoked.
    Revoked = 2,
    /// A newer session of the same device took over.
    TakenOver = 3,
    /// The server is shutting down.
    Shutdown = 4,
}

impl CloseReason {
    fn from_u8(v: u8) -> Self {
        match v {
            1 => CloseReason::Suspended,
            2 => CloseReason::Revoked,
            3 => CloseReason::TakenOver,
            4 => CloseReason::Shutdown,
            _ => CloseReason::None,
        }
    }

    /// Stable code for logs, metrics and audit.
    pub fn code(self) -> &'static str {
        match self {
            CloseReason::None => "none",
            CloseReason::Suspended => "device_suspended",
            CloseReason::Revoked => "device_revoked",
            CloseReason::TakenOver => "session_taken_over",
            CloseReason::Shutdown => "server_shutdown",
        }
    }
}

/// Closes one session.
#[derive(Debug, Default)]
pub struct SessionHandle {
    notify: Notify,
    reason: AtomicU8,
}

impl SessionHandle {
    /// Ask the session to close (it sends MQTT 5 DISCONNECT with a reason, then closes).
    /// The first reason given stands, except that a revocation replaces any other; returns
    /// whether this call set the reason (a repeated notice of the same change does not).
    pub fn close(&self, reason: CloseReason) -> bool {
        let set = self
            .reason
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |cur| {
                let replace = cur == CloseReason::None as u8
                    || (reason == CloseReason::Revoked && cur != CloseReason::Revoked as u8);
                replace.then_some(reason as u8)
            })
            .is_ok();
        // notify_one stores a permit when the session is not waiting right now.
        self.notify.notify_one();
        set
    }

    /// Wait until asked to close.
    pub async fn closed(&self) -> CloseReason {
        self.notify.notified().await;
        self.reason()
    }

    /// The reason given, if any.
    pub fn reason(&self) -> CloseReason {
        CloseReason::from_u8(self.reason.load(Ordering::SeqCst))
    }
}

#[derive(Debug)]
struct Entry {
    conn: u64,
    handle: Arc<SessionHandle>,
}

/// Device id -> live session.
#[derive(Debug, Default)]
pub struct LiveConnections {
    map: Mutex<HashMap<String, Entry>>,
    next: AtomicU64,
}

/// Removes its session from the table when dropped (only if it is still the current one).
#[derive(Debug)]
pub struct LiveGuard {
    table: Arc<LiveConnections>,
    device: String,
    conn: u64,
    /// The session's handle.
    pub handle: Arc<SessionHandle>,
}

impl Drop for LiveGuard {
    fn drop(&mut self) {
        let mut map = match self.table.map.lock() {
            Ok(m) => m,
            Err(p) => p.into_inner(),
        };
        if map.get(&self.device).map(|e| e.conn) == Some(self.conn) {
            map.remove(&self.device);
        }
    }
}

impl LiveConnections {
    /// An empty table.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Register a new session of `device`; an older session of the same device is told to
    /// close (taken over).
    pub fn register(self: &Arc<Self>, device: &str) -> LiveGuard {
        let conn = self.next.fetch_add(1, Ordering::Relaxed);
        let handle = Arc::new(SessionHandle::default());
        let old = {
            let mut map = match self.map.lock() {
                Ok(m) => m,
                Err(p) => p.into_inner(),
            };
            map.insert(
                device.to_owned(),
                Entry {
                    conn,
                    handle: handle.clone(),
                },
            )
        };
        if let Some(old) = old {
            old.handle.close(CloseReason::TakenOver);
        }
        LiveGuard {
            table: self.clone(),
            device: device.to_owned(),
            conn,
            handle,
        }
    }

    /// Called after a registry state change is committed: a device that is no longer active
    /// loses its session now. Returns whether a session was told to close by this call (a
    /// repeated notice of the same change, e.g. the node's own one coming back from
    /// PostgreSQL, returns false).
    pub fn on_state_change(&self, device: &str, state: DeviceState) -> bool {
        let reason = match state {
            DeviceState::Active => return false,
            DeviceState::Suspended => CloseReason::Suspended,
            DeviceState::Revoked => CloseReason::Revoked,
        };
        let map = match self.map.lock() {
            Ok(m) => m,
            Err(p) => p.into_inner(),
        };
        map.get(device).is_some_and(|e| e.handle.close(reason))
    }

    /// Tell every session to close (shutdown).
    pub fn close_all(&self) {
        let map = match self.map.lock() {
            Ok(m) => m,
            Err(p) => p.into_inner(),
        };
        for e in map.values() {
            e.handle.close(CloseReason::Shutdown);
        }
    }

    /// Number of live sessions.
    pub fn len(&self) -> usize {
        self.map.lock().map(|m| m.len()).unwrap_or(0)
    }

    /// Whether `device` has a live session (a session registers before its registry read,
    /// so a CONNECT about to be refused shows here for that moment).
    pub fn contains(&self, device: &str) -> bool {
        self.map
            .lock()
            .map(|m| m.contains_key(device))
            .unwrap_or(false)
    }

    /// Whether no session is live.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn takeover_revocation_and_cleanup() {
        let t = LiveConnections::new();
        let a = t.register("dev");
        let b = t.register("dev");
        assert_eq!(a.handle.closed().await, CloseReason::TakenOver);
        drop(a); // must not remove b's entry
        assert_eq!(t.len(), 1);
        assert!(!t.on_state_change("dev", DeviceState::Active));
        assert!(t.on_state_change("dev", DeviceState::Suspended));
        // the same change noticed again (a node's own NOTIFY) closes nothing new
        assert!(!t.on_state_change("dev", DeviceState::Suspended));
        // a revocation right behind it still counts and is the reason the session gets
        assert!(t.on_state_change("dev", DeviceState::Revoked));
        assert!(!t.on_state_change("dev", DeviceState::Revoked));
        assert_eq!(b.handle.closed().await, CloseReason::Revoked);
        drop(b);
        assert!(t.is_empty());
        assert!(!t.on_state_change("dev", DeviceState::Suspended));
    }
}
