//! The HTTPS listener: the TLS config the composition root built (client certificates
//! OPTIONAL, verified against the fleet CA when presented, so enrolment works without one and
//! renewal gets one), handshake and header timeouts, a connection cap, and the peer's address
//! and certificate chain handed to the router as [`PeerInfo`]. A connection with no request in
//! flight for `https.idle_timeout_secs` is closed (HTTP/1 and HTTP/2 alike: a response body
//! still streaming, such as the SSE stream, counts as in flight), and HTTP/2 peers are PINGed
//! every `https.h2_keepalive_secs`, so idle or dead connections cannot hold the connection cap.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;
use tower::ServiceExt;

use devid_stdx::proxy::{self, Trusted};

use crate::router::{surface_app, Surface};
use crate::state::{HttpState, PeerInfo};

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// Serve HTTPS on `listener` until `shutdown` completes.
pub async fn serve(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    state: HttpState,
    surface: Surface,
    shutdown: impl Future<Output = ()>,
) {
    let max = state.config.max_connections.max(1);
    let timeouts = Timeouts {
        idle: Duration::from_secs(state.config.https.idle_timeout_secs.max(1)),
        h2_keepalive: Duration::from_secs(state.config.https.h2_keepalive_secs.max(1)),
    };
    // PROXY protocol v2 from the configured load balancers, on the public listener only
    let proxies = match surface {
        Surface::Admin => None,
        _ => Trusted::parse(&state.config.proxy_protocol.trusted)
            .ok()
            .filter(|t| !t.is_empty())
            .map(Arc::new),
    };
    let router = surface_app(state, surface);
    let acceptor = TlsAcceptor::from(tls);
    let slots = Arc::new(Semaphore::new(max));
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            _ = &mut shutdown => break,
            p = slots.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let (tcp, addr) = tokio::select! {
            _ = &mut shutdown => break,
            r = listener.accept() => match r {
                Ok(v) => v,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let acceptor = acceptor.clone();
        let router = router.clone();
        let proxies = proxies.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let mut tcp = tcp;
            let addr = match proxies {
                Some(p) if p.contains(addr.ip()) => {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, proxy::read_from(&mut tcp)).await
                    {
                        Ok(Ok(proxy::Header::Proxied(src))) => src,
                        Ok(Ok(_)) => addr,
                        Ok(Err(e)) => {
                            tracing::debug!(%addr, error = %e, "HTTPS connection from a trusted proxy without a valid PROXY header");
                            return;
                        }
                        Err(_) => return,
                    }
                }
                _ => addr,
            };
            handle(tcp, addr, acceptor, router, timeouts).await;
        });
    }
    tracing::info!(?surface, "HTTPS listener stopped");
}

/// How long an idle connection that was told to close may take to do so.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// Per-connection timers.
#[derive(Debug, Clone, Copy)]
struct Timeouts {
    /// No request in flight and none started for this long: close (HTTP/1 and HTTP/2).
    idle: Duration,
    /// HTTP/2 PING interval (and how long an answer may take).
    h2_keepalive: Duration,
}

/// What a connection is doing: requests in flight (until their response body is finished or
/// dropped, so a live SSE stream counts) and when the last one started or ended.
#[derive(Debug)]
struct Activity {
    in_flight: AtomicUsize,
    since: Mutex<Instant>,
}

impl Activity {
    fn new() -> Arc<Self> {
        Arc::new(Self {
            in_flight: AtomicUsize::new(0),
            since: Mutex::new(Instant::now()),
        })
    }

    fn start(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        *devid_stdx::lock(&self.since) = Instant::now();
        InFlight(self.clone())
    }

    /// Idle for at least `d`: nothing in flight, nothing started or ended within `d`.
    fn idle_for(&self, d: Duration) -> bool {
        self.in_flight.load(Ordering::Acquire) == 0 && devid_stdx::lock(&self.since).elapsed() >= d
    }
}

/// One request in flight; ends when dropped (with its response body).
#[derive(Debug)]
struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        *devid_stdx::lock(&self.0.since) = Instant::now();
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A response body that holds its request's [`InFlight`] until it is finished or dropped.
struct Tracked {
    inner: axum::body::Body,
    _flight: InFlight,
}

impl http_body::Body for Tracked {
    type Data = axum::body::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        std::pin::Pin::new(&mut self.get_mut().inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

async fn handle(
    tcp: tokio::net::TcpStream,
    addr: SocketAddr,
    acceptor: TlsAcceptor,
    router: Router,
    timeouts: Timeouts,
) {
    let _ = tcp.set_nodelay(true);
    let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            tracing::debug!(%addr, error = %e, "TLS handshake failed");
            return;
        }
        Err(_) => {
            tracing::debug!(%addr, "TLS handshake timed out");
            return;
        }
    };
    let peer = PeerInfo {
        addr: Some(addr),
        client_chain: tls
            .get_ref()
            .1
            .peer_certificates()
            .map(|c| Arc::new(c.iter().map(|d| d.clone().into_owned()).collect())),
    };
    let activity = Activity::new();
    let service = {
        let activity = activity.clone();
        hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
            let flight = activity.start();
            let mut req = req.map(axum::body::Body::new);
            req.extensions_mut().insert(peer.clone());
            let router = router.clone();
            async move {
                let resp = router.oneshot(req).await.into_response_infallible();
                Ok::<_, Infallible>(resp.map(|inner| Tracked {
                    inner,
                    _flight: flight,
                }))
            }
        })
    };
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(Some(timeouts.h2_keepalive))
        .keep_alive_timeout(timeouts.h2_keepalive);
    let conn = builder.serve_connection(TokioIo::new(tls), service);
    tokio::pin!(conn);
    // Idle connections give their slot back: checked a few times per idle period.
    let mut tick = tokio::time::interval((timeouts.idle / 4).max(Duration::from_millis(100)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut closing: Option<Instant> = None;
    loop {
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!(%addr, error = %e, "connection ended with an error");
                }
                return;
            }
            _ = tick.tick() => match closing {
                None if activity.idle_for(timeouts.idle) => {
                    tracing::debug!(%addr, "closing an idle HTTPS connection");
                    conn.as_mut().graceful_shutdown();
                    closing = Some(Instant::now());
                }
                // GOAWAY sent; a peer that does not take part in the close (no PING answer,
                // no FIN) loses the connection anyway
                Some(since) if since.elapsed() >= CLOSE_GRACE => return,
                _ => {}
            }
        }
    }
}

trait IntoResponseInfallible {
    fn into_response_infallible(self) -> axum::response::Response;
}

impl IntoResponseInfallible for Result<axum::response::Response, Infallible> {
    fn into_response_infallible(self) -> axum::response::Response {
        match self {
            Ok(r) => r,
            Err(never) => match never {},
        }
    }
}
