//! Echo server for the Autobahn conformance suite (tools/autobahn.sh).
//!
//! Built from tickgate's own pieces: the monoio runtime on io_uring, the sans-IO HTTP
//! upgrade parser (`proto::http`) and the RFC 6455 codec (`proto::frame`). It is an example
//! binary, so it is never reachable from a production configuration: it has no
//! authentication and echoes whatever it is sent. permessage-deflate (`proto::deflate`) is
//! accepted when offered (Autobahn cases 12 and 13), with a 15-bit window at level 6.
//!
//! Usage: `cargo run --release --example autobahn_echo -- 127.0.0.1:9001`

use monoio::io::{AsyncReadRent, AsyncWriteRentExt};
use monoio::net::{TcpListener, TcpStream};
use tickgate::proto::deflate::{DeflateConfig, Deflater, negotiate};
use tickgate::proto::frame::{
    Decoder, DecoderConfig, Incoming, OpCode, encode_close, encode_deflated_into, encode_frame,
};
use tickgate::proto::http::{self, RequestLimits};

const LIMIT: usize = 64 * 1024 * 1024;

async fn write(stream: &mut TcpStream, bytes: Vec<u8>) -> bool {
    let (res, _) = stream.write_all(bytes).await;
    res.is_ok()
}

async fn serve(mut stream: TcpStream) {
    let _ = stream.set_nodelay(true);
    let mut inbuf: Vec<u8> = Vec::with_capacity(64 * 1024);
    // HTTP phase.
    let limits = RequestLimits::default();
    let deflate_cfg = DeflateConfig {
        level: 6,
        window_bits: 15,
    };
    let (consumed, agreed) = loop {
        let (res, chunk) = stream.read(vec![0u8; 16 * 1024]).await;
        let n = match res {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        inbuf.extend_from_slice(&chunk[..n]);
        match http::try_parse(&inbuf, &limits) {
            Ok(Some((consumed, req))) => match http::check_upgrade(&req) {
                Ok(up) => {
                    let agreed = negotiate(req.headers_all("sec-websocket-extensions"), &deflate_cfg);
                    let ext = agreed.map(|a| a.response());
                    if !write(
                        &mut stream,
                        http::switching_protocols(&up.accept, None, ext.as_deref()),
                    )
                    .await
                    {
                        return;
                    }
                    break (consumed, agreed);
                }
                Err(resp) => {
                    let _ = write(&mut stream, resp.to_bytes()).await;
                    return;
                }
            },
            Ok(None) => continue,
            Err(e) => {
                let _ = write(&mut stream, e.response().to_bytes()).await;
                return;
            }
        }
    };
    inbuf.drain(..consumed);
    let mut decoder = Decoder::new(DecoderConfig {
        max_message_bytes: LIMIT,
        max_frame_bytes: LIMIT,
    });
    let mut deflater = agreed.map(|a| {
        decoder = std::mem::replace(&mut decoder, Decoder::new(DecoderConfig::default()))
            .with_inflate(a.client_window_bits, a.client_no_context_takeover);
        Deflater::for_server(&a, &deflate_cfg)
    });
    let mut data = |op: OpCode, payload: &[u8], out: &mut Vec<u8>| match deflater.as_mut() {
        Some(d) => encode_deflated_into(d, op, payload, out),
        None => out.extend_from_slice(&encode_frame(op, payload)),
    };
    let mut out: Vec<u8> = Vec::new();
    loop {
        let mut off = 0;
        let mut close = None;
        loop {
            match decoder.decode(&mut inbuf[off..]) {
                Ok((0, _)) => break,
                Ok((n, msg)) => {
                    off += n;
                    match msg {
                        Some(Incoming::Text(t)) => data(OpCode::Text, &t, &mut out),
                        Some(Incoming::Binary(b)) => data(OpCode::Binary, &b, &mut out),
                        Some(Incoming::Ping(p)) => out.extend_from_slice(&encode_frame(OpCode::Pong, &p)),
                        Some(Incoming::Pong(_)) | None => {}
                        Some(Incoming::Close(c)) => {
                            close = Some(c.map(|(code, _)| code).unwrap_or(1000));
                            break;
                        }
                    }
                }
                Err(e) => {
                    close = Some(e.close_code());
                    break;
                }
            }
        }
        inbuf.drain(..off);
        if let Some(code) = close {
            out.extend_from_slice(&encode_close(code, ""));
            let _ = write(&mut stream, std::mem::take(&mut out)).await;
            return;
        }
        if !out.is_empty() && !write(&mut stream, std::mem::take(&mut out)).await {
            return;
        }
        let (res, chunk) = stream.read(vec![0u8; 64 * 1024]).await;
        let n = match res {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        inbuf.extend_from_slice(&chunk[..n]);
    }
}

fn main() {
    let addr = std::env::args().nth(1).unwrap_or_else(|| "127.0.0.1:9001".into());
    let mut rt = monoio::RuntimeBuilder::<monoio::FusionDriver>::new()
        .enable_timer()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let listener = TcpListener::bind(&addr).expect("bind");
        println!(
            "autobahn echo listening on {}",
            listener.local_addr().expect("addr")
        );
        loop {
            if let Ok((stream, _)) = listener.accept().await {
                monoio::spawn(serve(stream));
            }
        }
    });
}
