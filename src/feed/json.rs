//! JSON string escaping, the one piece of hand-written JSON both the tick encoder
//! ([`super::tick`]) and the server-message encoder ([`super::msg`]) need. A leaf: it
//! imports nothing from the crate, so neither of them has to import the other for it.

/// Appends `s` as a JSON string literal (quotes included), escaping what RFC 8259 requires.
pub fn write_json_str(s: &str, out: &mut Vec<u8>) {
    out.push(b'"');
    let b = s.as_bytes();
    let mut start = 0;
    for (i, &c) in b.iter().enumerate() {
        let esc: &[u8] = match c {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            0x08 => b"\\b",
            0x0c => b"\\f",
            0..=0x1f => {
                out.extend_from_slice(b.get(start..i).unwrap_or_default());
                const HEX: &[u8; 16] = b"0123456789abcdef";
                out.extend_from_slice(b"\\u00");
                out.push(HEX[usize::from(c >> 4)]);
                out.push(HEX[usize::from(c & 0xf)]);
                start = i + 1;
                continue;
            }
            _ => continue,
        };
        out.extend_from_slice(b.get(start..i).unwrap_or_default());
        out.extend_from_slice(esc);
        start = i + 1;
    }
    out.extend_from_slice(b.get(start..).unwrap_or_default());
    out.push(b'"');
}
