//! The MQTT accept loop: connection cap, per-source limits, one task per session, and the
//! thread that writes `last_seen` times.

use std::future::Future;
use std::sync::{Arc, Weak};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;

use crate::shared::{Ingest, LAST_SEEN_FLUSH};
use devid_stdx::proxy::{self, Trusted};

use crate::{limits, session};

/// Accept MQTT connections on `listener` until `shutdown` completes, then ask every session
/// to close.
pub async fn serve(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    tel: Arc<Ingest>,
    proxies: Trusted,
    shutdown: impl Future<Output = ()>,
) {
    let proxies = Arc::new(proxies);
    tel.follow_state_changes();
    flush_last_seen_every_second(Arc::downgrade(&tel));
    let acceptor = TlsAcceptor::from(tls);
    let slots = Arc::new(Semaphore::new(tel.settings.max_connections.max(1)));
    tokio::pin!(shutdown);
    loop {
        let (tcp, addr) = tokio::select! {
            _ = &mut shutdown => break,
            r = listener.accept() => match r {
                Ok(v) => v,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "MQTT accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        tel.metrics.tcp_accepted.inc();
        let _ = tcp.set_nodelay(true);
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            tel.metrics.handshake_failed("connection_limit");
            tracing::debug!(%addr, "MQTT connection refused: mqtt.max_connections reached");
            drop(tcp);
            continue;
        };
        let acceptor = acceptor.clone();
        let tel = tel.clone();
        if proxies.contains(addr.ip()) {
            // a load balancer: the device's address is in the PROXY header, read off the
            // accept loop
            tokio::spawn(async move {
                let mut tcp = tcp;
                let deadline = tel.settings.connect_timeout();
                let addr = match tokio::time::timeout(deadline, proxy::read_from(&mut tcp)).await {
                    Ok(Ok(proxy::Header::Proxied(src))) => src,
                    Ok(Ok(_)) => addr,
                    Ok(Err(e)) => {
                        tel.metrics.handshake_failed("proxy_header_invalid");
                        tracing::debug!(%addr, error = %e, "MQTT connection from a trusted proxy without a valid PROXY header");
                        return;
                    }
                    Err(_) => {
                        tel.metrics.handshake_failed("proxy_header_timeout");
                        return;
                    }
                };
                if let Some(slot) = admit(&tel, addr) {
                    session::handle(tcp, addr, acceptor, tel, slot).await;
                }
                drop(permit);
            });
            continue;
        }
        let Some(slot) = admit(&tel, addr) else {
            drop(tcp);
            continue;
        };
        tokio::spawn(async move {
            session::handle(tcp, addr, acceptor, tel, slot).await;
            drop(permit);
        });
    }
    tel.live.close_all();
    if let Ok(Err(e)) = tokio::task::spawn_blocking(move || tel.flush_last_seen()).await {
        tracing::warn!(error = %e, "recording last-seen times at shutdown failed");
    }
    tracing::info!("MQTT listener stopped");
}

/// The per-source limit for a connection from `addr` (the device's address, behind a proxy).
fn admit(tel: &Arc<Ingest>, addr: std::net::SocketAddr) -> Option<limits::SourceSlot> {
    match tel.sources.admit(addr.ip()) {
        Ok(s) => Some(s),
        Err(why) => {
            tel.metrics.handshake_failed(match why {
                limits::SourceRefusal::Rate => "source_rate_limited",
                limits::SourceRefusal::Pending => "source_pending_limit",
            });
            tracing::debug!(%addr, ?why, "MQTT connection refused by the per-source limit");
            None
        }
    }
}

/// A thread that writes the queued `last_seen` times every [`LAST_SEEN_FLUSH`] until the
/// ingest is dropped.
fn flush_last_seen_every_second(tel: Weak<Ingest>) {
    let spawned = std::thread::Builder::new()
        .name("devid-last-seen".into())
        .spawn(move || {
            let mut failing = false;
            loop {
                std::thread::sleep(LAST_SEEN_FLUSH);
                let Some(t) = tel.upgrade() else { return };
                // one line when writing starts to fail and one when it works again
                match t.flush_last_seen() {
                    Err(e) if !failing => {
                        tracing::warn!(error = %e, "recording last-seen times failed; retrying");
                        failing = true;
                    }
                    Ok(()) if failing => {
                        tracing::info!("recording last-seen times works again");
                        failing = false;
                    }
                    _ => {}
                }
            }
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "cannot start the last-seen writer; last_seen stays as enrolled");
    }
}
