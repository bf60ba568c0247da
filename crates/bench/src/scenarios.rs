//! The measurements. Each takes an [`Endpoint`] (one server), device TLS configs from the
//! [`crate::fleet::Fleet`], and where it samples the server, the server's process id.
//!
//! * [`connects`]: full mTLS connects per second (TCP + TLS 1.3 + CONNECT/CONNACK +
//!   DISCONNECT), or reconnects with TLS session resumption when the configs keep tickets.
//! * [`throughput`]: QoS 1 publish throughput, closed loop, a fixed window of unacknowledged
//!   publishes per connection, with the server's CPU seconds per million acked messages.
//! * [`latency`]: publish-to-PUBACK latency at a fixed offered rate, open loop (each message is
//!   due at its scheduled time and its latency counts from then, so a stalled server cannot
//!   hide its stall: no coordinated omission), recorded in an HDR histogram.
//! * [`idle`]: many connected, idle devices: the server's RSS per connection and CPU at rest.

use std::num::NonZeroU16;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use devid_mqtt::Packet;
use hdrhistogram::Histogram;
use rustls::ClientConfig;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::client::{self, next_packet_id, topic_of, Conn, Endpoint};
use crate::procfs;
use crate::BenchError;

/// A device id and its TLS client config.
pub type DeviceConfig = (String, Arc<ClientConfig>);

/// Warm-up and measurement durations of a timed scenario.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// Load runs this long before the measurement starts.
    pub warmup: Duration,
    /// Length of the measurement window.
    pub measure: Duration,
}

/// Result of [`connects`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ConnectResult {
    /// Completed connect + disconnect cycles per second in the window.
    pub per_sec: f64,
    /// Fraction of those whose TLS handshake resumed a session.
    pub resumed_fraction: f64,
    /// Server CPU milliseconds per connect.
    pub cpu_ms_per_connect: f64,
}

/// Full connect cycles with `concurrency` workers; worker `w` uses devices `w`, `w + c`, ...
/// of `devices` in turn. Configs that keep session tickets make this the resumption scenario.
pub async fn connects(
    ep: Arc<Endpoint>,
    devices: Arc<Vec<DeviceConfig>>,
    concurrency: usize,
    timing: Timing,
    pid: u32,
) -> Result<ConnectResult, BenchError> {
    if devices.len() < concurrency {
        return Err(BenchError::Scenario(format!(
            "{concurrency} workers need at least as many devices"
        )));
    }
    let start = Instant::now();
    let m_start = start + timing.warmup;
    let end = m_start + timing.measure;
    let mut set = JoinSet::new();
    for w in 0..concurrency {
        let ep = ep.clone();
        let devices = devices.clone();
        set.spawn(async move {
            let (mut ok, mut resumed) = (0u64, 0u64);
            let mut j = w;
            while Instant::now() < end {
                let (id, cfg) = &devices[j];
                j += concurrency;
                if j >= devices.len() {
                    j = w;
                }
                let conn = client::connect(&ep, cfg.clone(), id, 60).await?;
                let was_resumed = conn.resumed;
                conn.disconnect().await?;
                let done = Instant::now();
                if done >= m_start && done < end {
                    ok += 1;
                    resumed += u64::from(was_resumed);
                }
            }
            Ok::<_, BenchError>((ok, resumed))
        });
    }
    tokio::time::sleep_until(m_start.into()).await;
    let cpu0 = procfs::cpu_seconds(pid)?;
    tokio::time::sleep_until(end.into()).await;
    let cpu1 = procfs::cpu_seconds(pid)?;
    let (mut ok, mut resumed) = (0u64, 0u64);
    while let Some(r) = set.join_next().await {
        let (o, r) = r.map_err(|e| BenchError::Scenario(format!("connect worker: {e}")))??;
        ok += o;
        resumed += r;
    }
    if ok == 0 {
        return Err(BenchError::Scenario("no connection completed".into()));
    }
    Ok(ConnectResult {
        per_sec: ok as f64 / timing.measure.as_secs_f64(),
        resumed_fraction: resumed as f64 / ok as f64,
        cpu_ms_per_connect: (cpu1 - cpu0) * 1e3 / ok as f64,
    })
}

/// Open one session per device, `concurrency` handshakes at a time.
pub async fn open_all(
    ep: &Arc<Endpoint>,
    devices: &[DeviceConfig],
    concurrency: usize,
    keep_alive: u16,
) -> Result<Vec<Conn>, BenchError> {
    let gate = Arc::new(Semaphore::new(concurrency.max(1)));
    let mut set = JoinSet::new();
    for (i, (id, cfg)) in devices.iter().enumerate() {
        let (ep, gate, id, cfg) = (ep.clone(), gate.clone(), id.clone(), cfg.clone());
        set.spawn(async move {
            let _permit = gate
                .acquire_owned()
                .await
                .map_err(|_| BenchError::Scenario("connect gate closed".into()))?;
            client::connect(&ep, cfg, &id, keep_alive)
                .await
                .map(|c| (i, c))
        });
    }
    let mut conns: Vec<Option<Conn>> = (0..devices.len()).map(|_| None).collect();
    while let Some(r) = set.join_next().await {
        let (i, c) = r.map_err(|e| BenchError::Scenario(format!("connect task: {e}")))??;
        conns[i] = Some(c);
    }
    conns
        .into_iter()
        .collect::<Option<Vec<_>>>()
        .ok_or_else(|| BenchError::Scenario("a session was not opened".into()))
}

/// Result of [`throughput`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ThroughputResult {
    /// Acked QoS 1 messages per second.
    pub msgs_per_sec: f64,
    /// Server CPU seconds per million acked messages.
    pub cpu_s_per_million: f64,
    /// Window actually used per connection (the request, capped by the server's Receive
    /// Maximum).
    pub window: usize,
    /// Server CPU use in the window, cores (CPU seconds per second).
    pub server_cores: f64,
    /// The load generator's own CPU use in the window, cores.
    pub client_cores: f64,
}

struct Shared {
    acked: AtomicU64,
    stop: AtomicBool,
}

async fn publish_loop(
    mut conn: Conn,
    id: String,
    window: usize,
    payload: Bytes,
    shared: Arc<Shared>,
) -> Result<(), BenchError> {
    let topic = topic_of(&id);
    let mut pid = NonZeroU16::MIN;
    let mut inflight = 0usize;
    loop {
        let stopping = shared.stop.load(Ordering::Relaxed);
        if !stopping {
            while inflight < window {
                conn.push_publish(&topic, &payload, pid)?;
                pid = next_packet_id(pid);
                inflight += 1;
            }
            conn.flush().await?;
        } else if inflight == 0 {
            break;
        }
        tokio::time::timeout(Duration::from_secs(30), conn.fill())
            .await
            .map_err(|_| BenchError::Scenario(format!("{id}: no PUBACK for 30 s")))??;
        let mut acked = 0;
        while let Some(p) = conn.decode()? {
            match p {
                Packet::PubAck { reason, .. } if reason < 0x80 => {
                    inflight = inflight.saturating_sub(1);
                    acked += 1;
                }
                Packet::PubAck { reason, .. } => {
                    return Err(BenchError::Scenario(format!(
                        "{id}: PUBACK with failure reason 0x{reason:02x}"
                    )))
                }
                Packet::Disconnect { reason } => {
                    return Err(BenchError::Scenario(format!(
                        "{id}: server sent DISCONNECT 0x{reason:02x}"
                    )))
                }
                _ => {}
            }
        }
        shared.acked.fetch_add(acked, Ordering::Relaxed);
    }
    conn.disconnect().await
}

fn payload_of(len: usize) -> Bytes {
    // Deterministic, not all zeros (no layer can compress it away).
    Bytes::from(
        (0..len)
            .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_be_bytes()[0])
            .collect::<Vec<u8>>(),
    )
}

/// QoS 1 throughput: one connection per device in `devices`, each keeping `window` publishes
/// of `payload_len` bytes unacknowledged.
pub async fn throughput(
    ep: Arc<Endpoint>,
    devices: &[DeviceConfig],
    window: usize,
    payload_len: usize,
    timing: Timing,
    pid: u32,
) -> Result<ThroughputResult, BenchError> {
    let conns = open_all(&ep, devices, 16, 600).await?;
    let shared = Arc::new(Shared {
        acked: AtomicU64::new(0),
        stop: AtomicBool::new(false),
    });
    let payload = payload_of(payload_len);
    let mut used_window = window;
    let mut set = JoinSet::new();
    for (conn, (id, _)) in conns.into_iter().zip(devices) {
        let w = window.min(usize::from(conn.receive_max)).max(1);
        used_window = used_window.min(w);
        set.spawn(publish_loop(
            conn,
            id.clone(),
            w,
            payload.clone(),
            shared.clone(),
        ));
    }
    let watch = async {
        let me = std::process::id();
        tokio::time::sleep(timing.warmup).await;
        let (c0, cpu0, own0, t0) = (
            shared.acked.load(Ordering::Relaxed),
            procfs::cpu_seconds(pid)?,
            procfs::cpu_seconds(me)?,
            Instant::now(),
        );
        tokio::time::sleep(timing.measure).await;
        let (c1, cpu1, own1, t1) = (
            shared.acked.load(Ordering::Relaxed),
            procfs::cpu_seconds(pid)?,
            procfs::cpu_seconds(me)?,
            Instant::now(),
        );
        Ok::<_, BenchError>((c1 - c0, cpu1 - cpu0, own1 - own0, (t1 - t0).as_secs_f64()))
    };
    // A loop that fails early ends the scenario at once.
    let measured = tokio::select! {
        m = watch => m,
        Some(r) = set.join_next() => Err(match r {
            Ok(Err(e)) => e,
            Ok(Ok(())) => BenchError::Scenario("a publisher stopped early".into()),
            Err(e) => BenchError::Scenario(format!("publisher task: {e}")),
        }),
    };
    shared.stop.store(true, Ordering::Relaxed);
    let mut first_err = None;
    while let Some(r) = set.join_next().await {
        let r = r.map_err(|e| BenchError::Scenario(format!("publisher task: {e}")))?;
        if let Err(e) = r {
            first_err.get_or_insert(e);
        }
    }
    let (n, cpu, own, secs) = measured?;
    if let Some(e) = first_err {
        return Err(e);
    }
    if n == 0 {
        return Err(BenchError::Scenario("no message was acked".into()));
    }
    Ok(ThroughputResult {
        msgs_per_sec: n as f64 / secs,
        cpu_s_per_million: cpu / n as f64 * 1e6,
        window: used_window,
        server_cores: cpu / secs,
        client_cores: own / secs,
    })
}

/// Result of [`latency`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LatencyResult {
    /// Offered rate, messages per second.
    pub offered: f64,
    /// Acked messages per second in the window.
    pub achieved: f64,
    /// Median latency, ms.
    pub p50_ms: f64,
    /// 99th percentile, ms.
    pub p99_ms: f64,
    /// 99.9th percentile, ms.
    pub p999_ms: f64,
    /// Highest, ms.
    pub max_ms: f64,
}

/// Open-loop publish-to-ack latency on one connection at `rate` messages per second.
pub async fn latency(
    ep: Arc<Endpoint>,
    device: &DeviceConfig,
    rate: f64,
    payload_len: usize,
    timing: Timing,
) -> Result<LatencyResult, BenchError> {
    if !(rate.is_finite() && rate > 0.0) {
        return Err(BenchError::Scenario(
            "the offered rate must be above 0".into(),
        ));
    }
    let (id, cfg) = device;
    let mut conn = client::connect(&ep, cfg.clone(), id, 600).await?;
    let window = usize::from(conn.receive_max).max(1);
    let topic = topic_of(id);
    let payload = payload_of(payload_len);
    let mut hist = Histogram::<u64>::new_with_bounds(1, 120_000_000, 3)
        .map_err(|e| BenchError::Scenario(format!("histogram: {e}")))?;
    // Scheduled send time (ns since t0) of each packet id in flight.
    let mut due_ns = vec![0u64; 65_536];
    let t0 = Instant::now();
    let m_start = timing.warmup.as_nanos() as u64;
    let end = m_start + timing.measure.as_nanos() as u64;
    let interval_ns = 1e9 / rate;
    let mut next_msg = 0u64;
    let mut pid = NonZeroU16::MIN;
    let mut inflight = 0usize;
    let mut acked_in_window = 0u64;
    let mut tick = tokio::time::interval(Duration::from_micros(250));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let drain_deadline = Duration::from_nanos(end) + Duration::from_secs(30);
    loop {
        let now_ns = t0.elapsed().as_nanos() as u64;
        if now_ns >= end && inflight == 0 {
            break;
        }
        if t0.elapsed() > drain_deadline {
            return Err(BenchError::Scenario(format!(
                "{inflight} messages still unacked 30 s after the end"
            )));
        }
        tokio::select! {
            r = conn.fill() => {
                r?;
                let now_ns = t0.elapsed().as_nanos() as u64;
                while let Some(p) = conn.decode()? {
                    match p {
                        Packet::PubAck { packet_id, reason } if reason < 0x80 => {
                            inflight = inflight.saturating_sub(1);
                            let due = due_ns[usize::from(packet_id.get())];
                            if due >= m_start && due < end {
                                acked_in_window += 1;
                                let us = (now_ns.saturating_sub(due) / 1_000).max(1);
                                hist.record(us.min(120_000_000)).map_err(|e| {
                                    BenchError::Scenario(format!("histogram: {e}"))
                                })?;
                            }
                        }
                        Packet::PubAck { reason, .. } => {
                            return Err(BenchError::Scenario(format!(
                                "PUBACK with failure reason 0x{reason:02x}"
                            )))
                        }
                        Packet::Disconnect { reason } => {
                            return Err(BenchError::Scenario(format!(
                                "server sent DISCONNECT 0x{reason:02x}"
                            )))
                        }
                        _ => {}
                    }
                }
            }
            _ = tick.tick() => {
                let now_ns = t0.elapsed().as_nanos() as u64;
                let mut wrote = false;
                while inflight < window {
                    let due = (next_msg as f64 * interval_ns) as u64;
                    if due > now_ns || due >= end {
                        break;
                    }
                    due_ns[usize::from(pid.get())] = due;
                    conn.push_publish(&topic, &payload, pid)?;
                    pid = next_packet_id(pid);
                    inflight += 1;
                    next_msg += 1;
                    wrote = true;
                }
                if wrote {
                    conn.flush().await?;
                }
            }
        }
    }
    conn.disconnect().await?;
    if hist.is_empty() {
        return Err(BenchError::Scenario("no message was acked".into()));
    }
    let ms = |q: f64| hist.value_at_quantile(q) as f64 / 1e3;
    Ok(LatencyResult {
        offered: rate,
        achieved: acked_in_window as f64 / timing.measure.as_secs_f64(),
        p50_ms: ms(0.5),
        p99_ms: ms(0.99),
        p999_ms: ms(0.999),
        max_ms: hist.max() as f64 / 1e3,
    })
}

/// Result of [`idle`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct IdleResult {
    /// Sessions held open (all of them answered a PINGREQ after the measurement).
    pub connections: usize,
    /// Server RSS before, KiB.
    pub rss_before_kib: u64,
    /// Server RSS with every session open, KiB.
    pub rss_after_kib: u64,
    /// (after - before) / connections, KiB.
    pub kib_per_conn: f64,
    /// Server CPU at rest with every session open, milliseconds per second.
    pub cpu_ms_per_s: f64,
}

/// Open one idle session per device, wait `settle`, then sample the server's RSS and its CPU
/// over `rest`.
pub async fn idle(
    ep: Arc<Endpoint>,
    devices: &[DeviceConfig],
    pid: u32,
    settle: Duration,
    rest: Duration,
) -> Result<IdleResult, BenchError> {
    let rss_before_kib = procfs::rss_kib(pid)?;
    let conns = open_all(&ep, devices, 32, 3_600).await?;
    tokio::time::sleep(settle).await;
    let rss_after_kib = procfs::rss_kib(pid)?;
    let cpu0 = procfs::cpu_seconds(pid)?;
    tokio::time::sleep(rest).await;
    let cpu1 = procfs::cpu_seconds(pid)?;
    // Every session must still be alive: one PINGREQ each.
    let n = conns.len();
    let errors = Arc::new(Mutex::new(Vec::new()));
    let gate = Arc::new(Semaphore::new(256));
    let mut set = JoinSet::new();
    for mut c in conns {
        let (gate, errors) = (gate.clone(), errors.clone());
        set.spawn(async move {
            let Ok(_p) = gate.acquire_owned().await else {
                return;
            };
            let r = async {
                c.send(Packet::PingReq).await?;
                match tokio::time::timeout(Duration::from_secs(30), c.next_packet()).await {
                    Ok(Ok(Packet::PingResp)) => c.disconnect().await,
                    Ok(Ok(p)) => Err(BenchError::Mqtt(format!(
                        "expected PINGRESP, got {}",
                        client::packet_name(&p)
                    ))),
                    Ok(Err(e)) => Err(e),
                    Err(_) => Err(BenchError::Mqtt("no PINGRESP in 30 s".into())),
                }
            }
            .await;
            if let Err(e) = r {
                if let Ok(mut v) = errors.lock() {
                    v.push(e.to_string());
                }
            }
        });
    }
    while set.join_next().await.is_some() {}
    let errors = errors.lock().map(|v| v.clone()).unwrap_or_default();
    if let Some(e) = errors.first() {
        return Err(BenchError::Scenario(format!(
            "{} of {n} idle sessions did not survive: {e}",
            errors.len()
        )));
    }
    Ok(IdleResult {
        connections: n,
        rss_before_kib,
        rss_after_kib,
        kib_per_conn: (rss_after_kib as f64 - rss_before_kib as f64) / n as f64,
        cpu_ms_per_s: (cpu1 - cpu0) * 1e3 / rest.as_secs_f64(),
    })
}
