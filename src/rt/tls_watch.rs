//! The `[tls]` file watcher: a thread that polls the certificate and key (mtime and
//! length, [`crate::tls::TlsState::reload_if_changed`]) and swaps the config when they
//! change. The decisions live in [`crate::tls`]; this is only the thread and its sleep.

use std::sync::Weak;
use std::time::Duration;

use crate::state::Shared;

/// Start the thread that polls the certificate and key files every `interval` and reloads
/// when they change. It holds only a weak reference and ends when the server state is gone.
pub fn spawn(shared: Weak<Shared>, interval: Duration) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("tickgate-tls-watch".into())
        .spawn(move || {
            loop {
                std::thread::sleep(interval);
                let Some(shared) = shared.upgrade() else { return };
                let Some(tls) = shared.tls.as_ref() else { return };
                match tls.reload_if_changed() {
                    None => {}
                    Some(Ok(())) => tracing::info!("TLS files changed on disk: certificate reloaded"),
                    Some(Err(e)) => tracing::error!(
                        error = %e,
                        "TLS files changed on disk but do not load; keeping the previous certificate"
                    ),
                }
            }
        })
}
