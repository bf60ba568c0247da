//! `devid`: the device command. All logic lives in the `devid` library; this file only
//! hardens the process, parses the command line and maps errors to an exit code.

use clap::Parser;

fn main() {
    // Before anything can be unsealed: no core files, not dumpable (THREATS.md T7).
    let hardened = devid_secmem::harden_process();
    let cli = devid::cli::Cli::parse();
    devid::logging::init(cli.verbose);
    if let Err(e) = hardened {
        tracing::warn!(error = %e, "process hardening failed");
    }
    match devid::run(cli) {
        Ok(()) => {}
        Err(e) => {
            eprintln!("devid: error: {e:#}");
            std::process::exit(1);
        }
    }
}
