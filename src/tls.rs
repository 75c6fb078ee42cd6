//! TLS for the public listener: the `[tls]` certificate and key, turned into a rustls
//! `ServerConfig` that can be swapped while the server runs.
//!
//! rustls is used as the sans-IO state machine it is: each connection holds a
//! `rustls::ServerConnection`; the connection pump (`rt::conn`) feeds it the bytes it
//! received, reads plaintext out of it for the HTTP parser and the frame decoder, and asks it
//! for ciphertext after the writer has drained the session's queue. No TLS stream wrapper
//! sits between monoio and the socket, so the reader/writer split, the shared read buffer
//! and the encode-once fan-out work unchanged; only the encryption is per connection.
//!
//! ## Policy
//! - TLS 1.3 and 1.2 with the ring provider's default suites (AEAD only: AES-GCM and
//!   ChaCha20-Poly1305, ECDHE key exchange; no CBC, no RSA key transport).
//! - ALPN `http/1.1` (a client that offers ALPN without it is refused by rustls).
//! - Session resumption: stateless tickets (ring's rotating ticketer) and a server-side
//!   session cache. Both are created once and carried over every reload, so a reload does
//!   not invalidate the tickets clients hold.
//!
//! ## Reload
//! [`TlsState`] keeps the current `Arc<ServerConfig>` behind an `RwLock`; a handshake clones
//! the `Arc` when it starts, so a reload never affects a connection already accepted. A
//! reload (SIGHUP, or the file watcher `rt::tls_watch` that polls mtime and length) builds the new config
//! aside; when the new files do not parse or the key does not match the certificate, the
//! error is returned and logged and the old config stays in force.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use rustls::ServerConfig;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ProducesTickets, ServerSessionMemoryCache, StoresServerSessions};

use crate::config::TlsConfig;

/// How often the watcher thread looks at the certificate and key files.
pub const WATCH_INTERVAL: Duration = Duration::from_secs(2);

/// Server-side session cache entries (TLS 1.2 session ids; TLS 1.3 resumes with tickets).
const SESSION_CACHE_ENTRIES: usize = 4096;

/// What identifies one version of a file on disk for the watcher.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct FileStamp {
    modified: Option<SystemTime>,
    len: u64,
}

fn stamp(p: &Path) -> Option<FileStamp> {
    let m = std::fs::metadata(p).ok()?;
    Some(FileStamp {
        modified: m.modified().ok(),
        len: m.len(),
    })
}

/// The ring provider, shared by every config this module builds.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Parse a PEM certificate chain (leaf first).
pub fn parse_chain(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, String> {
    let chain = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("bad PEM certificate: {e}"))?;
    if chain.is_empty() {
        return Err("no CERTIFICATE block found".into());
    }
    Ok(chain)
}

/// Parse a PEM private key: PKCS#8, PKCS#1 (RSA) or SEC1 (EC), the first one found.
pub fn parse_key(pem: &[u8]) -> Result<PrivateKeyDer<'static>, String> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|e| format!("bad PEM private key: {e}"))
}

/// The state that survives reloads: resumption secrets.
struct Resumption {
    ticketer: Arc<dyn ProducesTickets>,
    cache: Arc<dyn StoresServerSessions + Send + Sync>,
}

fn build(
    provider: &Arc<CryptoProvider>,
    res: &Resumption,
    cert_pem: &[u8],
    key_pem: &[u8],
) -> Result<ServerConfig, String> {
    let chain = parse_chain(cert_pem).map_err(|e| format!("tls.cert: {e}"))?;
    let key = parse_key(key_pem).map_err(|e| format!("tls.key: {e}"))?;
    let mut cfg = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| format!("tls: {e}"))?
        .with_no_client_auth()
        // Also checks that the key belongs to the leaf certificate.
        .with_single_cert(chain, key)
        .map_err(|e| format!("tls: certificate/key: {e}"))?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    cfg.ticketer = res.ticketer.clone();
    cfg.session_storage = res.cache.clone();
    Ok(cfg)
}

/// Build a `ServerConfig` from PEM bytes with a fresh ticketer and cache (benches, tests).
pub fn server_config_from_pem(cert_pem: &[u8], key_pem: &[u8]) -> Result<Arc<ServerConfig>, String> {
    let res = Resumption {
        ticketer: rustls::crypto::ring::Ticketer::new().map_err(|e| format!("tls ticketer: {e}"))?,
        cache: ServerSessionMemoryCache::new(SESSION_CACHE_ENTRIES),
    };
    build(&provider(), &res, cert_pem, key_pem).map(Arc::new)
}

/// The public listener's TLS configuration, reloadable while serving.
pub struct TlsState {
    cert: PathBuf,
    key: PathBuf,
    provider: Arc<CryptoProvider>,
    resumption: Resumption,
    current: RwLock<Arc<ServerConfig>>,
    /// What the files looked like at the last load attempt (successful or not): the watcher
    /// retries only after they change again, so a bad file is logged once, not every poll.
    seen: Mutex<(Option<FileStamp>, Option<FileStamp>)>,
    /// Successful reloads since start (the initial load not counted).
    pub reloads: AtomicU64,
    /// Reloads refused because the new files were bad.
    pub reload_failures: AtomicU64,
}

impl TlsState {
    /// Load the files named by `[tls]`; an error names the key (`tls.cert` / `tls.key`).
    pub fn load(cfg: &TlsConfig) -> Result<TlsState, String> {
        let provider = provider();
        let resumption = Resumption {
            ticketer: rustls::crypto::ring::Ticketer::new().map_err(|e| format!("tls ticketer: {e}"))?,
            cache: ServerSessionMemoryCache::new(SESSION_CACHE_ENTRIES),
        };
        let seen = (stamp(&cfg.cert), stamp(&cfg.key));
        let (cert_pem, key_pem) = read_pair(&cfg.cert, &cfg.key)?;
        let sc = build(&provider, &resumption, &cert_pem, &key_pem)?;
        Ok(TlsState {
            cert: cfg.cert.clone(),
            key: cfg.key.clone(),
            provider,
            resumption,
            current: RwLock::new(Arc::new(sc)),
            seen: Mutex::new(seen),
            reloads: AtomicU64::new(0),
            reload_failures: AtomicU64::new(0),
        })
    }

    /// The config new handshakes use.
    pub fn config(&self) -> Arc<ServerConfig> {
        self.current.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// A server-side TLS state machine for a freshly accepted socket.
    pub fn accept(&self) -> Result<rustls::ServerConnection, rustls::Error> {
        rustls::ServerConnection::new(self.config())
    }

    /// Re-read the files and swap the config. On error the old config stays in force.
    pub fn reload(&self) -> Result<(), String> {
        let seen = (stamp(&self.cert), stamp(&self.key));
        *self.seen.lock().unwrap_or_else(|p| p.into_inner()) = seen;
        let built = read_pair(&self.cert, &self.key)
            .and_then(|(c, k)| build(&self.provider, &self.resumption, &c, &k));
        match built {
            Ok(sc) => {
                *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(sc);
                self.reloads.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            Err(e) => {
                self.reload_failures.fetch_add(1, Ordering::Relaxed);
                Err(e)
            }
        }
    }

    /// Reload when either file changed (mtime or length) since the last attempt. `None`
    /// when nothing changed.
    pub fn reload_if_changed(&self) -> Option<Result<(), String>> {
        let now = (stamp(&self.cert), stamp(&self.key));
        if *self.seen.lock().unwrap_or_else(|p| p.into_inner()) == now {
            return None;
        }
        Some(self.reload())
    }

    /// Reload and log the outcome (SIGHUP and the watcher).
    pub fn reload_logged(&self, why: &str) {
        match self.reload() {
            Ok(()) => tracing::info!(cert = %self.cert.display(), why, "TLS certificate reloaded"),
            Err(e) => tracing::error!(
                error = %e,
                why,
                "TLS reload failed, keeping the previous certificate"
            ),
        }
    }
}

fn read_pair(cert: &Path, key: &Path) -> Result<(Vec<u8>, Vec<u8>), String> {
    let c = std::fs::read(cert).map_err(|e| format!("tls.cert: {}: {e}", cert.display()))?;
    let k = std::fs::read(key).map_err(|e| format!("tls.key: {}: {e}", key.display()))?;
    Ok((c, k))
}

/// A client configuration trusting the PEM certificates in `ca` (ring provider, TLS 1.3 and
/// 1.2, ALPN `http/1.1`): for the demo client and the load generator.
pub fn client_config_from_ca_file(ca: &std::path::Path) -> Result<Arc<rustls::ClientConfig>, String> {
    let pem = std::fs::read(ca).map_err(|e| format!("{}: {e}", ca.display()))?;
    let mut roots = rustls::RootCertStore::empty();
    for c in parse_chain(&pem).map_err(|e| format!("{}: {e}", ca.display()))? {
        roots.add(c).map_err(|e| format!("{}: {e}", ca.display()))?;
    }
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(name: &str) -> (String, String) {
        let ck = rcgen::generate_simple_self_signed(vec![name.to_string()]).unwrap();
        (ck.cert.pem(), ck.signing_key.serialize_pem())
    }

    #[test]
    fn builds_from_pem_and_refuses_garbage() {
        let (c, k) = pair("localhost");
        let sc = server_config_from_pem(c.as_bytes(), k.as_bytes()).unwrap();
        assert_eq!(sc.alpn_protocols, vec![b"http/1.1".to_vec()]);
        assert!(sc.ticketer.enabled());
        assert!(server_config_from_pem(b"garbage", k.as_bytes()).is_err());
        assert!(server_config_from_pem(c.as_bytes(), b"garbage").is_err());
        // A key that is not the certificate's.
        let (_, other) = pair("localhost");
        let e = server_config_from_pem(c.as_bytes(), other.as_bytes()).unwrap_err();
        assert!(e.contains("certificate/key"), "{e}");
    }

    #[test]
    fn reload_swaps_and_a_bad_file_keeps_the_old_config() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = TlsConfig {
            cert: dir.path().join("c.pem"),
            key: dir.path().join("k.pem"),
        };
        let (c, k) = pair("a.test");
        std::fs::write(&cfg.cert, &c).unwrap();
        std::fs::write(&cfg.key, &k).unwrap();
        let st = TlsState::load(&cfg).unwrap();
        assert!(st.reload_if_changed().is_none());
        let first = st.config();
        std::fs::write(&cfg.cert, "not a certificate").unwrap();
        assert!(st.reload_if_changed().unwrap().is_err());
        assert!(Arc::ptr_eq(&first, &st.config()), "old config stays");
        // Unchanged bad file: no retry (logged once).
        assert!(st.reload_if_changed().is_none());
        let (c2, k2) = pair("b.test");
        std::fs::write(&cfg.key, &k2).unwrap();
        std::fs::write(&cfg.cert, &c2).unwrap();
        st.reload().unwrap();
        assert!(!Arc::ptr_eq(&first, &st.config()));
        assert_eq!(st.reloads.load(Ordering::Relaxed), 1);
        assert_eq!(st.reload_failures.load(Ordering::Relaxed), 1);
    }
}
