//! `devid-bench`: devid-server's MQTT ingest against Mosquitto, side by side. Thin glue over
//! the `devid_bench` library; `scripts/bench` is the one command that runs it in full.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;

/// Benchmark devid-server's MQTT ingest against Mosquitto on this machine and write
/// docs/benchmarks.md plus SVG charts.
#[derive(Debug, Parser)]
#[command(
    version,
    after_help = "Examples:\n  scripts/bench                       # release build, full run, writes docs/\n  \
                  devid-bench --quick --out-dir /tmp/b  # CI smoke run, a minute at most"
)]
struct Cli {
    /// Short run: one run, about a second per scenario, 500 idle connections.
    #[arg(long)]
    quick: bool,
    /// The devid-server binary (default: next to this program).
    #[arg(long)]
    devid_server: Option<PathBuf>,
    /// Where benchmarks.md and the SVG charts are written.
    #[arg(long, default_value = "docs")]
    out_dir: PathBuf,
    /// Runs per scenario and server (default 3; 1 with --quick).
    #[arg(long)]
    runs: Option<usize>,
    /// Measurement window of the timed scenarios, seconds (default 10; 1 with --quick).
    #[arg(long)]
    measure_secs: Option<f64>,
    /// Idle-connection counts, comma-separated (default 10000,50000; 500 with --quick).
    #[arg(long, value_delimiter = ',')]
    idle: Option<Vec<usize>>,
    /// Run only these scenarios (row ids or their prefixes, comma-separated, e.g. `3a,3b,5`);
    /// for profiling one scenario. The report then has only those rows.
    #[arg(long, value_delimiter = ',')]
    only: Option<Vec<String>>,
    /// The command to name in the report (scripts/bench passes itself).
    #[arg(long, hide = true)]
    invoked_as: Option<String>,
}

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    match real_main() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("devid-bench: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn real_main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let devid_server = match cli.devid_server {
        Some(p) => p,
        None => std::env::current_exe()
            .context("cannot find this program's path; pass --devid-server")?
            .with_file_name("devid-server"),
    };
    anyhow::ensure!(
        devid_server.is_file(),
        "{} not found: build it (cargo build --release -p devid-server) or pass --devid-server",
        devid_server.display()
    );
    let mut opts = if cli.quick {
        devid_bench::run::Options::quick(devid_server, cli.out_dir.clone())
    } else {
        devid_bench::run::Options::full(devid_server, cli.out_dir.clone())
    };
    if let Some(r) = cli.runs {
        anyhow::ensure!(r >= 1, "--runs must be at least 1");
        opts.runs = r;
    }
    if let Some(s) = cli.measure_secs {
        anyhow::ensure!(s > 0.0 && s.is_finite(), "--measure-secs must be above 0");
        opts.measure = Duration::from_secs_f64(s);
    }
    if let Some(i) = cli.idle {
        opts.idle_sizes = i;
    }
    if let Some(o) = cli.only {
        opts.only = o;
    }
    let mut args: Vec<String> = Vec::new();
    let mut skip = false;
    for a in std::env::args().skip(1) {
        if skip {
            skip = false;
        } else if a == "--invoked-as" {
            skip = true;
        } else if !a.starts_with("--invoked-as=") {
            args.push(a);
        }
    }
    let exact = format!("devid-bench {}", args.join(" ")).trim().to_owned();
    opts.command = match &cli.invoked_as {
        Some(c) => format!("{}` (which runs `{exact}", c.trim()),
        None => exact.trim().to_owned(),
    };
    let report = devid_bench::run::run(opts).context("benchmark failed")?;
    println!("{}", report.markdown());
    eprintln!(
        "wrote {}/benchmarks.md and the charts",
        cli.out_dir.display()
    );
    Ok(())
}
