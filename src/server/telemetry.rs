//! Logging set-up: `tracing` to stderr, filtered by `RUST_LOG` (default `info`), as text or JSON.
//!
//! Owns: the global subscriber. Must not: be called twice, or log message payloads.

use tracing_subscriber::EnvFilter;

use crate::server::config::LogFormat;

pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
