//! Publishes messages to NATS, as a feed handler does for each tick with `[cluster]`
//! (docs/CLUSTER.md): one tick object per message on `<prefix>.in.<SYMBOL>`.
//!
//! ```sh
//! cargo run --release --example nats_pub -- tickgate.in.BTC-USD \
//!     '{"s":"BTC-USD","ts":1,"bid":1,"ask":2,"last":1.5,"qty":1}'
//! ```
//!
//! `--url nats://host:port` picks the server (default `nats://127.0.0.1:4222`). Every
//! argument after the subject is one message; with none, each line of stdin is one. The
//! messages are flushed to the server before it exits (0, or 1 with the error on stderr).
//! `tools/cluster.sh --check` uses it.

use std::io::BufRead;

fn usage() -> ! {
    eprintln!(
        "usage: nats_pub [--url nats://host:port] SUBJECT [PAYLOAD...]  (no PAYLOAD: one per stdin line)"
    );
    std::process::exit(2);
}

fn main() {
    let mut args = std::env::args().skip(1).peekable();
    let mut url = "nats://127.0.0.1:4222".to_owned();
    if args.peek().map(String::as_str) == Some("--url") {
        args.next();
        url = args.next().unwrap_or_else(|| usage());
    }
    let Some(subject) = args.next() else { usage() };
    if subject.starts_with('-') {
        usage();
    }
    let mut payloads: Vec<String> = args.collect();
    if payloads.is_empty() {
        payloads = std::io::stdin()
            .lock()
            .lines()
            .map_while(Result::ok)
            .filter(|l| !l.is_empty())
            .collect();
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let sent = rt.block_on(async {
        let client = async_nats::connect(url.as_str())
            .await
            .map_err(|e| format!("{url}: {e}"))?;
        for p in &payloads {
            client
                .publish(subject.clone(), p.clone().into())
                .await
                .map_err(|e| e.to_string())?;
        }
        client.flush().await.map_err(|e| e.to_string())?;
        Ok::<usize, String>(payloads.len())
    });
    match sent {
        Ok(n) => eprintln!("nats_pub: {n} message(s) to {subject} on {url}"),
        Err(e) => {
            eprintln!("nats_pub: {e}");
            std::process::exit(1);
        }
    }
}
