//! The console's login sessions: in memory, per node, keyed by the SHA-256 of the cookie.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::http::{header, HeaderMap};
use devid_store::token;

/// The session cookie's name (`__Host-`: Secure, no Domain, Path=/ enforced by browsers).
pub const COOKIE: &str = "__Host-devid_console";
/// A session unused this long ends.
pub const IDLE: Duration = Duration::from_secs(15 * 60);
/// No session lasts longer than this.
pub const ABSOLUTE: Duration = Duration::from_secs(8 * 3600);
/// At most this many sessions at once (the oldest goes first).
const MAX_SESSIONS: usize = 10_000;

/// One login.
#[derive(Debug, Clone)]
pub(crate) struct Session {
    /// SHA-256 of the credential's bearer token (looked up again at every request).
    pub(crate) credential_hash: String,
    pub(crate) csrf: String,
    created: Instant,
    last: Instant,
}

/// The console's sessions, in memory: per node, gone at restart. Keyed by the SHA-256 of the
/// cookie value, so the table holds no usable cookie.
#[derive(Debug, Default)]
pub struct Sessions {
    map: Mutex<HashMap<String, Session>>,
}

impl Sessions {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Session>> {
        match self.map.lock() {
            Ok(m) => m,
            Err(p) => p.into_inner(),
        }
    }

    /// A new session for the credential whose token hashes to `credential_hash`: returns
    /// (cookie value, CSRF token).
    pub(crate) fn create(&self, credential_hash: String) -> (String, String) {
        let id = token::generate().to_string();
        let csrf = token::generate().to_string();
        let now = Instant::now();
        let mut map = self.lock();
        map.retain(|_, s| alive(s, now));
        if map.len() >= MAX_SESSIONS {
            if let Some(oldest) = map
                .iter()
                .min_by_key(|(_, s)| s.created)
                .map(|(k, _)| k.clone())
            {
                map.remove(&oldest);
            }
        }
        map.insert(
            token::hash(&id),
            Session {
                credential_hash,
                csrf: csrf.clone(),
                created: now,
                last: now,
            },
        );
        (id, csrf)
    }

    /// The live session of this cookie value (its idle time restarts).
    pub(crate) fn touch(&self, cookie: &str) -> Option<Session> {
        let key = token::hash(cookie);
        let now = Instant::now();
        let mut map = self.lock();
        match map.get_mut(&key) {
            Some(s) if alive(s, now) => {
                s.last = now;
                Some(s.clone())
            }
            Some(_) => {
                map.remove(&key);
                None
            }
            None => None,
        }
    }

    /// Whether this cookie's session is alive, without restarting its idle time (the live
    /// stream asks this; an open stream is not activity).
    pub(crate) fn is_alive(&self, cookie: &str) -> bool {
        let now = Instant::now();
        self.lock()
            .get(&token::hash(cookie))
            .is_some_and(|s| alive(s, now))
    }

    pub(crate) fn remove(&self, cookie: &str) {
        self.lock().remove(&token::hash(cookie));
    }

    /// Sessions now alive.
    pub fn len(&self) -> usize {
        let now = Instant::now();
        self.lock().values().filter(|s| alive(s, now)).count()
    }

    /// Whether no session is alive.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn alive(s: &Session, now: Instant) -> bool {
    now.duration_since(s.last) < IDLE && now.duration_since(s.created) < ABSOLUTE
}

/// Equal in constant time (for CSRF tokens).
pub(crate) fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The session cookie's value in a request.
pub(crate) fn cookie_value(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == COOKIE)
        .map(|(_, v)| v.trim().to_owned())
        .filter(|v| token::well_formed(v))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sessions_expire_and_are_keyed_by_hash() {
        let s = Sessions::default();
        let (cookie, csrf) = s.create("h".into());
        assert!(token::well_formed(&cookie));
        assert_ne!(cookie, csrf);
        assert!(s.touch(&cookie).is_some());
        assert!(
            !s.lock().contains_key(&cookie),
            "the table holds no cookie value"
        );
        {
            let mut m = s.lock();
            let e = m
                .get_mut(&token::hash(&cookie))
                .unwrap_or_else(|| panic!("session"));
            e.last = Instant::now()
                .checked_sub(IDLE)
                .unwrap_or_else(Instant::now);
        }
        assert!(s.touch(&cookie).is_none(), "idle session ended");
        let (c2, _) = s.create("h".into());
        {
            let mut m = s.lock();
            let e = m
                .get_mut(&token::hash(&c2))
                .unwrap_or_else(|| panic!("session"));
            e.created = Instant::now()
                .checked_sub(ABSOLUTE)
                .unwrap_or_else(Instant::now);
        }
        assert!(s.touch(&c2).is_none(), "absolute lifetime ended");
    }
}
