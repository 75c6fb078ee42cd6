//! Feeds arbitrary bytes through a Decoder with small limits, split into reads of a size
//! taken from the first input byte, exactly as the connection pump would. Besides "never
//! panics" it checks that the split does not change the outcome (same messages, same error).

#![no_main]

use libfuzzer_sys::fuzz_target;
use tickgate::proto::frame::{Decoder, DecoderConfig, Incoming, ProtocolError};

fn run(data: &[u8], chunk: usize) -> Vec<Result<Incoming, ProtocolError>> {
    let cfg = DecoderConfig {
        max_message_bytes: 512,
        max_frame_bytes: 256,
    };
    let mut dec = Decoder::new(cfg);
    let mut buf: Vec<u8> = Vec::new();
    let mut out = Vec::new();
    for piece in data.chunks(chunk.max(1)) {
        buf.extend_from_slice(piece);
        loop {
            match dec.decode(&mut buf) {
                Ok((n, msg)) => {
                    assert!(n <= buf.len(), "consumed more than given");
                    buf.drain(..n);
                    if let Some(m) = msg {
                        if let Incoming::Text(t) = &m {
                            assert!(std::str::from_utf8(t).is_ok());
                        }
                        out.push(Ok(m));
                    }
                    if n == 0 {
                        break;
                    }
                }
                Err(e) => {
                    let _ = e.close_code();
                    out.push(Err(e));
                    return out;
                }
            }
        }
        // A frame never needs more than limit + header bytes of buffer.
        assert!(buf.len() <= 256 + 14 + chunk.max(1));
    }
    out
}

fuzz_target!(|data: &[u8]| {
    let Some((&first, rest)) = data.split_first() else {
        return;
    };
    let split = run(rest, usize::from(first % 32) + 1);
    let whole = run(rest, rest.len().max(1));
    assert_eq!(split, whole);
});
