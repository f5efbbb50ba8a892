//! The hub's thread: the hub runs on a current-thread runtime of its own, supervised.
//!
//! Owns: starting that thread and stopping the process if it ends before shutdown (a relay
//! without its hub would accept clients and deliver nothing).
//! Must not: fan out or subscribe (the hub does); it only runs it.

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use super::Hub;
use crate::server::shutdown;
use crate::Error;

/// Run the hub on a thread of its own. On the shared runtime it waited in the run queue
/// behind the connection tasks it had just woken (10,000 of them per message at worst), and
/// fred's message buffer overflowed meanwhile: in a 1,000 channels × 10 subscribers run at
/// full rate, 15,904 messages were lost to `redis_lagged` in the first burst.
/// With more than one core, the connections' runtime helps with large direct fan-outs.
pub(crate) fn spawn(
    hub: Arc<Hub>,
    subscriber: fred::clients::SubscriberClient,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    let helper = (cores > 1)
        .then(tokio::runtime::Handle::try_current)
        .and_then(Result::ok);
    supervise("lightrelay-hub", shutdown.clone(), move || {
        runtime.block_on(hub.run(subscriber, shutdown, helper));
    })?;
    Ok(())
}

/// Run `body` on a thread named `name`; if it ends (returns or panics) before `shutdown`,
/// the process stops with exit code 1 (`shutdown::fatal`): without its hub, a subscribe
/// server would accept clients and deliver nothing.
fn supervise(
    name: &str,
    shutdown: CancellationToken,
    body: impl FnOnce() + Send + 'static,
) -> std::io::Result<()> {
    let thread = name.to_string();
    std::thread::Builder::new()
        .name(thread.clone())
        .spawn(move || {
            let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(body));
            if !shutdown.is_cancelled() {
                let why = match outcome {
                    Ok(()) => format!("{thread} stopped (Redis's message stream closed)"),
                    Err(_) => format!("{thread} panicked"),
                };
                shutdown::fatal(&shutdown, why);
            }
        })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// A hub thread that panics, or returns, stops the process (exit 1), not silently.
    #[test]
    fn a_hub_that_stops_stops_the_process() {
        for (name, body) in [
            (
                "panicking",
                Box::new(|| panic!("a bug")) as Box<dyn FnOnce() + Send>,
            ),
            ("returning", Box::new(|| {})),
        ] {
            let token = CancellationToken::new();
            supervise(name, token.clone(), body).unwrap();
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while !token.is_cancelled() {
                assert!(std::time::Instant::now() < deadline, "{name}: not stopped");
                std::thread::sleep(Duration::from_millis(5));
            }
            let why = shutdown::failure().expect("a failure reason");
            assert!(why.contains("panicking panicked"), "{why}");
        }
    }

    /// At shutdown the hub's end is expected: nothing is reported.
    #[test]
    fn a_hub_that_ends_at_shutdown_is_not_a_failure() {
        let token = CancellationToken::new();
        token.cancel();
        let (done, ended) = std::sync::mpsc::channel();
        supervise("at-shutdown", token, move || done.send(()).unwrap()).unwrap();
        ended.recv().unwrap();
        std::thread::sleep(Duration::from_millis(50));
        assert!(shutdown::failure().is_none_or(|why| !why.contains("at-shutdown")));
    }
}
