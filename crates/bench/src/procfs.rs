//! Server resource use from `/proc/PID/stat` and `/proc/PID/status`.

use std::process::Command;
use std::sync::OnceLock;

use crate::BenchError;

/// Clock ticks per second (`getconf CLK_TCK`; 100 when that cannot be run).
pub fn clock_ticks() -> u64 {
    static TICKS: OnceLock<u64> = OnceLock::new();
    *TICKS.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .filter(|t| *t > 0)
            .unwrap_or(100)
    })
}

/// CPU seconds (user + system) used so far by process `pid`, all its threads.
pub fn cpu_seconds(pid: u32) -> Result<f64, BenchError> {
    let path = format!("/proc/{pid}/stat");
    let text = std::fs::read_to_string(&path).map_err(BenchError::io(format!("read {path}")))?;
    // The command name is in parentheses and may contain spaces: fields follow the last ')'.
    let rest = text
        .rsplit_once(')')
        .map(|(_, r)| r)
        .ok_or_else(|| BenchError::Scenario(format!("{path}: unexpected format")))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After ')': state is field 3 of stat(5); utime is field 14, stime 15 => indices 11, 12.
    let num = |i: usize| -> Result<u64, BenchError> {
        fields
            .get(i)
            .and_then(|f| f.parse().ok())
            .ok_or_else(|| BenchError::Scenario(format!("{path}: no field {}", i + 3)))
    };
    let ticks = num(11)? + num(12)?;
    Ok(ticks as f64 / clock_ticks() as f64)
}

/// Resident set size of process `pid`, KiB (`VmRSS`).
pub fn rss_kib(pid: u32) -> Result<u64, BenchError> {
    let path = format!("/proc/{pid}/status");
    let text = std::fs::read_to_string(&path).map_err(BenchError::io(format!("read {path}")))?;
    text.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| BenchError::Scenario(format!("{path}: no VmRSS line")))
}

/// What the machine is, for the report.
#[derive(Debug, Clone)]
pub struct Machine {
    /// Logical CPUs.
    pub nproc: usize,
    /// `model name` of the first CPU.
    pub cpu_model: String,
    /// Total memory, MiB.
    pub ram_mib: u64,
    /// Kernel release.
    pub kernel: String,
    /// Hard limit on open files of this process (after raising the soft one).
    pub nofile_limit: u64,
}

impl Machine {
    /// Read it from `/proc`.
    pub fn detect() -> Machine {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu_model = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_owned())
            .unwrap_or_else(|| "unknown".into());
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let ram_mib = meminfo
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map(|k| k / 1024)
            .unwrap_or(0);
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|s| s.trim().to_owned())
            .unwrap_or_else(|_| "unknown".into());
        Machine {
            nproc: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
            cpu_model,
            ram_mib,
            kernel,
            nofile_limit: rlimit::getrlimit(rlimit::Resource::NOFILE)
                .map(|(_, hard)| hard)
                .unwrap_or(0),
        }
    }
}

/// Raise the soft open-files limit to the hard one (children inherit it). Returns the soft
/// limit now in force.
pub fn raise_nofile() -> u64 {
    rlimit::increase_nofile_limit(u64::MAX).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_process_is_readable() {
        let pid = std::process::id();
        assert!(rss_kib(pid).unwrap() > 0);
        assert!(cpu_seconds(pid).unwrap() >= 0.0);
        let m = Machine::detect();
        assert!(m.nproc >= 1 && m.ram_mib > 0);
    }
}
