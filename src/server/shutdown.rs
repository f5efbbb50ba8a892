//! Process life signals: SIGTERM/SIGINT in, systemd notifications out.
//!
//! Owns: turning the first SIGTERM or SIGINT into the cancellation of the shutdown token every
//! task watches, and telling systemd `READY=1` (once the listener is bound) and `STOPPING=1`.
//! Owns too: the process's fatal failure ([`fatal`]): a part the server cannot work without
//! (the subscribe server's hub) stopped, so the server stops gracefully and exits 1, and
//! systemd (`Restart=on-failure`) starts it again. A relay that keeps accepting clients it
//! can deliver nothing to, while its health check stays green, is the failure we must not
//! have.
//! Must not: close connections itself; each session sees the token and closes with 1001.

use std::sync::Mutex;

use sd_notify::NotifyState;
use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;

/// Cancel `token` at the first SIGTERM or SIGINT.
pub async fn on_signal(token: CancellationToken) {
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers; stop with SIGKILL");
        return;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = int.recv() => tracing::info!("SIGINT received"),
    }
    token.cancel();
}

/// Call `reload` at every SIGHUP (the units' `ExecReload`), until shutdown.
pub(crate) async fn on_hangup(shutdown: CancellationToken, reload: impl Fn()) {
    let Ok(mut hup) = signal(SignalKind::hangup()) else {
        tracing::error!("cannot install the SIGHUP handler; keys are re-read only at a restart");
        return;
    };
    loop {
        tokio::select! {
            received = hup.recv() => match received {
                Some(()) => reload(),
                None => return,
            },
            () = shutdown.cancelled() => return,
        }
    }
}

/// `READY=1` for `Type=notify` units; nothing happens outside systemd.
pub fn notify_ready() {
    if let Err(e) = sd_notify::notify(&[NotifyState::Ready]) {
        tracing::warn!(error = %e, "sd_notify READY=1 failed");
    }
}

pub fn notify_stopping() {
    let _ = sd_notify::notify(&[NotifyState::Stopping]);
}

/// Why the process is stopping on its own, if it is.
static FAILURE: Mutex<Option<String>> = Mutex::new(None);

/// Stop the process because `why` happened: logged, then the same graceful stop as SIGTERM,
/// and exit code 1.
pub(crate) fn fatal(token: &CancellationToken, why: String) {
    tracing::error!(reason = %why, "stopping: a part of the server failed");
    crate::lock(&FAILURE).get_or_insert(why);
    token.cancel();
}

/// The reason given to [`fatal`], if it was called.
pub(crate) fn failure() -> Option<String> {
    crate::lock(&FAILURE).clone()
}
