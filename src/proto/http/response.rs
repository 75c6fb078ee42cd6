//! Responses the front door writes: plain error/status answers (always closing the
//! connection) and the `101 Switching Protocols` of a successful upgrade.
//!
//! Header names and values are checked when added: a value that could end a line (CR, LF)
//! or contain other control bytes is dropped rather than written, so no caller can split
//! a response, whatever string it passes in.

/// A non-`101` HTTP response. [`Response::to_bytes`] adds `Content-Length`,
/// `Connection: close` and `Cache-Control: no-store` itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    /// A response whose body is the short reason text, e.g. `"not found\n"`. The body never
    /// says more than the status does: rejections must not leak tokens or internals.
    pub fn new(status: u16) -> Self {
        let mut body = reason_phrase(status).to_ascii_lowercase();
        body.push('\n');
        Self::text(status, &body)
    }

    /// Appends a header; silently ignored if the name is not a token or the value holds
    /// control bytes (see the module docs).
    pub fn with_header(mut self, name: &str, value: &str) -> Self {
        if is_token(name) && is_field_value(value) {
            self.headers.push((name.to_owned(), value.to_owned()));
        }
        self
    }

    pub fn json(status: u16, body: &[u8]) -> Self {
        Self {
            status,
            headers: vec![("Content-Type".to_owned(), "application/json".to_owned())],
            body: body.to_vec(),
        }
    }

    /// A response with no body and no `Content-Type`, e.g. `204 No Content`.
    pub fn empty(status: u16) -> Self {
        Self {
            status,
            headers: Vec::new(),
            body: Vec::new(),
        }
    }

    pub fn text(status: u16, body: &str) -> Self {
        Self {
            status,
            headers: vec![("Content-Type".to_owned(), "text/plain; charset=utf-8".to_owned())],
            body: body.as_bytes().to_vec(),
        }
    }

    /// The wire bytes. A caller-supplied `Connection` header (the `426` carries
    /// `Connection: Upgrade`) is merged with `close` into one field instead of sending two;
    /// a caller-supplied `Content-Length` is ignored because it is computed here. A `204`
    /// has neither `Content-Length` nor a body (RFC 9110 8.6, 15.3.5): any body is dropped.
    pub fn to_bytes(&self) -> Vec<u8> {
        let informational = self.status == 101;
        let no_content = informational || self.status == 204;
        let mut out = Vec::with_capacity(128 + self.body.len());
        push_line(
            &mut out,
            &format!("HTTP/1.1 {} {}", self.status, reason_phrase(self.status)),
        );
        if !no_content {
            push_line(&mut out, &format!("Content-Length: {}", self.body.len()));
        }
        let has = |name: &str| self.headers.iter().any(|(n, _)| n.eq_ignore_ascii_case(name));
        if !informational && !has("connection") {
            push_line(&mut out, "Connection: close");
        }
        if !has("cache-control") {
            push_line(&mut out, "Cache-Control: no-store");
        }
        for (name, value) in &self.headers {
            // Fields are public, so re-check what with_header would have refused.
            if !is_token(name) || !is_field_value(value) {
                continue;
            }
            if name.eq_ignore_ascii_case("content-length") {
                continue;
            }
            if !informational
                && name.eq_ignore_ascii_case("connection")
                && !value.split(',').any(|t| t.trim().eq_ignore_ascii_case("close"))
            {
                push_line(&mut out, &format!("{name}: {value}, close"));
                continue;
            }
            push_line(&mut out, &format!("{name}: {value}"));
        }
        out.extend_from_slice(b"\r\n");
        if !no_content {
            out.extend_from_slice(&self.body);
        }
        out
    }
}

/// The `101` answer that completes a WebSocket handshake. `protocol` is omitted when `None`
/// (the client offered no subprotocol) or when it is not a valid token; `extensions` (the
/// accepted extension, [`crate::proto::deflate::Agreed::response`]) when `None` or not a
/// valid field value.
pub fn switching_protocols(accept: &str, protocol: Option<&str>, extensions: Option<&str>) -> Vec<u8> {
    let mut out = Vec::with_capacity(160);
    push_line(&mut out, "HTTP/1.1 101 Switching Protocols");
    push_line(&mut out, "Upgrade: websocket");
    push_line(&mut out, "Connection: Upgrade");
    if is_field_value(accept) {
        push_line(&mut out, &format!("Sec-WebSocket-Accept: {accept}"));
    }
    if let Some(p) = protocol.filter(|p| is_token(p)) {
        push_line(&mut out, &format!("Sec-WebSocket-Protocol: {p}"));
    }
    if let Some(e) = extensions.filter(|e| is_field_value(e)) {
        push_line(&mut out, &format!("Sec-WebSocket-Extensions: {e}"));
    }
    out.extend_from_slice(b"\r\n");
    out
}

/// Standard reason phrase; a generic one for codes we never send.
pub fn reason_phrase(status: u16) -> &'static str {
    match status {
        101 => "Switching Protocols",
        200 => "OK",
        201 => "Created",
        202 => "Accepted",
        204 => "No Content",
        301 => "Moved Permanently",
        302 => "Found",
        304 => "Not Modified",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        411 => "Length Required",
        413 => "Content Too Large",
        414 => "URI Too Long",
        415 => "Unsupported Media Type",
        426 => "Upgrade Required",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => match status / 100 {
            1 => "Informational",
            2 => "Success",
            3 => "Redirection",
            4 => "Client Error",
            _ => "Server Error",
        },
    }
}

fn push_line(out: &mut Vec<u8>, line: &str) {
    out.extend_from_slice(line.as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// RFC 9110 `token` (header names, subprotocol names).
pub(super) fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes().all(|b| {
            b.is_ascii_alphanumeric()
                || matches!(
                    b,
                    b'!' | b'#'
                        | b'$'
                        | b'%'
                        | b'&'
                        | b'\''
                        | b'*'
                        | b'+'
                        | b'-'
                        | b'.'
                        | b'^'
                        | b'_'
                        | b'`'
                        | b'|'
                        | b'~'
                )
        })
}

/// Printable ASCII, space and tab only: nothing that could end or corrupt a header line.
fn is_field_value(s: &str) -> bool {
    s.bytes().all(|b| b == b'\t' || (0x20..0x7f).contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(r: &Response) -> String {
        String::from_utf8(r.to_bytes()).unwrap()
    }

    #[test]
    fn new_has_reason_body() {
        let r = Response::new(404);
        assert_eq!(r.body, b"not found\n");
        assert_eq!(
            text(&r),
            "HTTP/1.1 404 Not Found\r\nContent-Length: 10\r\nConnection: close\r\n\
             Cache-Control: no-store\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nnot found\n"
        );
        assert_eq!(Response::new(426).body, b"upgrade required\n");
        assert_eq!(Response::new(999).body, b"server error\n");
    }

    #[test]
    fn json_and_extra_headers() {
        let r = Response::json(200, br#"{"ticket":"t","expires_in":30}"#).with_header("Retry-After", "1");
        let s = text(&r);
        assert!(s.starts_with("HTTP/1.1 200 OK\r\nContent-Length: 30\r\n"));
        assert!(s.contains("\r\nContent-Type: application/json\r\n"));
        assert!(s.contains("\r\nRetry-After: 1\r\n"));
        assert!(s.ends_with("\r\n\r\n{\"ticket\":\"t\",\"expires_in\":30}"));
    }

    #[test]
    fn connection_header_is_merged_with_close() {
        let r = Response::new(426)
            .with_header("Upgrade", "websocket")
            .with_header("Connection", "Upgrade");
        let s = text(&r);
        assert_eq!(s.matches("Connection:").count(), 1);
        assert!(s.contains("\r\nConnection: Upgrade, close\r\n"));
        assert!(s.contains("\r\nUpgrade: websocket\r\n"));
    }

    #[test]
    fn response_splitting_is_impossible() {
        let r = Response::new(400)
            .with_header("X-A", "v\r\nSet-Cookie: x")
            .with_header("X-B\r\n", "v")
            .with_header("", "v")
            .with_header("X-C", "ok");
        assert_eq!(r.headers.len(), 2); // Content-Type + X-C
        let mut r = r;
        r.headers.push(("X-D".into(), "a\nb".into()));
        r.headers.push(("Content-Length".into(), "999".into()));
        let s = text(&r);
        assert!(!s.contains("X-D"));
        assert!(!s.contains("999"));
        assert_eq!(s.matches("\r\n\r\n").count(), 1);
    }

    #[test]
    fn no_content_has_no_length_and_no_body() {
        let s = text(&Response::empty(204).with_header("Vary", "Origin"));
        assert_eq!(
            s,
            "HTTP/1.1 204 No Content\r\nConnection: close\r\nCache-Control: no-store\r\nVary: Origin\r\n\r\n"
        );
        let mut r = Response::text(204, "ignored\n");
        r.headers.clear();
        assert!(text(&r).ends_with("Cache-Control: no-store\r\n\r\n"));
    }

    #[test]
    fn cache_control_not_duplicated() {
        let s = text(&Response::new(200).with_header("Cache-Control", "max-age=0"));
        assert_eq!(s.matches("Cache-Control").count(), 1);
    }

    #[test]
    fn switching_protocols_bytes() {
        let b = switching_protocols("s3pPLMBiTxaQ9kYGzzhZRbK+xOo=", Some("md.v1.json"), None);
        assert_eq!(
            String::from_utf8(b).unwrap(),
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\nSec-WebSocket-Protocol: md.v1.json\r\n\r\n"
        );
        let b = String::from_utf8(switching_protocols(
            "abc=",
            None,
            Some("permessage-deflate\r\nEvil: 1"),
        ))
        .unwrap();
        assert!(!b.contains("Sec-WebSocket-Protocol") && !b.contains("Evil") && !b.contains("Extensions"));
        let b = String::from_utf8(switching_protocols("abc=", None, Some("permessage-deflate"))).unwrap();
        assert!(b.ends_with("Sec-WebSocket-Extensions: permessage-deflate\r\n\r\n"));
        let b = String::from_utf8(switching_protocols("abc=", Some("x\r\nEvil: 1"), None)).unwrap();
        assert!(!b.contains("Evil"));
    }
}
