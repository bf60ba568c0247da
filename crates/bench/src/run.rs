//! One benchmark run, end to end: start both servers, enrol the fleet, run every scenario on
//! both servers alternately, and build the [`Report`].

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use devid_admin_client::AdminClient;
use devid_mqtt::Protocol;

use crate::client::{self, Endpoint};
use crate::crypto;
use crate::fleet::Fleet;
use crate::procfs::{self, Machine};
use crate::report::{Better, Cell, Report, Row, Target};
use crate::scenarios::{self, DeviceConfig, Timing};
use crate::servers::{self, DevidServer, Kind, Mosquitto};
use crate::BenchError;

/// What to run.
#[derive(Debug, Clone)]
pub struct Options {
    /// The `devid-server` binary.
    pub devid_server: PathBuf,
    /// Where `benchmarks.md` and the SVGs go.
    pub out_dir: PathBuf,
    /// Short CI mode.
    pub quick: bool,
    /// Runs per scenario and server.
    pub runs: usize,
    /// Warm-up before each timed measurement.
    pub warmup: Duration,
    /// Timed measurement window.
    pub measure: Duration,
    /// Idle-connection counts (10,000 and 50,000 in a full run).
    pub idle_sizes: Vec<usize>,
    /// Devices cycled through by the connect scenarios.
    pub connect_pool: usize,
    /// Enrolment concurrency.
    pub enrol_concurrency: usize,
    /// Source addresses 127.0.0.2.. used by the load generator.
    pub sources: u8,
    /// CPU-at-rest window of the idle scenario.
    pub rest: Duration,
    /// Wait after the last idle session opened, before sampling RSS.
    pub settle: Duration,
    /// Time per operation kind for the crypto bound.
    pub crypto_budget: Duration,
    /// The command line, for the report.
    pub command: String,
    /// Only these scenario ids (or prefixes: "3" = every publish case); empty = all.
    pub only: Vec<String>,
}

impl Options {
    /// Whether scenario `id` (e.g. "3a", "5c") is to run.
    pub fn wants(&self, id: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|o| id.starts_with(o.as_str()))
    }

    /// The full benchmark: 3 runs, 10 s windows, 10,000 and 50,000 idle devices.
    pub fn full(devid_server: PathBuf, out_dir: PathBuf) -> Options {
        Options {
            devid_server,
            out_dir,
            quick: false,
            runs: 3,
            warmup: Duration::from_secs(1),
            measure: Duration::from_secs(10),
            idle_sizes: vec![10_000, 50_000],
            connect_pool: 1_024,
            enrol_concurrency: 8,
            sources: 32,
            rest: Duration::from_secs(10),
            settle: Duration::from_secs(2),
            crypto_budget: Duration::from_secs(1),
            command: "devid-bench".into(),
            only: Vec::new(),
        }
    }

    /// The CI smoke run: one run, about a second per scenario, 500 idle devices.
    pub fn quick(devid_server: PathBuf, out_dir: PathBuf) -> Options {
        Options {
            quick: true,
            runs: 1,
            warmup: Duration::from_millis(150),
            measure: Duration::from_millis(750),
            idle_sizes: vec![500],
            connect_pool: 64,
            enrol_concurrency: 8,
            sources: 8,
            rest: Duration::from_secs(1),
            settle: Duration::from_millis(500),
            crypto_budget: Duration::from_millis(150),
            command: "devid-bench --quick".into(),
            ..Options::full(devid_server, out_dir)
        }
    }
}

/// Publish scenarios: (row id, connections, window, payload bytes, protocol).
const PUBLISH_CASES: [(&str, usize, usize, usize, Protocol); 5] = [
    ("3a", 1, 100, 64, Protocol::V5),
    ("3b", 1, 100, 1024, Protocol::V5),
    ("3c", 100, 10, 64, Protocol::V5),
    ("3d", 100, 10, 1024, Protocol::V5),
    ("3e", 1, 100, 64, Protocol::V311),
];

fn payload_name(n: usize) -> String {
    if n >= 1024 {
        format!("{} KiB", n / 1024)
    } else {
        format!("{n} B")
    }
}

fn date_utc() -> String {
    std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown date".into())
}

struct Bench {
    opts: Options,
    rt: tokio::runtime::Runtime,
    devid: DevidServer,
    mosq: Mosquitto,
    fleet: Fleet,
    timing: Timing,
}

impl Bench {
    fn endpoint(&self, kind: Kind, protocol: Protocol) -> Arc<Endpoint> {
        let addr = match kind {
            Kind::Devid => self.devid.mqtt_addr(),
            Kind::Mosquitto => self.mosq.addr(),
        };
        Endpoint::new(addr, protocol, self.opts.sources)
    }

    fn pid(&self, kind: Kind) -> Result<u32, BenchError> {
        match kind {
            Kind::Devid => self.devid.pid(),
            Kind::Mosquitto => self.mosq.pid(),
        }
        .ok_or_else(|| BenchError::Server(format!("{} is not running", kind.name())))
    }

    fn restart(&mut self, kind: Kind) -> Result<(), BenchError> {
        match kind {
            Kind::Devid => self.devid.start(),
            Kind::Mosquitto => self.mosq.start(),
        }
    }

    /// Before a devid run that stores messages: no messages from earlier runs (Mosquitto
    /// stores none). Then a pause for the restarted server's start-up writes (the first
    /// zero-filled log segments) to finish before the warm-up.
    fn fresh(&mut self, kind: Kind) -> Result<(), BenchError> {
        match kind {
            Kind::Devid => {
                self.devid.reset()?;
                std::thread::sleep(if self.opts.quick {
                    Duration::from_millis(200)
                } else {
                    Duration::from_secs(2)
                });
                Ok(())
            }
            Kind::Mosquitto => Ok(()),
        }
    }

    fn configs(&self, n: usize, resume: bool) -> Result<Vec<DeviceConfig>, BenchError> {
        self.fleet.configs(0..n, resume)
    }

    /// Run `f` for every run and both servers, alternating, recording into `cells`.
    fn ab<T>(
        &mut self,
        what: &str,
        mut f: impl FnMut(&mut Bench, Kind) -> Result<T, BenchError>,
        mut record: impl FnMut(Kind, Result<&T, String>),
    ) {
        for run in 0..self.opts.runs {
            for kind in Kind::ALL {
                let r = f(self, kind);
                match &r {
                    Ok(_) => tracing::info!(scenario = what, run, server = kind.name(), "done"),
                    Err(e) => tracing::warn!(
                        scenario = what,
                        run,
                        server = kind.name(),
                        error = %e,
                        "failed"
                    ),
                }
                record(kind, r.as_ref().map_err(|e| e.to_string()));
                // Let the server close the last sessions before the other one starts.
                std::thread::sleep(if self.opts.quick {
                    Duration::from_millis(100)
                } else {
                    Duration::from_millis(500)
                });
            }
        }
    }
}

fn pick<T>(r: &Result<T, String>, f: impl Fn(&T) -> f64) -> Result<f64, String> {
    r.as_ref().map(f).map_err(Clone::clone)
}

fn cell(row: &mut Row, kind: Kind) -> &mut Cell {
    match kind {
        Kind::Devid => &mut row.devid,
        Kind::Mosquitto => &mut row.mosquitto,
    }
}

/// Run everything and write the report into `opts.out_dir`.
pub fn run(opts: Options) -> Result<Report, BenchError> {
    let started = Instant::now();
    let date = date_utc();
    let nofile = procfs::raise_nofile();
    let machine = Machine::detect();
    tracing::info!(nofile, "measuring the handshake crypto bound");
    let crypto = crypto::measure(opts.crypto_budget)?;

    let work = tempfile::Builder::new()
        .prefix("devid-bench-")
        .tempdir()
        .map_err(BenchError::io("create a work dir"))?;
    let feasible = |n: usize| nofile >= (n as u64) + 1_024;
    let max_idle = opts
        .idle_sizes
        .iter()
        .copied()
        .filter(|n| feasible(*n))
        .max()
        .unwrap_or(0);
    let settings = servers::devid_bench_settings(max_idle.max(1_000) + 1_000);
    let devid = DevidServer::init(&opts.devid_server, work.path(), &settings)?;
    let admin = AdminClient::from_data_dir(&devid.dir, None)
        .map_err(|e| BenchError::Server(format!("admin client: {e}")))?;
    let n_devices = max_idle.max(opts.connect_pool).max(100);
    tracing::info!(
        devices = n_devices,
        "enrolling the fleet through devid's API"
    );
    let fleet = Fleet::enrol(
        &admin,
        &devid.url(),
        &devid.pin,
        &devid.ca_pem()?,
        n_devices,
        opts.enrol_concurrency,
    )?;
    tracing::info!(secs = fleet.enrol_time.as_secs_f64(), "fleet enrolled");
    let mut devid = devid;
    devid.snapshot()?;
    let mosq = Mosquitto::start_with(work.path(), &devid.dir)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(machine.nproc.max(1))
        .enable_all()
        .build()
        .map_err(BenchError::io("start the tokio runtime"))?;
    let timing = Timing {
        warmup: opts.warmup,
        measure: opts.measure,
    };
    let mut b = Bench {
        opts: opts.clone(),
        rt,
        devid,
        mosq,
        fleet,
        timing,
    };

    // What each server negotiates (and announces in CONNACK).
    let mut tls_info = Vec::new();
    let probe = b.configs(1, false)?;
    for kind in Kind::ALL {
        let ep = b.endpoint(kind, Protocol::V5);
        let (id, cfg) = &probe[0];
        let info = b.rt.block_on(async {
            let c = client::connect(&ep, cfg.clone(), id, 60).await?;
            let s = format!(
                "{}; MQTT 5 CONNACK Receive Maximum {}",
                c.tls_summary(),
                c.receive_max
            );
            c.disconnect().await?;
            Ok::<_, BenchError>(s)
        })?;
        tls_info.push((kind.name().to_owned(), info));
    }

    let mut rows: Vec<Row> = Vec::new();
    let mut notes: Vec<String> = Vec::new();

    // 1. Full mTLS connects.
    let pool = b.configs(opts.connect_pool, false)?;
    let pool = Arc::new(pool);
    for (id, conc) in [("1a", 1usize), ("1b", 16)] {
        if !opts.wants(id) {
            continue;
        }
        let mut row = Row::new(
            id,
            format!(
                "full mTLS connects (TCP + TLS 1.3 + CONNECT/CONNACK + DISCONNECT), {}",
                if conc == 1 {
                    "1 at a time".to_owned()
                } else {
                    format!("{conc} concurrent")
                }
            ),
            "connects/s",
            Better::Higher,
        )
        .target(Target::RatioAtLeast(3.0))
        .short(format!("{id}: connects, {conc} at a time"));
        let mut cpu = Row::new(
            "1c",
            "server CPU per full connect (16 concurrent)",
            "ms",
            Better::Lower,
        );
        b.ab(
            id,
            |b, kind| {
                let ep = b.endpoint(kind, Protocol::V5);
                let pid = b.pid(kind)?;
                b.rt.block_on(scenarios::connects(ep, pool.clone(), conc, b.timing, pid))
            },
            |kind, r| {
                cell(&mut row, kind).push(pick(&r, |x| x.per_sec));
                if conc == 16 {
                    cell(&mut cpu, kind).push(pick(&r, |x| x.cpu_ms_per_connect));
                }
            },
        );
        rows.push(row);
        if conc == 16 {
            rows.push(cpu);
        }
    }

    // 2. Reconnects with session resumption (each device its own ticket cache; fresh caches
    // per server and run, since both servers are "localhost").
    if opts.wants("2") {
        let mut row = Row::new(
            "2",
            "reconnects with TLS 1.3 session resumption, 16 concurrent",
            "connects/s",
            Better::Higher,
        );
        let mut resumed: Vec<(Kind, f64)> = Vec::new();
        b.ab(
            "2",
            |b, kind| {
                let ep = b.endpoint(kind, Protocol::V5);
                let pid = b.pid(kind)?;
                let cfgs = Arc::new(b.configs(b.opts.connect_pool.min(256), true)?);
                b.rt.block_on(scenarios::connects(ep, cfgs, 16, b.timing, pid))
            },
            |kind, r| {
                cell(&mut row, kind).push(pick(&r, |x| x.per_sec));
                if let Ok(x) = &r {
                    resumed.push((kind, x.resumed_fraction));
                }
            },
        );
        for kind in Kind::ALL {
            let f: Vec<f64> = resumed
                .iter()
                .filter(|(k, _)| *k == kind)
                .map(|(_, f)| *f)
                .collect();
            if let Some(m) = crate::report::median(&f) {
                notes.push(format!(
                    "Row 2: {:.0}% of {}'s measured reconnects resumed a TLS session.",
                    m * 100.0,
                    kind.name()
                ));
            }
        }
        rows.push(row);
    }

    // 3 and 6. QoS 1 throughput and CPU per million messages.
    let publishers = b.configs(100, false)?;
    let mut cpu_rows = Vec::new();
    for (id, conns, window, payload, protocol) in PUBLISH_CASES {
        if !opts.wants(id) {
            continue;
        }
        let label = format!(
            "QoS 1 msg/s, {conns} conn{} x {window} in flight, {}{}",
            if conns == 1 { "" } else { "s" },
            payload_name(payload),
            if protocol == Protocol::V311 {
                ", MQTT 3.1.1"
            } else {
                ", MQTT 5"
            }
        );
        let mut row = Row::new(id, label.clone(), "msg/s", Better::Higher).short(format!(
            "{id}: {conns}x{window}, {}{}",
            payload_name(payload),
            if protocol == Protocol::V311 {
                ", 3.1.1"
            } else {
                ""
            }
        ));
        if matches!(id, "3a" | "3b" | "3c" | "3d") {
            row = row.target(Target::RatioAtLeast(3.0));
        }
        let cpu_id = id.replacen('3', "6", 1);
        let mut cpu = Row::new(
            &cpu_id,
            format!(
                "server CPU per 1M acked msgs ({id}: {})",
                label.replace("QoS 1 msg/s, ", "")
            ),
            "CPU s",
            Better::Lower,
        );
        let mut windows: Vec<(Kind, usize)> = Vec::new();
        let mut cores: Vec<(Kind, f64, f64)> = Vec::new();
        b.ab(
            id,
            |b, kind| {
                b.fresh(kind)?;
                let ep = b.endpoint(kind, protocol);
                let pid = b.pid(kind)?;
                b.rt.block_on(scenarios::throughput(
                    ep,
                    &publishers[..conns],
                    window,
                    payload,
                    b.timing,
                    pid,
                ))
            },
            |kind, r| {
                cell(&mut row, kind).push(pick(&r, |x| x.msgs_per_sec));
                cell(&mut cpu, kind).push(pick(&r, |x| x.cpu_s_per_million));
                if let Ok(x) = &r {
                    windows.push((kind, x.window));
                    cores.push((kind, x.server_cores, x.client_cores));
                }
            },
        );
        for (kind, w) in windows {
            if w < window {
                let n = format!(
                    "Row {id}: {}'s Receive Maximum capped the window at {w}.",
                    kind.name()
                );
                if !notes.contains(&n) {
                    notes.push(n);
                }
            }
        }
        let med = |kind: Kind, f: fn(&(Kind, f64, f64)) -> f64| {
            let v: Vec<f64> = cores.iter().filter(|c| c.0 == kind).map(f).collect();
            crate::report::median(&v)
                .map(|m| format!("{m:.2}"))
                .unwrap_or_else(|| "n/a".into())
        };
        notes.push(format!(
            "Row {id}: CPU busy in the window, in cores (of {}): devid server {}, load generator {}; Mosquitto {}, load generator {}.",
            machine.nproc,
            med(Kind::Devid, |c| c.1),
            med(Kind::Devid, |c| c.2),
            med(Kind::Mosquitto, |c| c.1),
            med(Kind::Mosquitto, |c| c.2),
        ));
        rows.push(row);
        cpu_rows.push(cpu);
    }

    // 4. Latency at 50% of Mosquitto's 1-connection maximum.
    let mosq_max = rows
        .iter()
        .find(|r| r.id == "3a")
        .and_then(|r| r.mosquitto.median());
    if opts.wants("4") {
        let rate = mosq_max.map(|m| (m * 0.5).round()).unwrap_or(0.0);
        let label = |p: &str| {
            format!(
                "publish-to-ack latency {p}, open loop at {} msg/s (50% of Mosquitto's 3a), \
                 1 conn, 64 B",
                crate::report::fmt_num(rate)
            )
        };
        let mut p50 = Row::new("4a", label("p50"), "ms", Better::Lower).short("p50");
        let mut p99 = Row::new("4b", label("p99"), "ms", Better::Lower)
            .target(Target::DevidAtMost(10.0))
            .short("p99");
        let mut p999 = Row::new("4c", label("p99.9"), "ms", Better::Lower).short("p99.9");
        let mut achieved: Vec<(Kind, f64)> = Vec::new();
        let device = publishers[0].clone();
        b.ab(
            "4",
            |b, kind| {
                if rate <= 0.0 {
                    return Err(BenchError::Scenario(
                        "no Mosquitto maximum from 3a to derive the load from".into(),
                    ));
                }
                b.fresh(kind)?;
                let ep = b.endpoint(kind, Protocol::V5);
                b.rt.block_on(scenarios::latency(ep, &device, rate, 64, b.timing))
            },
            |kind, r| {
                cell(&mut p50, kind).push(pick(&r, |x| x.p50_ms));
                cell(&mut p99, kind).push(pick(&r, |x| x.p99_ms));
                cell(&mut p999, kind).push(pick(&r, |x| x.p999_ms));
                if let Ok(x) = &r {
                    achieved.push((kind, x.achieved / x.offered));
                }
            },
        );
        for kind in Kind::ALL {
            let f: Vec<f64> = achieved
                .iter()
                .filter(|(k, _)| *k == kind)
                .map(|(_, f)| *f)
                .collect();
            if let Some(m) = crate::report::median(&f) {
                notes.push(format!(
                    "Rows 4: {} acked {:.1}% of the offered load in the window (latency counts \
                     from each message's scheduled send time, so a stall cannot hide).",
                    kind.name(),
                    m * 100.0
                ));
            }
        }
        rows.extend([p50, p99, p999]);
    }

    // 5. Idle connections.
    for (k, &n) in opts.idle_sizes.iter().enumerate() {
        let letter = |i: usize| ((b'a' + (2 * k + i) as u8) as char).to_string();
        if !opts.wants(&format!("5{}", letter(0))) {
            continue;
        }
        let mut mem = Row::new(
            &format!("5{}", letter(0)),
            format!(
                "server RSS per idle connection, {} connections",
                crate::report::fmt_num(n as f64)
            ),
            "KiB",
            Better::Lower,
        )
        .target(Target::NotAboveMosquitto);
        let mut cpu = Row::new(
            &format!("5{}", letter(1)),
            format!(
                "server CPU at rest with {} idle connections",
                crate::report::fmt_num(n as f64)
            ),
            "ms CPU/s",
            Better::Lower,
        );
        if !feasible(n) {
            let why = format!(
                "skipped: needs an open-files limit of at least {} in the servers and the load \
                 generator; this machine's is {nofile} (raising the hard limit needs \
                 CAP_SYS_RESOURCE)",
                n + 1_024
            );
            for c in [
                &mut mem.devid,
                &mut mem.mosquitto,
                &mut cpu.devid,
                &mut cpu.mosquitto,
            ] {
                c.skipped = Some("skipped".into());
            }
            notes.push(format!("Rows {}/{}: {why}.", mem.id, cpu.id));
            rows.extend([mem, cpu]);
            continue;
        }
        let cfgs = b.configs(n, false)?;
        b.ab(
            &mem.id.clone(),
            |b, kind| {
                // A fresh server process: RSS before is its idle baseline.
                b.restart(kind)?;
                std::thread::sleep(Duration::from_secs(1));
                let ep = b.endpoint(kind, Protocol::V5);
                let pid = b.pid(kind)?;
                b.rt.block_on(scenarios::idle(ep, &cfgs, pid, b.opts.settle, b.opts.rest))
            },
            |kind, r| {
                cell(&mut mem, kind).push(pick(&r, |x| x.kib_per_conn));
                cell(&mut cpu, kind).push(pick(&r, |x| x.cpu_ms_per_s));
            },
        );
        rows.extend([mem, cpu]);
    }
    notes.push(format!(
        "Rows 5: RSS is VmRSS from /proc/PID/status on a freshly restarted server, before and \
         after opening every session; CPU at rest is utime + stime from /proc/PID/stat over {:.0} s, \
         counted in clock ticks of {} ms, so its resolution is {} ms CPU/s.",
        opts.rest.as_secs_f64(),
        1000 / procfs::clock_ticks().max(1),
        crate::report::fmt_num(1000.0 / procfs::clock_ticks().max(1) as f64 / opts.rest.as_secs_f64())
    ));
    rows.extend(cpu_rows);

    let fleet_info = (
        b.fleet.devices.len(),
        b.fleet.enrol_time.as_secs_f64(),
        b.fleet.enrol_concurrency,
    );
    let report = Report {
        date,
        elapsed_secs: started.elapsed().as_secs_f64(),
        machine,
        devid_version: DevidServer::version(&opts.devid_server),
        mosquitto_version: Mosquitto::version(),
        command: opts.command.clone(),
        quick: opts.quick,
        runs: opts.runs,
        warmup_secs: opts.warmup.as_secs_f64(),
        measure_secs: opts.measure.as_secs_f64(),
        fleet: fleet_info,
        crypto,
        rows,
        devid_settings: settings.iter().map(|(k, v)| format!("{k} = {v}")).collect(),
        mosquitto_conf: b.mosq.config_text(),
        tls_info,
        notes,
    };
    report.write(&opts.out_dir)?;
    drop(b);
    Ok(report)
}
