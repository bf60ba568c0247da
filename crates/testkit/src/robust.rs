//! The robustness tests' two shared habits: how many rounds to run, and the machine-readable
//! result line each prints (`ROBUST {json}`), which `scripts/robustness` collects into
//! `docs/robustness.md`.
//!
//! Rounds: `DEVID_ROBUST_ROUNDS=N` runs N; `DEVID_ROBUST_FULL=1` (what `scripts/robustness
//! --full` sets) runs the full count; otherwise (plain `cargo test`, CI) the short count.
//! Result lines go to stdout (seen with `--nocapture`) and, when `DEVID_ROBUST_OUT` names a
//! file, are appended to it, so `scripts/test` gets them without capturing test output.

use std::fmt::Write as _;
use std::io::Write as _;

/// The number of rounds: `short` by default, `full` in the full run.
pub fn rounds(short: usize, full: usize) -> usize {
    if let Some(n) = std::env::var("DEVID_ROBUST_ROUNDS")
        .ok()
        .and_then(|v| v.trim().parse::<usize>().ok())
        .filter(|n| *n > 0)
    {
        return n;
    }
    if full_run() {
        full
    } else {
        short
    }
}

/// Is this the full run (`DEVID_ROBUST_FULL=1`)?
pub fn full_run() -> bool {
    std::env::var("DEVID_ROBUST_FULL").is_ok_and(|v| v == "1")
}

/// One result line under construction: `Report::new("test").num("rounds", 5).emit()`.
#[derive(Debug)]
pub struct Report {
    json: String,
}

fn escape(s: &str, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

impl Report {
    /// A line for test `test` (the name the table shows), with the mode it ran in.
    pub fn new(test: &str) -> Self {
        let mut r = Report {
            json: String::from("{"),
        };
        r.key("test");
        escape(test, &mut r.json);
        r.text("mode", if full_run() { "full" } else { "short" })
    }

    fn key(&mut self, k: &str) {
        if self.json.len() > 1 {
            self.json.push(',');
        }
        escape(k, &mut self.json);
        self.json.push(':');
    }

    /// A number.
    pub fn num(mut self, k: &str, v: impl Into<f64>) -> Self {
        self.key(k);
        let v: f64 = v.into();
        if v.fract() == 0.0 && v.abs() < 1e15 {
            let _ = write!(self.json, "{}", v as i64);
        } else {
            let _ = write!(self.json, "{v:.3}");
        }
        self
    }

    /// A string.
    pub fn text(mut self, k: &str, v: &str) -> Self {
        self.key(k);
        escape(v, &mut self.json);
        self
    }

    /// Print the line and append it to `DEVID_ROBUST_OUT` when set.
    pub fn emit(mut self) {
        self.json.push('}');
        let line = format!("ROBUST {}", self.json);
        println!("{line}");
        if let Some(path) = std::env::var_os("DEVID_ROBUST_OUT") {
            if let Ok(mut f) = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
            {
                let _ = writeln!(f, "{line}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_is_json() {
        let mut r = Report::new("t\"x").num("rounds", 5).num("ms", 1.25);
        r.json.push('}');
        assert!(r.json.starts_with("{\"test\":\"t\\\"x\",\"mode\":"));
        assert!(r.json.ends_with(",\"rounds\":5,\"ms\":1.250}"));
    }
}
