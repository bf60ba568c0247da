//! The report: a Markdown table (median with min-max of the runs, devid / Mosquitto ratio,
//! targets met or missed), the machine and settings, a short generated reading, and two SVG
//! charts drawn with plotters' SVG backend (no font files needed).

use std::fmt::Write as _;
use std::path::Path;

use plotters::prelude::*;

use crate::crypto::HandshakeCost;
use crate::procfs::Machine;
use crate::BenchError;

/// Which direction is better for a row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Better {
    /// More is better (rates).
    Higher,
    /// Less is better (latency, memory, CPU).
    Lower,
}

/// A target the issue sets for devid.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Target {
    /// devid's median at least this many times Mosquitto's.
    RatioAtLeast(f64),
    /// devid's median at most this value.
    DevidAtMost(f64),
    /// devid's median not above Mosquitto's.
    NotAboveMosquitto,
}

impl Target {
    fn describe(&self, unit: &str) -> String {
        match self {
            Target::RatioAtLeast(r) => format!(">= {r}x Mosquitto"),
            Target::DevidAtMost(v) => format!("<= {} {unit}", fmt_num(*v)),
            Target::NotAboveMosquitto => "<= Mosquitto".into(),
        }
    }
}

/// The samples of one server for one row.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Cell {
    /// One value per run.
    pub samples: Vec<f64>,
    /// Why a run failed (the first failure), if any did.
    pub error: Option<String>,
    /// Why the row was not run for this server.
    pub skipped: Option<String>,
}

impl Cell {
    /// Median of the samples.
    pub fn median(&self) -> Option<f64> {
        median(&self.samples)
    }

    /// Smallest and largest sample.
    pub fn range(&self) -> Option<(f64, f64)> {
        let min = self.samples.iter().copied().reduce(f64::min)?;
        let max = self.samples.iter().copied().reduce(f64::max)?;
        Some((min, max))
    }

    /// Record the outcome of one run.
    pub fn push(&mut self, r: Result<f64, String>) {
        match r {
            Ok(v) => self.samples.push(v),
            Err(e) => {
                self.error.get_or_insert(e);
            }
        }
    }

    fn render(&self) -> String {
        if let Some(s) = &self.skipped {
            return format!("n/a ({s})");
        }
        let Some(m) = self.median() else {
            return match &self.error {
                Some(e) => format!("n/a (failed: {})", one_line(e)),
                None => "n/a".into(),
            };
        };
        let mut out = fmt_num(m);
        if self.samples.len() > 1 {
            if let Some((lo, hi)) = self.range() {
                let _ = write!(out, " ({}-{})", fmt_num(lo), fmt_num(hi));
            }
        }
        if let Some(e) = &self.error {
            let _ = write!(out, "; a run failed: {}", one_line(e));
        }
        out
    }
}

fn one_line(s: &str) -> String {
    let s: String = s.lines().next().unwrap_or("").chars().take(140).collect();
    s.replace('|', "/")
}

/// Median of `v` (mean of the middle two for an even count).
pub fn median(v: &[f64]) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    Some(if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    })
}

/// A number for the table: thousands separators above 1000, 3 significant digits below.
pub fn fmt_num(v: f64) -> String {
    if !v.is_finite() {
        return "n/a".into();
    }
    if v == 0.0 {
        return "0".into();
    }
    let a = v.abs();
    if a >= 1000.0 {
        let s = format!("{:.0}", a);
        let mut out = String::new();
        for (i, ch) in s.chars().enumerate() {
            if i > 0 && (s.len() - i) % 3 == 0 {
                out.push(',');
            }
            out.push(ch);
        }
        if v < 0.0 {
            out.insert(0, '-');
        }
        out
    } else if a >= 100.0 {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else if a >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

/// One row of the results table.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    /// Short id (`1a`, `3c`, ...), stable for tests and the text.
    pub id: String,
    /// What is measured.
    pub label: String,
    /// Unit.
    pub unit: String,
    /// Which direction is better.
    pub better: Better,
    /// devid's samples.
    pub devid: Cell,
    /// Mosquitto's samples.
    pub mosquitto: Cell,
    /// The issue's target for devid, if any.
    pub target: Option<Target>,
    /// A short label for the charts.
    pub short: String,
}

impl Row {
    /// A row with no samples yet.
    pub fn new(id: &str, label: impl Into<String>, unit: &str, better: Better) -> Row {
        Row {
            id: id.into(),
            label: label.into(),
            unit: unit.into(),
            better,
            devid: Cell::default(),
            mosquitto: Cell::default(),
            target: None,
            short: id.into(),
        }
    }

    /// With a short chart label.
    pub fn short(mut self, s: impl Into<String>) -> Row {
        self.short = s.into();
        self
    }

    /// With a target.
    pub fn target(mut self, t: Target) -> Row {
        self.target = Some(t);
        self
    }

    /// devid's median / Mosquitto's median.
    pub fn ratio(&self) -> Option<f64> {
        let (d, m) = (self.devid.median()?, self.mosquitto.median()?);
        (m != 0.0).then(|| d / m)
    }

    /// Whether devid meets the target (None: no target or no data).
    pub fn met(&self) -> Option<bool> {
        let d = self.devid.median()?;
        match self.target? {
            Target::RatioAtLeast(r) => Some(self.ratio()? >= r),
            Target::DevidAtMost(v) => Some(d <= v),
            Target::NotAboveMosquitto => Some(d <= self.mosquitto.median()?),
        }
    }
}

/// Everything the report says.
#[derive(Debug, Clone)]
pub struct Report {
    /// When the run started (UTC, as `date -u` prints it).
    pub date: String,
    /// How long the run took, seconds.
    pub elapsed_secs: f64,
    /// The machine.
    pub machine: Machine,
    /// `devid-server --version`.
    pub devid_version: String,
    /// `mosquitto -h`, first line.
    pub mosquitto_version: String,
    /// The command that produced the report.
    pub command: String,
    /// Whether this was a `--quick` run.
    pub quick: bool,
    /// Runs per scenario and server.
    pub runs: usize,
    /// Warm-up and measurement seconds of the timed scenarios.
    pub warmup_secs: f64,
    /// Measurement window, seconds.
    pub measure_secs: f64,
    /// Devices enrolled, enrolment wall time (s) and concurrency.
    pub fleet: (usize, f64, usize),
    /// The handshake crypto cost.
    pub crypto: HandshakeCost,
    /// Rows, in order.
    pub rows: Vec<Row>,
    /// The devid settings the benchmark changed, as `key = value` lines.
    pub devid_settings: Vec<String>,
    /// The Mosquitto config used.
    pub mosquitto_conf: String,
    /// The negotiated TLS parameters per server, as text.
    pub tls_info: Vec<(String, String)>,
    /// Extra notes (skipped scenarios, resumption fractions, ...).
    pub notes: Vec<String>,
}

impl Report {
    /// The row with `id`.
    pub fn row(&self, id: &str) -> Option<&Row> {
        self.rows.iter().find(|r| r.id == id)
    }

    /// The Markdown document.
    pub fn markdown(&self) -> String {
        let m = &self.machine;
        let mut s = String::new();
        let _ = writeln!(s, "# Benchmarks: devid-server MQTT ingest vs Mosquitto\n");
        let _ = writeln!(
            s,
            "Generated by `scripts/bench` (do not edit by hand: run it again). {}\n",
            if self.quick {
                "**This is a `--quick` run: short windows, few devices, one run; the numbers \
                 only show that the harness works.**"
            } else {
                ""
            }
        );
        let _ = writeln!(s, "| | |\n|---|---|");
        let _ = writeln!(
            s,
            "| date | {} (run took {:.0} s) |",
            self.date, self.elapsed_secs
        );
        let _ = writeln!(s, "| CPU | {} x {} |", m.nproc, m.cpu_model);
        let _ = writeln!(s, "| RAM | {} MiB |", m.ram_mib);
        let _ = writeln!(s, "| kernel | {} |", m.kernel);
        let _ = writeln!(s, "| open files limit | {} |", m.nofile_limit);
        let _ = writeln!(
            s,
            "| devid | {} (message log + SQLite index) |",
            self.devid_version
        );
        let _ = writeln!(s, "| Mosquitto | {} (Debian) |", self.mosquitto_version);
        let _ = writeln!(s, "| command | `{}` |", self.command);
        let (n, secs, conc) = self.fleet;
        let _ = writeln!(
            s,
            "| fleet | {n} devices enrolled through devid's API in {secs:.1} s \
             ({:.0}/s, {conc} at a time) |",
            n as f64 / secs.max(1e-9)
        );
        let _ = writeln!(
            s,
            "| method | {} run(s) per scenario and server, servers alternating (devid, Mosquitto, \
             devid, ...); timed scenarios: {:.1} s warm-up, {:.1} s measured; median (min-max); \
             each devid run of 3 and 4 starts on a restarted server with no stored messages |\n",
            self.runs, self.warmup_secs, self.measure_secs
        );

        let _ = writeln!(s, "## Results\n");
        let _ = writeln!(
            s,
            "| # | scenario | unit | devid | Mosquitto | devid / Mosquitto | target | met |"
        );
        let _ = writeln!(s, "|---|---|---|---|---|---|---|---|");
        for r in &self.rows {
            let ratio = r.ratio().map(|x| format!("{x:.2}x")).unwrap_or("-".into());
            let target = r
                .target
                .map(|t| t.describe(&r.unit))
                .unwrap_or_else(|| "-".into());
            let met = match (r.target, r.met()) {
                (None, _) => "-",
                (Some(_), Some(true)) => "**met**",
                (Some(_), Some(false)) => "**missed**",
                (Some(_), None) => "no data",
            };
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} | {} | {} | {} |",
                r.id,
                r.label,
                r.unit,
                r.devid.render(),
                r.mosquitto.render(),
                ratio,
                target,
                met
            );
        }
        let _ = writeln!(
            s,
            "\ndevid acknowledges a message only after it is durable in its append-only message \
             log (group commit: one write + fdatasync per batch; SQLite indexes the log \
             asynchronously and its work is included in devid's CPU), after checking the device \
             against the registry at CONNECT and authorising every publish; Mosquitto acks on \
             receipt and runs with persistence off (it has no durable ingest). On this virtual \
             disk a completed fdatasync may still not be durable on the host.\n"
        );

        let c = &self.crypto;
        let _ = writeln!(s, "## The crypto lower bound\n");
        let _ = writeln!(
            s,
            "Server-side public-key work of one TLS 1.3 mutual-TLS handshake with ECDSA P-256 \
             certificates, measured in-process with ring: one ECDSA P-256 sign ({:.1} us, the \
             server's CertificateVerify) + two verifies ({:.1} us each: the client certificate's \
             signature by the CA, the client's CertificateVerify) + one X25519 key generation \
             and agreement ({:.1} us) = **{:.1} us**. One core doing only that: {} handshakes/s. \
             The load generator runs on the same {} cores and does the same operations on its \
             side, so this machine's bound for the benchmark is {} handshakes/s.\n",
            c.sign_us,
            c.verify_us,
            c.ecdhe_us,
            c.server_us(),
            fmt_num(c.per_core_bound()),
            m.nproc,
            fmt_num(c.shared_machine_bound(m.nproc))
        );
        let _ = writeln!(s, "| connects/s | devid | Mosquitto |\n|---|---|---|");
        for id in ["1a", "1b"] {
            if let Some(r) = self.row(id) {
                let pct = |cell: &Cell| {
                    cell.median()
                        .map(|v| {
                            format!(
                                "{} = {:.1}% of the shared bound, {:.1}% of one core's",
                                fmt_num(v),
                                100.0 * v / c.shared_machine_bound(m.nproc),
                                100.0 * v / c.per_core_bound()
                            )
                        })
                        .unwrap_or_else(|| "n/a".into())
                };
                let _ = writeln!(
                    s,
                    "| {id}: {} | {} | {} |",
                    r.label,
                    pct(&r.devid),
                    pct(&r.mosquitto)
                );
            }
        }

        let _ = writeln!(s, "\n## Reading\n");
        for line in self.reading() {
            let _ = writeln!(s, "- {line}");
        }
        for n in &self.notes {
            let _ = writeln!(s, "- {n}");
        }

        if !self.quick {
            let _ = writeln!(
                s,
                "\nWhere the time goes for the targets this run misses, with perf profiles and \
                 what was tried: [benchmarks-profile.md](benchmarks-profile.md) (written by \
                 hand; it names the run it profiled)."
            );
        }
        let _ = writeln!(s, "\n## Charts\n");
        let _ = writeln!(
            s,
            "![QoS 1 throughput](benchmarks-throughput.svg)\n\n\
             ![Publish-to-ack latency](benchmarks-latency.svg)\n"
        );

        let _ = writeln!(s, "## Settings\n");
        let _ = writeln!(
            s,
            "Both servers listen on 127.0.0.1 with the same fleet CA (devid's `ca.pem`), the same \
             server certificate and key (devid's `server.pem`, `server-key.pem`) and the same \
             device certificates; TLS 1.3 only; TCP_NODELAY on both sides. Each simulated device \
             has its own ECDSA P-256 key (soft, in memory) and certificate from the fleet CA, \
             enrolled through devid's enrolment API with a one-time token; the MQTT client id is \
             the device id and the device publishes to `devices/<id>/telemetry/bench`. The load \
             generator (tokio + rustls with ring, `devid-bench`) connects from 127.0.0.2 and up \
             so that ports in TIME_WAIT never run out.\n"
        );
        for (server, info) in &self.tls_info {
            let _ = writeln!(s, "- {server}: {info}");
        }
        let _ = writeln!(
            s,
            "\ndevid-server (`devid-server init` defaults, then these changes to \
             `devid-server.toml`: the per-device and per-source limits that protect a fleet \
             from one greedy device are lifted, since every benchmark device is greedy and they \
             all come from a few addresses):\n\n```toml"
        );
        for l in &self.devid_settings {
            let _ = writeln!(s, "{l}");
        }
        let _ = writeln!(s, "```\n\nMosquitto:\n\n```\n{}```", self.mosquitto_conf);
        s
    }

    /// Generated sentences about the targets and the notable differences.
    pub fn reading(&self) -> Vec<String> {
        let mut out = Vec::new();
        let ratio_text = |r: &Row| -> Option<String> {
            Some(format!(
                "devid {} vs Mosquitto {} {} ({:.2}x)",
                fmt_num(r.devid.median()?),
                fmt_num(r.mosquitto.median()?),
                r.unit,
                r.ratio()?
            ))
        };
        let group = |ids: &[&str], what: &str, out: &mut Vec<String>| {
            let rows: Vec<&Row> = ids.iter().filter_map(|id| self.row(id)).collect();
            if rows.is_empty() {
                return;
            }
            let mets: Vec<Option<bool>> = rows.iter().map(|r| r.met()).collect();
            let verdict = if mets.iter().all(|m| *m == Some(true)) {
                "met"
            } else if mets.iter().any(|m| m.is_none()) {
                "not measured for every case"
            } else if mets.contains(&Some(true)) {
                "met in part"
            } else {
                "missed"
            };
            let details: Vec<String> = rows
                .iter()
                .filter_map(|r| ratio_text(r).map(|t| format!("{}: {t}", r.id)))
                .collect();
            out.push(format!(
                "Target {what}: **{verdict}** ({}).",
                if details.is_empty() {
                    "no data".to_owned()
                } else {
                    details.join("; ")
                }
            ));
        };
        group(&["1a", "1b"], "connects/s >= 3x Mosquitto", &mut out);
        group(
            &["3a", "3b", "3c", "3d"],
            "QoS 1 throughput with durable acks >= 3x Mosquitto's non-durable",
            &mut out,
        );
        group(
            &["4b"],
            "p99 ack latency at 50% load <= 10 ms, durable",
            &mut out,
        );
        let idle: Vec<&str> = self
            .rows
            .iter()
            .filter(|r| r.id.starts_with('5') && r.unit.starts_with("KiB"))
            .filter(|r| r.devid.skipped.is_none() && r.mosquitto.skipped.is_none())
            .map(|r| r.id.as_str())
            .collect();
        group(&idle, "memory per idle connection <= Mosquitto's", &mut out);
        if let (Some(r2), Some(r1)) = (self.row("2"), self.row("1b")) {
            if let (Some(d2), Some(d1), Some(m2), Some(m1)) = (
                r2.devid.median(),
                r1.devid.median(),
                r2.mosquitto.median(),
                r1.mosquitto.median(),
            ) {
                out.push(format!(
                    "Session resumption changes the reconnect rate by {:.2}x on devid and \
                     {:.2}x on Mosquitto (2 vs 1b).",
                    d2 / d1,
                    m2 / m1
                ));
            }
        }
        if let (Some(l), Some(t)) = (self.row("4b"), self.row("3a")) {
            if let (Some(p99), Some(dmax), Some(mmax)) =
                (l.devid.median(), t.devid.median(), t.mosquitto.median())
            {
                out.push(format!(
                    "The latency load (rows 4) is 50% of Mosquitto's one-connection maximum, \
                     which is {:.0}% of devid's own (3a); devid's p99 there is {} ms.",
                    100.0 * 0.5 * mmax / dmax,
                    fmt_num(p99)
                ));
            }
        }
        if let Some(c) = self
            .notes
            .iter()
            .find(|n| n.starts_with("Row 3a: CPU busy"))
        {
            if let Some(t) = self.row("3a") {
                if t.ratio().is_some_and(|r| r < 1.0) && c.contains("devid server 0.") {
                    out.push(
                        "In 3a devid acks fewer messages than Mosquitto while its server is far \
                         from busy (see the CPU note below): with one connection and a fixed \
                         window, throughput is window / commit round trip, so the durable \
                         commit's latency, not CPU, bounds it."
                            .to_owned(),
                    );
                }
            }
        }
        if let (Some(a), Some(b)) = (self.row("6a"), self.row("6c")) {
            if let (Some(r1), Some(r2)) = (a.ratio(), b.ratio()) {
                out.push(format!(
                    "Per message, devid's server spends {r1:.2}x Mosquitto's CPU on one \
                     connection (6a) and {r2:.2}x with 100 connections (6c); that CPU includes \
                     the message log's writes and fdatasyncs and the SQLite indexing, which \
                     Mosquitto does not do."
                ));
            }
        }
        out
    }

    /// SVG: QoS 1 throughput per scenario (median bars, min-max whiskers).
    pub fn throughput_svg(&self) -> Result<String, BenchError> {
        let rows: Vec<&Row> = self.rows.iter().filter(|r| r.id.starts_with('3')).collect();
        bar_chart(
            "QoS 1 throughput, acked msg/s (median, min-max)",
            "msg/s",
            &rows,
            false,
            None,
        )
    }

    /// SVG: publish-to-ack latency percentiles (log scale).
    pub fn latency_svg(&self) -> Result<String, BenchError> {
        let rows: Vec<&Row> = self.rows.iter().filter(|r| r.id.starts_with('4')).collect();
        bar_chart(
            "Publish-to-PUBACK latency at 50% of Mosquitto's max, ms (log scale)",
            "ms",
            &rows,
            true,
            Some(10.0),
        )
    }

    /// Write `benchmarks.md`, `benchmarks-throughput.svg`, `benchmarks-latency.svg` in `dir`.
    pub fn write(&self, dir: &Path) -> Result<(), BenchError> {
        std::fs::create_dir_all(dir).map_err(BenchError::io(format!("mkdir {}", dir.display())))?;
        let files = [
            ("benchmarks.md", self.markdown()),
            ("benchmarks-throughput.svg", self.throughput_svg()?),
            ("benchmarks-latency.svg", self.latency_svg()?),
        ];
        for (name, text) in files {
            let p = dir.join(name);
            std::fs::write(&p, text).map_err(BenchError::io(format!("write {}", p.display())))?;
        }
        Ok(())
    }
}

const DEVID_COLOR: RGBColor = RGBColor(0x1f, 0x77, 0xb4);
const MOSQ_COLOR: RGBColor = RGBColor(0xff, 0x7f, 0x0e);

fn bar_chart(
    title: &str,
    unit: &str,
    rows: &[&Row],
    log: bool,
    target_line: Option<f64>,
) -> Result<String, BenchError> {
    let err = |e: String| BenchError::Scenario(format!("chart: {e}"));
    let mut svg = String::new();
    let labels: Vec<String> = rows.iter().map(|r| r.short.clone()).collect();
    let values: Vec<f64> = rows
        .iter()
        .flat_map(|r| [&r.devid, &r.mosquitto])
        .flat_map(|c| c.samples.iter().copied())
        .filter(|v| v.is_finite() && *v > 0.0)
        .collect();
    let top = values
        .iter()
        .copied()
        .fold(0.0f64, f64::max)
        .max(if log { 12.0 } else { 1e-3 });
    let bottom = values
        .iter()
        .copied()
        .fold(f64::INFINITY, f64::min)
        .min(top);
    let n = rows.len().max(1) as f64;
    {
        let root = SVGBackend::with_string(&mut svg, (960, 540)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| err(e.to_string()))?;
        let mut builder = ChartBuilder::on(&root);
        builder
            .caption(title, ("sans-serif", 22))
            .margin(16)
            .x_label_area_size(40)
            .y_label_area_size(80);
        let x_range = -0.5f64..(n - 0.5);
        let label_of = |x: &f64| -> String {
            let i = x.round();
            if (x - i).abs() < 1e-6 && i >= 0.0 && (i as usize) < labels.len() {
                labels[i as usize].clone()
            } else {
                String::new()
            }
        };
        if log {
            let lo = (bottom / 2.0).max(1e-3);
            let mut chart = builder
                .build_cartesian_2d(x_range, (lo..top * 2.0).log_scale())
                .map_err(|e| err(e.to_string()))?;
            chart
                .configure_mesh()
                .disable_x_mesh()
                .x_labels(rows.len())
                .x_label_formatter(&label_of)
                .y_desc(unit)
                .draw()
                .map_err(|e| err(e.to_string()))?;
            draw_bars(&mut chart, rows, lo)?;
            if let Some(t) = target_line {
                chart
                    .draw_series(std::iter::once(PathElement::new(
                        vec![(-0.5, t), (n - 0.5, t)],
                        RED.stroke_width(2),
                    )))
                    .map_err(|e| err(e.to_string()))?
                    .label(format!("target: devid p99 <= {} ms", fmt_num(t)))
                    .legend(|(x, y)| {
                        PathElement::new(vec![(x, y), (x + 14, y)], RED.stroke_width(2))
                    });
            }
            legend(&mut chart, SeriesLabelPosition::UpperLeft)?;
        } else {
            let mut chart = builder
                .build_cartesian_2d(x_range, 0.0..top * 1.15)
                .map_err(|e| err(e.to_string()))?;
            chart
                .configure_mesh()
                .disable_x_mesh()
                .x_labels(rows.len())
                .x_label_formatter(&label_of)
                .y_desc(unit)
                .y_label_formatter(&|v| fmt_num(*v))
                .draw()
                .map_err(|e| err(e.to_string()))?;
            draw_bars(&mut chart, rows, 0.0)?;
            legend(&mut chart, SeriesLabelPosition::UpperRight)?;
        }
        root.present().map_err(|e| err(e.to_string()))?;
    }
    Ok(svg)
}

fn draw_bars<'a, Y>(
    chart: &mut ChartContext<
        'a,
        SVGBackend<'a>,
        Cartesian2d<plotters::coord::types::RangedCoordf64, Y>,
    >,
    rows: &[&Row],
    base: f64,
) -> Result<(), BenchError>
where
    Y: Ranged<ValueType = f64>,
{
    let err = |e: String| BenchError::Scenario(format!("chart: {e}"));
    for (i, r) in rows.iter().enumerate() {
        for (k, (cell, color)) in [(&r.devid, DEVID_COLOR), (&r.mosquitto, MOSQ_COLOR)]
            .into_iter()
            .enumerate()
        {
            let Some(m) = cell.median() else { continue };
            let x0 = i as f64 - 0.38 + k as f64 * 0.38;
            let x1 = x0 + 0.36;
            chart
                .draw_series(std::iter::once(Rectangle::new(
                    [(x0, base), (x1, m.max(base))],
                    color.filled(),
                )))
                .map_err(|e| err(e.to_string()))?;
            if let Some((lo, hi)) = cell.range() {
                let xm = (x0 + x1) / 2.0;
                chart
                    .draw_series(std::iter::once(PathElement::new(
                        vec![(xm, lo.max(base)), (xm, hi.max(base))],
                        BLACK.stroke_width(2),
                    )))
                    .map_err(|e| err(e.to_string()))?;
            }
        }
    }
    Ok(())
}

fn legend<'a, X, Y>(
    chart: &mut ChartContext<'a, SVGBackend<'a>, Cartesian2d<X, Y>>,
    position: SeriesLabelPosition,
) -> Result<(), BenchError>
where
    X: Ranged<ValueType = f64>,
    Y: Ranged<ValueType = f64>,
{
    let err = |e: String| BenchError::Scenario(format!("chart: {e}"));
    for (name, color) in [("devid", DEVID_COLOR), ("Mosquitto", MOSQ_COLOR)] {
        chart
            .draw_series(std::iter::empty::<Rectangle<(f64, f64)>>())
            .map_err(|e| err(e.to_string()))?
            .label(name)
            .legend(move |(x, y)| Rectangle::new([(x, y - 6), (x + 14, y + 6)], color.filled()));
    }
    chart
        .configure_series_labels()
        .position(position)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| err(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_and_medians() {
        assert_eq!(fmt_num(1234567.0), "1,234,567");
        assert_eq!(fmt_num(999.4), "999");
        assert_eq!(fmt_num(12.34), "12.3");
        assert_eq!(fmt_num(0.1234), "0.123");
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), Some(2.5));
        assert_eq!(median(&[]), None);
    }

    #[test]
    fn targets() {
        let mut r = Row::new("1a", "x", "/s", Better::Higher).target(Target::RatioAtLeast(3.0));
        assert_eq!(r.met(), None);
        r.devid.push(Ok(900.0));
        r.mosquitto.push(Ok(300.0));
        assert_eq!(r.met(), Some(true));
        r.devid.samples = vec![899.0];
        assert_eq!(r.met(), Some(false));
        let mut l = Row::new("4b", "p99", "ms", Better::Lower).target(Target::DevidAtMost(10.0));
        l.devid.push(Ok(9.0));
        assert_eq!(l.met(), Some(true));
        l.devid.push(Err("boom".into()));
        assert!(l.devid.render().contains("a run failed"));
    }
}
