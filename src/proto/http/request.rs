//! Bounded, incremental request parsing on top of `httparse`.
//!
//! `httparse` does the tokenising (and rejects CR, LF, NUL and other control bytes in
//! names and values); this file adds the limits and the HTTP semantics we rely on for
//! security: one `Content-Length`, no `Transfer-Encoding`, a required unique `Host`, unique
//! security-relevant headers and an origin-form target with a bounded, strictly decoded query.

/// Most query parameters accepted in one request target.
pub const MAX_QUERY_PARAMS: usize = 32;
/// Longest decoded query parameter name or value, in bytes.
pub const MAX_QUERY_PARAM_BYTES: usize = 4096;

/// Headers that must appear at most once: security decisions read them, and a repeated
/// one would let two components (a proxy, a log, this server) disagree on its value.
const SINGLETON_HEADERS: &[&str] = &[
    "host",
    "authorization",
    "origin",
    "sec-websocket-key",
    "sec-websocket-version",
    "x-device-id",
];

/// Size limits for one request. The defaults exist to keep a malicious client from making
/// us buffer or allocate much before it has authenticated.
#[derive(Clone, Copy, Debug)]
pub struct RequestLimits {
    /// Request line plus headers plus the final empty line, in bytes.
    pub max_head_bytes: usize,
    /// Number of header lines. Exceeding it is reported once the extra line is complete
    /// (that is when httparse looks for a free slot); `max_head_bytes` bounds it anyway.
    pub max_headers: usize,
    /// `Content-Length` ceiling.
    pub max_body_bytes: usize,
}

impl Default for RequestLimits {
    fn default() -> Self {
        Self {
            max_head_bytes: 8192,
            max_headers: 32,
            max_body_bytes: 4096,
        }
    }
}

/// Why a request was refused before routing. Every variant ends the connection; none
/// carries request bytes, so the message is safe to log and to send.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HttpError {
    #[error("malformed request")]
    Malformed,
    #[error("request head too large")]
    HeadTooLarge,
    #[error("too many headers")]
    TooManyHeaders,
    #[error("request body too large")]
    BodyTooLarge,
    #[error("transfer-encoding not supported")]
    UnsupportedTransferEncoding,
    #[error("invalid content-length")]
    BadContentLength,
    #[error("missing or repeated host header")]
    BadHost,
    #[error("repeated {0} header")]
    DuplicateHeader(&'static str),
    #[error("request target must be origin-form")]
    BadTarget,
    #[error("query string too large")]
    QueryTooLarge,
}

impl HttpError {
    /// The status to answer with. Always `400`: the contract says so for header limits,
    /// and for `Transfer-Encoding` we chose `400` over `501` (see the module docs).
    pub fn status(&self) -> u16 {
        400
    }

    /// The response to send before closing the connection.
    pub fn response(&self) -> super::Response {
        super::Response::new(self.status())
    }
}

/// Protocol version of a parsed request (`httparse` accepts only these two).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HttpVersion {
    Http10,
    Http11,
}

/// A complete, validated request head plus its body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub method: String,
    /// Raw path, without the query; not percent-decoded (routing is by exact match).
    pub path: String,
    /// Percent-decoded `name=value` pairs in order; names are unique.
    pub query: Vec<(String, String)>,
    /// Lower-case name, value trimmed of surrounding spaces and tabs.
    headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    version: HttpVersion,
}

impl Request {
    /// First value of a header; `name_lowercase` must be lower case.
    pub fn header(&self, name_lowercase: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name_lowercase)
            .map(|(_, v)| v.as_str())
    }

    /// Every value of a header, in order, for list-valued headers sent on several lines.
    pub fn headers_all<'a>(&'a self, name_lowercase: &'a str) -> impl Iterator<Item = &'a str> {
        self.headers
            .iter()
            .filter(move |(n, _)| n == name_lowercase)
            .map(|(_, v)| v.as_str())
    }

    /// All headers in order, as (lower-case name, value).
    pub fn headers(&self) -> impl Iterator<Item = (&str, &str)> {
        self.headers.iter().map(|(n, v)| (n.as_str(), v.as_str()))
    }

    /// Decoded value of a query parameter.
    pub fn query_param(&self, name: &str) -> Option<&str> {
        self.query
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn version(&self) -> HttpVersion {
        self.version
    }
}

/// Parses one request from the start of `buf`.
///
/// `Ok(None)`: incomplete, call again with more bytes. `Ok(Some((consumed, request)))`:
/// the request used the first `consumed` bytes; anything after belongs to the caller.
/// `Err`: the bytes can no longer form a valid request within `limits` (checked on
/// incomplete input too, so an endless head fails at `max_head_bytes`).
pub fn try_parse(buf: &[u8], limits: &RequestLimits) -> Result<Option<(usize, Request)>, HttpError> {
    // Only ever show httparse the first `max_head_bytes`: a head that has not ended by then
    // is too large whatever follows, and the parse cost stays bounded by the limit.
    let window = buf.get(..limits.max_head_bytes).unwrap_or(buf);
    let mut slots = vec![httparse::EMPTY_HEADER; limits.max_headers];
    let mut parsed = httparse::Request::new(&mut slots);
    let head_len = match parsed.parse(window) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if window.len() >= limits.max_head_bytes => {
            return Err(HttpError::HeadTooLarge);
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(HttpError::TooManyHeaders),
        Err(_) => return Err(HttpError::Malformed),
    };

    let (Some(method), Some(target), Some(minor)) = (parsed.method, parsed.path, parsed.version) else {
        // Complete implies all three are set; treat the impossible as malformed, not a panic.
        return Err(HttpError::Malformed);
    };
    let version = match minor {
        0 => HttpVersion::Http10,
        1 => HttpVersion::Http11,
        _ => return Err(HttpError::Malformed),
    };

    let mut headers = Vec::with_capacity(parsed.headers.len());
    for h in parsed.headers.iter() {
        // httparse already refuses control bytes; re-check so this guarantee does not hinge
        // on a dependency's configuration defaults.
        if h.value.iter().any(|&b| (b < 0x20 && b != b'\t') || b == 0x7f) {
            return Err(HttpError::Malformed);
        }
        let value = std::str::from_utf8(h.value).map_err(|_| HttpError::Malformed)?;
        headers.push((
            h.name.to_ascii_lowercase(),
            value.trim_matches([' ', '\t']).to_owned(),
        ));
    }

    for &name in SINGLETON_HEADERS {
        if headers.iter().filter(|(n, _)| n == name).count() > 1 {
            return Err(if name == "host" {
                HttpError::BadHost
            } else {
                HttpError::DuplicateHeader(name)
            });
        }
    }
    if version == HttpVersion::Http11 && !headers.iter().any(|(n, _)| n == "host") {
        return Err(HttpError::BadHost);
    }
    if headers.iter().any(|(n, _)| n == "transfer-encoding") {
        return Err(HttpError::UnsupportedTransferEncoding);
    }
    let body_len = content_length(&headers, limits.max_body_bytes)?;

    let (path, query) = split_target(target)?;

    let end = head_len.checked_add(body_len).ok_or(HttpError::BodyTooLarge)?;
    let Some(body) = buf.get(head_len..end) else {
        return Ok(None);
    };

    Ok(Some((
        end,
        Request {
            method: method.to_owned(),
            path,
            query,
            headers,
            body: body.to_vec(),
            version,
        },
    )))
}

/// The body length announced by `Content-Length` (0 when absent). Repeated headers or list
/// elements are accepted only when they all agree (RFC 9110 section 8.6).
fn content_length(headers: &[(String, String)], max: usize) -> Result<usize, HttpError> {
    let mut found: Option<usize> = None;
    for (_, value) in headers.iter().filter(|(n, _)| n == "content-length") {
        for element in value.split(',') {
            let n = parse_decimal(element.trim_matches([' ', '\t']), max)?;
            match found {
                Some(prev) if prev != n => return Err(HttpError::BadContentLength),
                _ => found = Some(n),
            }
        }
    }
    Ok(found.unwrap_or(0))
}

/// `1*DIGIT`, nothing else (no sign, no spaces); above `max` is `BodyTooLarge`.
fn parse_decimal(s: &str, max: usize) -> Result<usize, HttpError> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(HttpError::BadContentLength);
    }
    let mut n: usize = 0;
    for b in s.bytes() {
        n = n
            .checked_mul(10)
            .and_then(|n| n.checked_add(usize::from(b - b'0')))
            .ok_or(HttpError::BodyTooLarge)?;
        if n > max {
            return Err(HttpError::BodyTooLarge);
        }
    }
    Ok(n)
}

/// Splits an origin-form target into the raw path and the decoded query.
fn split_target(target: &str) -> Result<(String, Vec<(String, String)>), HttpError> {
    // Absolute-form and `*` are for proxies and OPTIONS; a fragment is never sent on the wire.
    if !target.starts_with('/') || target.contains('#') {
        return Err(HttpError::BadTarget);
    }
    let (path, raw_query) = match target.split_once('?') {
        Some((p, q)) => (p, q),
        None => (target, ""),
    };
    let mut query: Vec<(String, String)> = Vec::new();
    for pair in raw_query.split('&').filter(|p| !p.is_empty()) {
        if query.len() == MAX_QUERY_PARAMS {
            return Err(HttpError::QueryTooLarge);
        }
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        let name = percent_decode(name)?;
        let value = percent_decode(value)?;
        if query.iter().any(|(n, _)| *n == name) {
            return Err(HttpError::Malformed);
        }
        query.push((name, value));
    }
    Ok((path.to_owned(), query))
}

/// RFC 3986 percent-decoding into UTF-8. `+` is left alone on purpose (see module docs).
fn percent_decode(s: &str) -> Result<String, HttpError> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len().min(MAX_QUERY_PARAM_BYTES));
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        if b == b'%' {
            let hi = bytes.get(i + 1).and_then(|&c| hex_value(c));
            let lo = bytes.get(i + 2).and_then(|&c| hex_value(c));
            let (Some(hi), Some(lo)) = (hi, lo) else {
                return Err(HttpError::Malformed);
            };
            out.push(hi << 4 | lo);
            i += 3;
        } else {
            out.push(b);
            i += 1;
        }
        if out.len() > MAX_QUERY_PARAM_BYTES {
            return Err(HttpError::QueryTooLarge);
        }
    }
    String::from_utf8(out).map_err(|_| HttpError::Malformed)
}

fn hex_value(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn lim() -> RequestLimits {
        RequestLimits::default()
    }

    fn parse(s: &str) -> Result<Option<(usize, Request)>, HttpError> {
        try_parse(s.as_bytes(), &lim())
    }

    fn parse_ok(s: &str) -> Request {
        parse(s).unwrap().unwrap().1
    }

    #[test]
    fn simple_get() {
        let raw = "GET /v1/stream?ticket=abc&device=d%2D1 HTTP/1.1\r\nHost: x\r\n\
                   X-Thing:   spaced value \t\r\nX-Thing: second\r\n\r\n";
        let (n, r) = parse(raw).unwrap().unwrap();
        assert_eq!(n, raw.len());
        assert_eq!(r.method, "GET");
        assert_eq!(r.path, "/v1/stream");
        assert_eq!(r.version(), HttpVersion::Http11);
        assert_eq!(r.query_param("ticket"), Some("abc"));
        assert_eq!(r.query_param("device"), Some("d-1"));
        assert_eq!(r.query_param("nope"), None);
        assert_eq!(r.header("x-thing"), Some("spaced value"));
        assert_eq!(
            r.headers_all("x-thing").collect::<Vec<_>>(),
            ["spaced value", "second"]
        );
        assert_eq!(r.header("host"), Some("x"));
        assert!(r.body.is_empty());
        assert_eq!(r.headers().count(), 3);
    }

    #[test]
    fn header_names_are_lowercased() {
        let r = parse_ok("GET / HTTP/1.1\r\nHOST: a\r\nSec-WebSocket-Key: k\r\n\r\n");
        assert_eq!(r.header("sec-websocket-key"), Some("k"));
        assert_eq!(r.header("host"), Some("a"));
    }

    #[test]
    fn body_and_pipelining() {
        let raw = "POST /v1/ticket HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhelloGET / HTTP/1.1\r\n";
        let (n, r) = parse(raw).unwrap().unwrap();
        assert_eq!(&raw[n..], "GET / HTTP/1.1\r\n");
        assert_eq!(r.body, b"hello");
        // Body not all there yet.
        assert_eq!(
            parse("POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhel"),
            Ok(None)
        );
    }

    #[test]
    fn content_length_rules() {
        let base = |cl: &str| format!("POST / HTTP/1.1\r\nHost: x\r\n{cl}\r\n\r\nabc");
        assert_eq!(parse(&base("Content-Length: 3")).unwrap().unwrap().1.body, b"abc");
        assert_eq!(
            parse(&base("Content-Length: 3\r\nContent-Length: 3"))
                .unwrap()
                .unwrap()
                .1
                .body,
            b"abc"
        );
        assert!(parse(&base("Content-Length: 3, 3")).unwrap().is_some());
        assert_eq!(
            parse(&base("Content-Length: 3\r\nContent-Length: 2")),
            Err(HttpError::BadContentLength)
        );
        assert_eq!(
            parse(&base("Content-Length: 3, 2")),
            Err(HttpError::BadContentLength)
        );
        for bad in ["+3", "-3", "3a", "0x3", "", "3 3", "3,"] {
            assert_eq!(
                parse(&base(&format!("Content-Length: {bad}"))),
                Err(HttpError::BadContentLength),
                "{bad:?}"
            );
        }
        assert_eq!(parse(&base("Content-Length: 4097")), Err(HttpError::BodyTooLarge));
        assert_eq!(
            parse(&base("Content-Length: 99999999999999999999999999999")),
            Err(HttpError::BodyTooLarge)
        );
        // The limit is inclusive and is enforced before the body arrives.
        let at_limit = "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 4096\r\n\r\n";
        assert_eq!(parse(at_limit), Ok(None));
    }

    #[test]
    fn transfer_encoding_is_refused() {
        for te in ["chunked", "gzip, chunked", "identity"] {
            let raw = format!("POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: {te}\r\n\r\n");
            assert_eq!(parse(&raw), Err(HttpError::UnsupportedTransferEncoding));
        }
        let both = "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert_eq!(parse(both), Err(HttpError::UnsupportedTransferEncoding));
    }

    #[test]
    fn host_rules() {
        assert_eq!(parse("GET / HTTP/1.1\r\n\r\n"), Err(HttpError::BadHost));
        assert_eq!(
            parse("GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n"),
            Err(HttpError::BadHost)
        );
        let r = parse_ok("GET / HTTP/1.0\r\n\r\n");
        assert_eq!(r.version(), HttpVersion::Http10);
    }

    #[test]
    fn singleton_headers() {
        for h in ["Authorization", "Origin", "Sec-WebSocket-Key", "X-Device-Id"] {
            let raw = format!("GET / HTTP/1.1\r\nHost: x\r\n{h}: a\r\n{h}: b\r\n\r\n");
            assert!(matches!(parse(&raw), Err(HttpError::DuplicateHeader(_))), "{h}");
        }
    }

    #[test]
    fn target_forms() {
        for t in ["http://x/v1/stream", "*", "x", "/a#frag"] {
            let raw = format!("GET {t} HTTP/1.1\r\nHost: x\r\n\r\n");
            assert_eq!(parse(&raw), Err(HttpError::BadTarget), "{t}");
        }
        assert_eq!(parse_ok("GET /%73 HTTP/1.1\r\nHost: x\r\n\r\n").path, "/%73");
    }

    #[test]
    fn query_decoding() {
        let r = parse_ok("GET /?a=x+y%2B%2b&&b&c=&%41=%e2%82%AC HTTP/1.1\r\nHost: x\r\n\r\n");
        assert_eq!(r.query_param("a"), Some("x+y++"));
        assert_eq!(r.query_param("b"), Some(""));
        assert_eq!(r.query_param("c"), Some(""));
        assert_eq!(r.query_param("A"), Some("€"));
        assert_eq!(r.query.len(), 4);
        // `?` inside the query belongs to the query.
        let r = parse_ok("GET /p?a=b?c HTTP/1.1\r\nHost: x\r\n\r\n");
        assert_eq!(r.query_param("a"), Some("b?c"));
        for bad in ["a=%", "a=%4", "a=%zz", "a=%ff", "a=1&a=2", "%=1"] {
            let raw = format!("GET /?{bad} HTTP/1.1\r\nHost: x\r\n\r\n");
            assert_eq!(parse(&raw), Err(HttpError::Malformed), "{bad}");
        }
    }

    #[test]
    fn query_bounds() {
        let many: Vec<String> = (0..=MAX_QUERY_PARAMS).map(|i| format!("p{i}=1")).collect();
        let raw = format!("GET /?{} HTTP/1.1\r\nHost: x\r\n\r\n", many.join("&"));
        assert_eq!(parse(&raw), Err(HttpError::QueryTooLarge));
        let ok = format!(
            "GET /?{} HTTP/1.1\r\nHost: x\r\n\r\n",
            many[..MAX_QUERY_PARAMS].join("&")
        );
        assert_eq!(parse_ok(&ok).query.len(), MAX_QUERY_PARAMS);

        let big = RequestLimits {
            max_head_bytes: 20_000,
            ..lim()
        };
        let long = "a".repeat(MAX_QUERY_PARAM_BYTES + 1);
        let raw = format!("GET /?t={long} HTTP/1.1\r\nHost: x\r\n\r\n");
        assert_eq!(try_parse(raw.as_bytes(), &big), Err(HttpError::QueryTooLarge));
        let fits = &long[1..];
        let raw = format!("GET /?t={fits} HTTP/1.1\r\nHost: x\r\n\r\n");
        assert!(try_parse(raw.as_bytes(), &big).unwrap().is_some());
    }

    #[test]
    fn head_limit_applies_to_incomplete_input() {
        let l = lim();
        // A never-ending header line: fine below the limit, an error once at it.
        let mut raw = b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: ".to_vec();
        raw.resize(l.max_head_bytes - 1, b'a');
        assert_eq!(try_parse(&raw, &l), Ok(None));
        raw.push(b'a');
        assert_eq!(try_parse(&raw, &l), Err(HttpError::HeadTooLarge));
        raw.extend_from_slice(b"\r\n\r\n");
        assert_eq!(try_parse(&raw, &l), Err(HttpError::HeadTooLarge));

        // A head of exactly max_head_bytes is accepted.
        let prefix = "GET / HTTP/1.1\r\nHost: x\r\nX-Pad: ";
        let pad = l.max_head_bytes - prefix.len() - 4;
        let exact = format!("{prefix}{}\r\n\r\n", "a".repeat(pad));
        assert_eq!(exact.len(), l.max_head_bytes);
        assert!(try_parse(exact.as_bytes(), &l).unwrap().is_some());
        let over = format!("{prefix}{}\r\n\r\n", "a".repeat(pad + 1));
        assert_eq!(try_parse(over.as_bytes(), &l), Err(HttpError::HeadTooLarge));

        // Endless blank lines before the request line are bounded the same way.
        let blank = b"\r\n".repeat(l.max_head_bytes);
        assert_eq!(try_parse(&blank, &l), Err(HttpError::HeadTooLarge));
    }

    #[test]
    fn header_count_limit() {
        let l = lim();
        let mut ok = String::from("GET / HTTP/1.1\r\nHost: x\r\n");
        for i in 1..l.max_headers {
            ok.push_str(&format!("X-{i}: v\r\n"));
        }
        let complete = format!("{ok}\r\n");
        assert!(parse(&complete).unwrap().is_some());
        // One more header fails once its line is complete (httparse checks for a free slot
        // after a line, not before), before the head ends.
        assert_eq!(parse(&format!("{ok}X-last: v")), Ok(None));
        let over = format!("{ok}X-last: v\r\n");
        assert_eq!(parse(&over), Err(HttpError::TooManyHeaders));
    }

    #[test]
    fn hostile_bytes() {
        for raw in [
            &b"GET / HTTP/1.1\r\nHost: x\r\nX: a\0b\r\n\r\n"[..],
            b"GET / HTTP/1.1\r\nHost: x\r\nX: a\rb\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: x\r\nX\0: a\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: x\r\nX : a\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: x\r\n folded: a\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: x\r\nX: \xff\xfe\r\n\r\n",
            b"GET  / HTTP/1.1\r\nHost: x\r\n\r\n",
            b"GET / HTTP/2.0\r\nHost: x\r\n\r\n",
            b"GET / FOO/1.1\r\nHost: x\r\n\r\n",
        ] {
            assert!(
                try_parse(raw, &lim()).is_err(),
                "{:?}",
                String::from_utf8_lossy(raw)
            );
        }
    }

    #[test]
    fn errors_are_400() {
        for e in [
            HttpError::Malformed,
            HttpError::HeadTooLarge,
            HttpError::TooManyHeaders,
            HttpError::BodyTooLarge,
            HttpError::UnsupportedTransferEncoding,
            HttpError::BadContentLength,
            HttpError::BadHost,
            HttpError::DuplicateHeader("origin"),
            HttpError::BadTarget,
            HttpError::QueryTooLarge,
        ] {
            assert_eq!(e.status(), 400);
            assert_eq!(e.response().status, 400);
        }
    }

    fn small() -> RequestLimits {
        RequestLimits {
            max_head_bytes: 256,
            max_headers: 4,
            max_body_bytes: 16,
        }
    }

    /// What a connection loop does: append each chunk (sizes used in turn; everything at once
    /// if there are none) and parse the whole buffer again, until the first `Ok(Some)` or
    /// `Err`. Returns the outcome and how many bytes were buffered then.
    fn feed(
        raw: &[u8],
        sizes: &[usize],
        l: &RequestLimits,
    ) -> (Result<Option<(usize, Request)>, HttpError>, usize) {
        let mut buf = Vec::new();
        let mut rest = raw;
        let mut i = 0;
        loop {
            let n = sizes
                .get(i % sizes.len().max(1))
                .map_or(rest.len(), |&n| n.min(rest.len()));
            i += 1;
            let (chunk, tail) = rest.split_at(n);
            buf.extend_from_slice(chunk);
            rest = tail;
            match try_parse(&buf, l) {
                Ok(None) => {
                    assert!(
                        buf.len() < l.max_head_bytes + l.max_body_bytes,
                        "{} bytes",
                        buf.len()
                    );
                    if rest.is_empty() {
                        return (Ok(None), buf.len());
                    }
                }
                done => return (done, buf.len()),
            }
        }
    }

    fn token() -> impl Strategy<Value = String> {
        "[A-Za-z0-9_.-]{1,12}"
    }

    prop_compose! {
        fn valid_request()(
            post in any::<bool>(),
            path in "/[a-z0-9/._-]{0,20}",
            query in proptest::collection::btree_map("[a-z]{1,6}", "[A-Za-z0-9_.~+-]{0,10}", 0..5),
            headers in proptest::collection::vec(("X-[A-Za-z]{1,8}", "[ -~]{0,20}"), 0..20),
            body in proptest::collection::vec(any::<u8>(), 0..64),
        ) -> (String, Vec<u8>) {
            let mut head = format!("{} {path}", if post { "POST" } else { "GET" });
            if !query.is_empty() {
                let q: Vec<String> = query.iter().map(|(k, v)| format!("{k}={v}")).collect();
                head.push('?');
                head.push_str(&q.join("&"));
            }
            head.push_str(" HTTP/1.1\r\nHost: example\r\n");
            for (n, v) in &headers {
                head.push_str(&format!("{n}: {v}\r\n"));
            }
            head.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
            (head, body)
        }
    }

    proptest! {
        #[test]
        fn every_split_point_is_incomplete_then_complete((head, body) in valid_request(), trailer in "[A-Z]{0,8}") {
            let mut raw = head.into_bytes();
            raw.extend_from_slice(&body);
            let l = lim();
            for i in 0..raw.len() {
                prop_assert_eq!(try_parse(&raw[..i], &l), Ok(None), "split at {}", i);
            }
            let (n, req) = try_parse(&raw, &l).unwrap().unwrap();
            prop_assert_eq!(n, raw.len());
            prop_assert_eq!(&req.body, &body);
            // Pipelined bytes are not consumed and do not change the result.
            let mut more = raw.clone();
            more.extend_from_slice(trailer.as_bytes());
            prop_assert_eq!(try_parse(&more, &l), Ok(Some((n, req))));
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let small = RequestLimits { max_head_bytes: 256, max_headers: 4, max_body_bytes: 16 };
            for l in [lim(), small] {
                if let Ok(Some((n, _))) = try_parse(&bytes, &l) {
                    prop_assert!(n <= bytes.len());
                }
            }
        }

        #[test]
        fn mutated_requests_never_panic(
            (head, body) in valid_request(),
            edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
        ) {
            let mut raw = head.into_bytes();
            raw.extend_from_slice(&body);
            for (at, b) in edits {
                let i = at.index(raw.len());
                raw[i] = b;
            }
            let _ = try_parse(&raw, &lim());
        }

        #[test]
        fn split_feeding_matches_whole_parse(
            (head, body) in valid_request(),
            trailer in proptest::collection::vec(any::<u8>(), 0..16),
            sizes in proptest::collection::vec(1usize..64, 0..12),
            edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..3),
        ) {
            let mut raw = head.into_bytes();
            raw.extend_from_slice(&body);
            let request_len = raw.len();
            let clean = edits.is_empty();
            for (at, b) in edits {
                let i = at.index(raw.len());
                raw[i] = b;
            }
            raw.extend_from_slice(&trailer);
            for l in [lim(), small()] {
                let (split, buffered) = feed(&raw, &sizes, &l);
                // Same answer as the buffered prefix at once and as all the bytes at once.
                prop_assert_eq!(&split, &try_parse(&raw[..buffered], &l));
                prop_assert_eq!(&split, &try_parse(&raw, &l));
                if let Ok(Some((n, _))) = &split {
                    prop_assert!(*n <= buffered);
                }
                if let Err(e) = &split {
                    prop_assert_eq!(e.status(), 400);
                }
            }
            if clean {
                let (split, _) = feed(&raw, &sizes, &lim());
                let (n, req) = split.unwrap().unwrap();
                prop_assert_eq!(n, request_len);
                prop_assert_eq!(&req.body, &body);
            }
        }

        #[test]
        fn endless_header_line_fails_at_head_limit(
            sizes in proptest::collection::vec(1usize..700, 1..12),
            use_small in any::<bool>(),
        ) {
            let l = if use_small { small() } else { lim() };
            let prefix = b"GET /v1/stream HTTP/1.1\r\nHost: x\r\nX-Junk: ";
            let mut buf: Vec<u8> = Vec::new();
            let mut i = 0;
            // Well past the head limit, and past head + body, so a late cut-off shows up too.
            while buf.len() < l.max_head_bytes + l.max_body_bytes + 64 {
                let n = sizes[i % sizes.len()];
                i += 1;
                for _ in 0..n {
                    let b = prefix.get(buf.len()).copied().unwrap_or(b'A');
                    buf.push(b);
                }
                let out = try_parse(&buf, &l);
                if buf.len() < l.max_head_bytes {
                    prop_assert_eq!(out, Ok(None), "{} bytes buffered", buf.len());
                } else {
                    prop_assert_eq!(out, Err(HttpError::HeadTooLarge), "{} bytes buffered", buf.len());
                    // What a connection loop would see: it stops here.
                    break;
                }
            }
            prop_assert!(buf.len() >= l.max_head_bytes);
            // Whatever arrives afterwards, the answer stays the same.
            buf.extend_from_slice(b"\r\n\r\n");
            prop_assert_eq!(try_parse(&buf, &l), Err(HttpError::HeadTooLarge));
        }

        #[test]
        fn percent_encoding_round_trips(value in "\\PC{0,40}", name in token()) {
            let mut enc = String::new();
            for b in value.bytes() {
                enc.push_str(&format!("%{b:02X}"));
            }
            let raw = format!("GET /?{name}={enc} HTTP/1.1\r\nHost: x\r\n\r\n");
            let r = parse_ok(&raw);
            prop_assert_eq!(r.query_param(&name), Some(value.as_str()));
        }
    }
}
