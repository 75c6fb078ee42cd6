//! Full TLS 1.3 handshakes per second per core, in memory (issue 7's target: at least
//! 2,000/s per core including token verification).
//!
//! A rustls client and the server's real `ServerConfig` (`tickgate::tls`, ring provider,
//! tickets on) are pumped through `Vec`s: no sockets, no io_uring, only the cryptography
//! and the state machines. The client has resumption disabled, so every iteration is a full
//! handshake (X25519 key exchange, a certificate signature, two session tickets issued);
//! each iteration also runs one `Verifier::verify` of an EdDSA token, as the gate does once
//! per upgrade.
//!
//! Figures:
//! - `pair`: client and server together on one thread (wall clock and thread CPU clock);
//! - `server side [cpu]`: only the thread CPU time spent in the server's calls and the token
//!   verification: what one shard core pays per accepted connection. This is the figure for
//!   the per-core target; handshakes/s = 1 / time per iteration.
//!
//! The machine is shared with other jobs; the CPU-clock figures exclude descheduled time.
//!
//! First run (2-core shared VM, release): server side [cpu] 208 us/handshake with a P-256
//! certificate (about 4,800 full handshakes + token verifications per second per core),
//! 222 us with Ed25519 (about 4,500/s); client and server together 540 us (P-256) and
//! 432 us (Ed25519) of CPU.

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use rustls::client::Resumption;
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection, ServerConfig, ServerConnection};
use tickgate::auth::jwt::{Verifier, VerifyPolicy};
use tickgate::auth::keys::KeySet;
use tickgate::auth::mint::{self, Claims};

#[path = "support/cpu_time.rs"]
mod cpu_time;
use cpu_time::thread_cpu_time;

struct Setup {
    server: Arc<ServerConfig>,
    client: Arc<ClientConfig>,
    verifier: Verifier,
    token: String,
    now: u64,
}

fn setup(alg: &'static rcgen::SignatureAlgorithm) -> Setup {
    let key = rcgen::KeyPair::generate_for(alg).expect("key");
    let params = rcgen::CertificateParams::new(vec!["localhost".to_string()]).expect("params");
    let cert = params.self_signed(&key).expect("cert");
    let server = tickgate::tls::server_config_from_pem(cert.pem().as_bytes(), key.serialize_pem().as_bytes())
        .expect("server config");
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert.der().clone()).expect("root");
    let mut client = ClientConfig::builder_with_provider(tickgate::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    client.resumption = Resumption::disabled();
    client.alpn_protocols = vec![b"http/1.1".to_vec()];

    let sk = mint::generate_signing_key().expect("signing key");
    let mut ks = KeySet::new();
    ks.insert("k1", sk.verifying_key()).expect("kid");
    let now = 1_900_000_000;
    let claims = Claims {
        sub: "alice".into(),
        exp: now + 300,
        iat: Some(now),
        sid: Some("s-1".into()),
        roles: vec!["subscriber".into()],
        symbols: vec!["BTC-*".into(), "ETH-USD".into()],
        ..Claims::default()
    };
    Setup {
        server,
        client: Arc::new(client),
        verifier: Verifier::new(ks, VerifyPolicy::default()),
        token: mint::sign_token(&sk, "k1", &claims),
        now,
    }
}

/// One full handshake plus one token verification; returns the server side's CPU time.
fn handshake(s: &Setup) -> Duration {
    let name = ServerName::try_from("localhost").expect("name");
    let mut client = ClientConnection::new(s.client.clone(), name).expect("client");
    let mut server_time = Duration::ZERO;
    let t0 = thread_cpu_time();
    let mut server = ServerConnection::new(s.server.clone()).expect("server");
    server_time += thread_cpu_time() - t0;
    let mut c2s = Vec::with_capacity(2048);
    let mut s2c = Vec::with_capacity(4096);
    loop {
        while client.wants_write() {
            client.write_tls(&mut c2s).expect("client write");
        }
        if !c2s.is_empty() {
            let t0 = thread_cpu_time();
            let mut rd = &c2s[..];
            while !rd.is_empty() {
                server.read_tls(&mut rd).expect("server read");
                server.process_new_packets().expect("server process");
            }
            while server.wants_write() {
                server.write_tls(&mut s2c).expect("server write");
            }
            server_time += thread_cpu_time() - t0;
            c2s.clear();
        }
        if !s2c.is_empty() {
            let mut rd = &s2c[..];
            while !rd.is_empty() {
                client.read_tls(&mut rd).expect("client read");
                client.process_new_packets().expect("client process");
            }
            s2c.clear();
        }
        if !client.is_handshaking()
            && !server.is_handshaking()
            && !client.wants_write()
            && !server.wants_write()
        {
            break;
        }
    }
    let t0 = thread_cpu_time();
    black_box(s.verifier.verify(&s.token, s.now).expect("token"));
    server_time += thread_cpu_time() - t0;
    server_time
}

fn bench(c: &mut Criterion) {
    for (label, alg) in [
        ("p256", &rcgen::PKCS_ECDSA_P256_SHA256),
        ("ed25519", &rcgen::PKCS_ED25519),
    ] {
        let s = setup(alg);
        c.bench_function(&format!("tls13 full handshake + verify, {label}: pair"), |b| {
            b.iter(|| handshake(&s))
        });
        c.bench_function(
            &format!("tls13 full handshake + verify, {label}: pair [cpu]"),
            |b| {
                b.iter_custom(|iters| {
                    let start = thread_cpu_time();
                    for _ in 0..iters {
                        black_box(handshake(&s));
                    }
                    thread_cpu_time() - start
                })
            },
        );
        c.bench_function(
            &format!("tls13 full handshake + verify, {label}: server side [cpu]"),
            |b| b.iter_custom(|iters| (0..iters).map(|_| handshake(&s)).sum()),
        );
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20).measurement_time(Duration::from_secs(4));
    targets = bench
}
criterion_main!(benches);
