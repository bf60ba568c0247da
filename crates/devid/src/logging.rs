//! Logging to stderr through `tracing`. Never a secret, key, token or payload.

/// Install the subscriber: `warn` by default, `info`/`debug` with `-v`/`-vv`, or `DEVID_LOG`.
pub fn init(verbose: u8) {
    // tpm2-tss prints its own diagnostics to stderr; they duplicate our error messages and
    // alarm users on expected probes (is a persistent SRK present?). Let the user opt back in.
    if std::env::var_os("TSS2_LOG").is_none() {
        std::env::set_var("TSS2_LOG", "all+NONE");
    }
    // tss-esapi logs expected probe failures (no persistent SRK) at ERROR level through the
    // `log` crate; our own errors carry the cause, so its records are shown only on request.
    let default = match verbose {
        0 => "warn,tss_esapi=off",
        1 => "info,tss_esapi=off",
        _ => "debug",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("DEVID_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .try_init();
}
