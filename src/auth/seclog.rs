//! Security log and counters (PROTOCOL.md section 8).
//!
//! One JSON object per line for every handshake outcome, ticket, reauth, revocation and
//! policy close, always with `ts`, `event`, `outcome`, `reason`, `ip`, `origin`, `sub` and
//! `sid` (JSON `null` when unknown), so a log pipeline can rely on the shape.
//!
//! - `ts` is RFC 3339 UTC with milliseconds, formatted here from the caller's unix-ms
//!   (civil-from-days arithmetic, no clock read, no date crate).
//! - Strings go through `serde_json`, which escapes quotes, backslashes and C0 controls; on
//!   top of that DEL, C1 controls and U+2028/U+2029 are written as `\uXXXX`, because the
//!   `Origin` header is attacker-chosen and must not be able to forge a line or drive a
//!   terminal. Attacker-reachable fields are also clipped to [`MAX_FIELD_LEN`] bytes.
//! - Tokens and tickets never appear; [`token_hash`] (the first 12 hex digits of SHA-256)
//!   is the only form allowed, enough to correlate log lines without enabling replay.
//! - [`SecurityLog`] writes each line with a single `write` on an `O_APPEND` file (or under
//!   the stdout lock), so lines from different shards never interleave and no lock of ours
//!   sits on the path. A failed write is counted, never fatal: losing a log line must not
//!   take the gateway down, but the counter lets monitoring notice.
//! - [`SecurityCounters`] aggregates by `(event, outcome, reason)`. Events, outcomes and
//!   reasons are the enums [`Event`], [`Outcome`] and [`Reason`], each variant with its
//!   fixed wire string, so label values come from code, never from requests, the number of
//!   series stays small and fixed (no label-cardinality blow-up from hostile input), and a
//!   call site cannot misspell one.

use std::fmt::Write as _;
use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::net::IpAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use dashmap::DashMap;

/// Longest value written for a free-text field (origin, sub, sid, reason, ...).
pub const MAX_FIELD_LEN: usize = 256;

/// Declares one kind of security-log word: an enum whose variants are the only values a
/// call site can pass, each with the exact string written on the wire.
macro_rules! wire_words {
    ($(#[$doc:meta])* $name:ident { $($(#[$vdoc:meta])* $variant:ident => $wire:literal,)+ }) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum $name {
            $($(#[$vdoc])* $variant,)+
        }

        impl $name {
            /// Every variant, in declaration order.
            pub const ALL: &'static [$name] = &[$($name::$variant,)+];

            /// The string in the security log line and the `/metrics` label.
            pub const fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $wire,)+
                }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

wire_words! {
    /// The `event` field (docs/PROTOCOL.md section 9).
    Event {
        Handshake => "handshake",
        Ticket => "ticket",
        Reauth => "reauth",
        Revoke => "revoke",
        Close => "close",
        /// The admin listener refused a connection without answering it.
        Admin => "admin",
        /// `POST /v1/demo-token`, the embedded demo's token for its page.
        DemoToken => "demo_token",
    }
}

wire_words! {
    /// The `outcome` field.
    Outcome {
        Accepted => "accepted",
        Rejected => "rejected",
        /// The server closed a connection (`close` events).
        Closed => "closed",
    }
}

wire_words! {
    /// The `reason` field: a fixed vocabulary, so counters stay low-cardinality.
    Reason {
        Ok => "ok",
        // The upgrade and the ticket endpoint (gate).
        BadRequestShape => "bad_request_shape",
        Draining => "draining",
        RateLimited => "rate_limited",
        Origin => "origin",
        NoToken => "no_token",
        BadTicket => "bad_ticket",
        DeviceBinding => "device_binding",
        IpBinding => "ip_binding",
        UserCap => "user_cap",
        Subprotocol => "subprotocol",
        Method => "method",
        TicketStoreFull => "ticket_store_full",
        /// An accepted CORS preflight (`OPTIONS /v1/ticket`, `204`): not a ticket.
        Preflight => "preflight",
        // Handshake refusals before the gate (counted; some also logged).
        MalformedHttp => "malformed_http",
        Timeout => "timeout",
        ShardFull => "shard_full",
        Tls => "tls",
        PendingPerIp => "pending_per_ip",
        PendingEvicted => "pending_evicted",
        // Token verification (`AuthError::log_reason`, docs/PROTOCOL.md section 3).
        Malformed => "malformed",
        TooLarge => "too_large",
        BadAlg => "bad_alg",
        Crit => "crit",
        MissingKid => "missing_kid",
        UnknownKid => "unknown_kid",
        BadTyp => "bad_typ",
        BadSignature => "bad_signature",
        Expired => "expired",
        NotYetValid => "not_yet_valid",
        IssuedInFuture => "issued_in_future",
        TooLongLived => "too_long_lived",
        BadIssuer => "bad_issuer",
        BadAudience => "bad_audience",
        MissingSub => "missing_sub",
        MissingExp => "missing_exp",
        BadClaims => "bad_claims",
        Revoked => "revoked",
        // Reauth.
        IdentityMismatch => "identity_mismatch",
        // `POST /admin/revoke` and the admin listener.
        NotAdmin => "not_admin",
        BadRequest => "bad_request",
        RevocationListFull => "revocation_list_full",
        Evicted => "evicted",
        PerIpLimit => "per_ip_limit",
        Full => "full",
        // Policy closes.
        TokenExpired => "token_expired",
        Idle => "idle",
        SlowConsumer => "slow_consumer",
        MessageRate => "message_rate",
        MessageTooBig => "message_too_big",
        InvalidPayload => "invalid_payload",
        ProtocolError => "protocol_error",
    }
}

/// One security-relevant event. Borrowed fields: building one allocates nothing.
#[derive(Debug, Clone, Copy)]
pub struct SecurityEvent<'a> {
    pub ts_unix_ms: u64,
    /// [`Event::as_str`] (set by [`SecurityEvent::at`]).
    pub event: &'static str,
    /// [`Outcome::as_str`].
    pub outcome: &'static str,
    /// [`Reason::as_str`].
    pub reason: &'static str,
    pub ip: Option<IpAddr>,
    /// The raw `Origin` header: attacker-controlled.
    pub origin: Option<&'a str>,
    pub sub: Option<&'a str>,
    pub sid: Option<&'a str>,
    /// HTTP status or close code, when there is one.
    pub status: Option<u16>,
    /// Only ever the output of [`token_hash`].
    pub token_hash: Option<&'a str>,
}

#[derive(serde::Serialize)]
struct Line<'a> {
    ts: String,
    event: &'a str,
    outcome: &'a str,
    reason: &'a str,
    ip: Option<String>,
    origin: Option<&'a str>,
    sub: Option<&'a str>,
    sid: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    status: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    token_hash: Option<&'a str>,
}

impl SecurityEvent<'_> {
    /// An event with every optional field unknown: `ip`, `origin`, `sub` and `sid` are
    /// written as `null`, `status` and `token_hash` are left out. Set what the caller knows
    /// with struct update syntax: `SecurityEvent { sub: Some(..), ..SecurityEvent::at(..) }`.
    pub fn at(ts_unix_ms: u64, event: Event, outcome: Outcome, reason: Reason) -> Self {
        Self::words(ts_unix_ms, event.as_str(), outcome.as_str(), reason.as_str())
    }

    fn words(ts_unix_ms: u64, event: &'static str, outcome: &'static str, reason: &'static str) -> Self {
        SecurityEvent {
            ts_unix_ms,
            event,
            outcome,
            reason,
            ip: None,
            origin: None,
            sub: None,
            sid: None,
            status: None,
            token_hash: None,
        }
    }

    /// The event as one JSON line, ending with `\n`.
    pub fn to_json_line(&self) -> String {
        let line = Line {
            ts: format_rfc3339_millis(self.ts_unix_ms),
            event: clip(self.event),
            outcome: clip(self.outcome),
            reason: clip(self.reason),
            ip: self.ip.map(|ip| ip.to_string()),
            origin: self.origin.map(clip),
            sub: self.sub.map(clip),
            sid: self.sid.map(clip),
            status: self.status,
            token_hash: self.token_hash.map(clip),
        };
        // Serialising a struct of strings and integers cannot fail; the fallback keeps the
        // line well-formed anyway.
        let json = serde_json::to_string(&line)
            .unwrap_or_else(|_| String::from(r#"{"event":"seclog","outcome":"error","reason":"serialize"}"#));
        let mut out = escape_extra_controls(json);
        out.push('\n');
        out
    }
}

/// Clips to at most [`MAX_FIELD_LEN`] bytes on a character boundary.
fn clip(s: &str) -> &str {
    if s.len() <= MAX_FIELD_LEN {
        return s;
    }
    let mut end = MAX_FIELD_LEN;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s.get(..end).unwrap_or("")
}

/// serde_json leaves DEL, C1 controls and the JS line separators raw; escape them. They can
/// only occur inside string values (the keys are ours), so `\uXXXX` is always valid there.
fn escape_extra_controls(json: String) -> String {
    let needs =
        |c: char| c == '\u{7f}' || ('\u{80}'..='\u{9f}').contains(&c) || c == '\u{2028}' || c == '\u{2029}';
    if !json.chars().any(needs) {
        return json;
    }
    let mut out = String::with_capacity(json.len() + 16);
    for c in json.chars() {
        if needs(c) {
            let _ = write!(out, "\\u{:04x}", u32::from(c));
        } else {
            out.push(c);
        }
    }
    out
}

/// `YYYY-MM-DDTHH:MM:SS.mmmZ` for a unix time in milliseconds.
pub fn format_rfc3339_millis(unix_ms: u64) -> String {
    let secs = unix_ms / 1000;
    let millis = unix_ms % 1000;
    let days = secs / 86_400;
    let sod = secs % 86_400;
    // u64::MAX / 86_400_000 < 2^38, so the day count always fits an i64.
    let (y, m, d) = civil_from_days(days as i64);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{millis:03}Z",
        sod / 3600,
        (sod / 60) % 60,
        sod % 60
    )
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian (H. Hinnant's
/// `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// The first 12 hex digits of SHA-256 of `token`: the only form in which a token or ticket
/// may be logged. 48 bits correlate lines; they do not help anyone replay.
pub fn token_hash(token: &str) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
    let mut out = String::with_capacity(12);
    for b in digest.as_ref().iter().take(6) {
        let _ = write!(out, "{b:02x}");
    }
    out
}

enum Sink {
    Stdout,
    Stderr,
    File(File),
    Discard,
    Memory(Arc<Mutex<Vec<String>>>),
}

/// Where security lines go. Shared by all shards (`Send + Sync`).
pub struct SecurityLog {
    sink: Sink,
    write_errors: AtomicU64,
}

impl std::fmt::Debug for SecurityLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match self.sink {
            Sink::Stdout => "stdout",
            Sink::Stderr => "stderr",
            Sink::File(_) => "file",
            Sink::Discard => "discard",
            Sink::Memory(_) => "memory",
        };
        f.debug_struct("SecurityLog").field("sink", &kind).finish()
    }
}

impl SecurityLog {
    /// `"stdout"` (or `"-"`), `"stderr"`, or a file path opened for append and created with
    /// mode 0640 (an existing file keeps its mode).
    pub fn open(dest: &str) -> std::io::Result<Self> {
        let sink = match dest {
            "stdout" | "-" => Sink::Stdout,
            "stderr" => Sink::Stderr,
            "" => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    "log.security: empty destination",
                ));
            }
            path => Sink::File(
                OpenOptions::new()
                    .append(true)
                    .create(true)
                    .mode(0o640)
                    .open(path)?,
            ),
        };
        Ok(Self::with_sink(sink))
    }

    fn with_sink(sink: Sink) -> Self {
        SecurityLog {
            sink,
            write_errors: AtomicU64::new(0),
        }
    }

    /// Drops every line (tests, or when security logging is wired elsewhere).
    pub fn discard() -> Self {
        Self::with_sink(Sink::Discard)
    }

    /// Keeps lines in memory; the returned handle sees them (tests).
    pub fn memory() -> (Self, Arc<Mutex<Vec<String>>>) {
        let lines = Arc::new(Mutex::new(Vec::new()));
        (Self::with_sink(Sink::Memory(lines.clone())), lines)
    }

    /// Writes one event as one line.
    pub fn write(&self, e: &SecurityEvent) {
        let line = e.to_json_line();
        let res = match &self.sink {
            Sink::Stdout => {
                let mut out = std::io::stdout().lock();
                out.write_all(line.as_bytes()).and_then(|()| out.flush())
            }
            Sink::Stderr => std::io::stderr().lock().write_all(line.as_bytes()),
            // O_APPEND + one write(2) per line: the kernel appends each line whole.
            Sink::File(f) => (&*f).write_all(line.as_bytes()),
            Sink::Discard => Ok(()),
            Sink::Memory(v) => {
                if let Ok(mut v) = v.lock() {
                    v.push(line);
                }
                Ok(())
            }
        };
        if res.is_err() {
            self.write_errors.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Lines that could not be written (export as a metric).
    pub fn write_errors(&self) -> u64 {
        self.write_errors.load(Ordering::Relaxed)
    }
}

type CounterKey = (&'static str, &'static str, &'static str);

/// `tickgate_security_events_total` by event, outcome and reason.
#[derive(Debug, Default)]
pub struct SecurityCounters {
    counts: DashMap<CounterKey, AtomicU64>,
}

impl SecurityCounters {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds one to a series.
    pub fn count(&self, event: Event, outcome: Outcome, reason: Reason) {
        self.add((event.as_str(), outcome.as_str(), reason.as_str()));
    }

    /// Adds one to the series of `e` (what [`crate::state::Shared::audit`] counts).
    pub fn record(&self, e: &SecurityEvent<'_>) {
        self.add((e.event, e.outcome, e.reason));
    }

    /// After the first event of a kind this only takes a shard read lock.
    fn add(&self, key: CounterKey) {
        if let Some(c) = self.counts.get(&key) {
            c.fetch_add(1, Ordering::Relaxed);
            return;
        }
        self.counts
            .entry(key)
            .or_insert_with(|| AtomicU64::new(0))
            .fetch_add(1, Ordering::Relaxed);
    }

    /// Current value of one series.
    pub fn get(&self, event: &str, outcome: &str, reason: &str) -> u64 {
        self.counts
            .iter()
            .find(|e| *e.key() == (event, outcome, reason))
            .map_or(0, |e| e.value().load(Ordering::Relaxed))
    }

    /// Appends the Prometheus text exposition, series sorted for stable output.
    pub fn render_prometheus(&self, out: &mut String) {
        let mut rows: Vec<(CounterKey, u64)> = self
            .counts
            .iter()
            .map(|e| (*e.key(), e.value().load(Ordering::Relaxed)))
            .collect();
        rows.sort_unstable();
        out.push_str("# HELP tickgate_security_events_total Security events by event, outcome and reason.\n");
        out.push_str("# TYPE tickgate_security_events_total counter\n");
        for ((event, outcome, reason), n) in rows {
            let _ = writeln!(
                out,
                "tickgate_security_events_total{{event=\"{}\",outcome=\"{}\",reason=\"{}\"}} {n}",
                label(event),
                label(outcome),
                label(reason)
            );
        }
    }
}

/// Prometheus label-value escaping (backslash, double quote, newline).
fn label(v: &str) -> String {
    let mut s = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => s.push_str("\\\\"),
            '"' => s.push_str("\\\""),
            '\n' => s.push_str("\\n"),
            c => s.push(c),
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base<'a>() -> SecurityEvent<'a> {
        SecurityEvent {
            ts_unix_ms: 1_732_345_678_123,
            event: Event::Handshake.as_str(),
            outcome: Outcome::Rejected.as_str(),
            reason: Reason::Expired.as_str(),
            ip: Some("203.0.113.9".parse().unwrap()),
            origin: Some("https://app.example.com"),
            sub: Some("alice"),
            sid: None,
            status: Some(401),
            token_hash: None,
        }
    }

    fn parse(line: &str) -> serde_json::Value {
        assert!(line.ends_with('\n'));
        assert_eq!(line.matches('\n').count(), 1, "one line: {line:?}");
        serde_json::from_str(line.trim_end()).unwrap()
    }

    #[test]
    fn rfc3339_formatting() {
        let cases = [
            (0, "1970-01-01T00:00:00.000Z"),
            (1, "1970-01-01T00:00:00.001Z"),
            (86_399_999, "1970-01-01T23:59:59.999Z"),
            (951_782_400_000, "2000-02-29T00:00:00.000Z"),
            (951_868_800_000, "2000-03-01T00:00:00.000Z"),
            (1_732_345_678_123, "2024-11-23T07:07:58.123Z"),
            (1_709_251_199_000, "2024-02-29T23:59:59.000Z"),
            (4_102_444_800_000, "2100-01-01T00:00:00.000Z"),
            (253_402_300_799_999, "9999-12-31T23:59:59.999Z"),
        ];
        for (ms, want) in cases {
            assert_eq!(format_rfc3339_millis(ms), want, "{ms}");
        }
        // Absurd inputs do not panic.
        let s = format_rfc3339_millis(u64::MAX);
        assert!(s.ends_with('Z'));
    }

    #[test]
    fn required_fields_present_and_null_when_unknown() {
        let v = parse(&base().to_json_line());
        assert_eq!(v["ts"], "2024-11-23T07:07:58.123Z");
        assert_eq!(v["event"], "handshake");
        assert_eq!(v["outcome"], "rejected");
        assert_eq!(v["reason"], "expired");
        assert_eq!(v["ip"], "203.0.113.9");
        assert_eq!(v["origin"], "https://app.example.com");
        assert_eq!(v["sub"], "alice");
        assert_eq!(v["status"], 401);
        let obj = v.as_object().unwrap();
        assert!(obj.contains_key("sid") && v["sid"].is_null());
        assert!(!obj.contains_key("token_hash"));

        let e = SecurityEvent {
            ip: None,
            origin: None,
            sub: None,
            status: None,
            ..base()
        };
        let v = parse(&e.to_json_line());
        for k in ["ts", "event", "outcome", "reason", "ip", "origin", "sub", "sid"] {
            assert!(v.as_object().unwrap().contains_key(k), "{k}");
        }
        assert!(v["ip"].is_null() && v["origin"].is_null() && v["sub"].is_null());
    }

    #[test]
    fn ipv6_is_rendered() {
        let e = SecurityEvent {
            ip: Some("2001:db8::1".parse().unwrap()),
            ..base()
        };
        assert_eq!(parse(&e.to_json_line())["ip"], "2001:db8::1");
    }

    #[test]
    fn hostile_origin_is_escaped_and_clipped() {
        let evil = "https://x\r\n{\"event\":\"handshake\",\"outcome\":\"accepted\"}\u{0}\u{1b}[31m\u{7f}\u{85}\u{2028}\"\\";
        let e = SecurityEvent {
            origin: Some(evil),
            ..base()
        };
        let line = e.to_json_line();
        let v = parse(&line);
        assert_eq!(v["origin"], evil, "round-trips exactly");
        assert!(!line.trim_end().chars().any(|c| c.is_control()), "{line:?}");
        assert!(!line.contains('\u{2028}'));
        assert!(line.contains("\\u007f") && line.contains("\\u0085") && line.contains("\\u2028"));

        let long = "é".repeat(1000);
        let e = SecurityEvent {
            origin: Some(&long),
            sub: Some(&long),
            ..base()
        };
        let v = parse(&e.to_json_line());
        let o = v["origin"].as_str().unwrap();
        assert!(o.len() <= MAX_FIELD_LEN && o.chars().all(|c| c == 'é'));
        assert!(v["sub"].as_str().unwrap().len() <= MAX_FIELD_LEN);
    }

    #[test]
    fn token_hash_only() {
        let token = "eyJhbGciOiJFZERTQSIsImtpZCI6ImsxIn0.eyJzdWIiOiJhbGljZSJ9.c2lnbmF0dXJlc2lnbmF0dXJl";
        let h = token_hash(token);
        assert_eq!(h.len(), 12);
        assert!(
            h.bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
        );
        assert_eq!(h, token_hash(token));
        assert_ne!(h, token_hash("other"));
        // SHA-256("abc") = ba7816bf8f01cfea...
        assert_eq!(token_hash("abc"), "ba7816bf8f01");
        let e = SecurityEvent {
            token_hash: Some(&h),
            ..base()
        };
        let line = e.to_json_line();
        assert_eq!(parse(&line)["token_hash"], h.as_str());
        // No 8-character window of the token shows up anywhere in the line.
        for w in token.as_bytes().windows(8) {
            let w = std::str::from_utf8(w).unwrap();
            assert!(!line.contains(w), "{w} leaked");
        }
    }

    #[test]
    fn constructor_writes_the_same_line_as_a_literal() {
        let built = SecurityEvent {
            ip: Some("203.0.113.9".parse::<IpAddr>().unwrap()),
            origin: Some("https://app.example.com"),
            sub: Some("alice"),
            status: Some(401),
            ..SecurityEvent::at(
                1_732_345_678_123,
                Event::Handshake,
                Outcome::Rejected,
                Reason::Expired,
            )
        };
        assert_eq!(built.to_json_line(), base().to_json_line());

        // Unset optionals are null (ip, origin, sub, sid) or absent (status, token_hash),
        // exactly as in a literal with every one of them None.
        let bare = SecurityEvent::at(7, Event::Revoke, Outcome::Accepted, Reason::Ok);
        let literal = SecurityEvent {
            ts_unix_ms: 7,
            event: "revoke",
            outcome: "accepted",
            reason: "ok",
            ip: None,
            origin: None,
            sub: None,
            sid: None,
            status: None,
            token_hash: None,
        };
        assert_eq!(bare.to_json_line(), literal.to_json_line());
        assert_eq!(
            bare.to_json_line(),
            "{\"ts\":\"1970-01-01T00:00:00.007Z\",\"event\":\"revoke\",\"outcome\":\"accepted\",\
             \"reason\":\"ok\",\"ip\":null,\"origin\":null,\"sub\":null,\"sid\":null}\n"
        );

        // Struct update over a full event: set fields win, a None clears an earlier value.
        let h = token_hash("t");
        let e = SecurityEvent {
            sid: Some("s-1"),
            token_hash: Some(h.as_str()),
            origin: None,
            ..base()
        };
        let v = parse(&e.to_json_line());
        assert_eq!(v["sid"], "s-1");
        assert_eq!(v["token_hash"], h.as_str());
        assert!(v["origin"].is_null());
    }

    #[test]
    fn memory_and_discard_sinks() {
        let (log, lines) = SecurityLog::memory();
        log.write(&base());
        log.write(&SecurityEvent {
            outcome: Outcome::Accepted.as_str(),
            reason: Reason::Ok.as_str(),
            ..base()
        });
        let lines = lines.lock().unwrap();
        assert_eq!(lines.len(), 2);
        assert_eq!(parse(&lines[1])["outcome"], "accepted");
        let d = SecurityLog::discard();
        d.write(&base());
        assert_eq!(d.write_errors(), 0);
        assert!(SecurityLog::open("").is_err());
        assert!(SecurityLog::open("stdout").is_ok());
    }

    #[test]
    fn file_sink_appends_whole_lines_from_many_threads() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("tickgate-seclog-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("security.log");
        let _ = std::fs::remove_file(&path);
        let log = Arc::new(SecurityLog::open(path.to_str().unwrap()).unwrap());
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode & !0o640, 0, "mode {mode:o}");
        let handles: Vec<_> = (0..4)
            .map(|t| {
                let log = log.clone();
                std::thread::spawn(move || {
                    let sub = format!("user-{t}-{}", "x".repeat(200));
                    for i in 0..500 {
                        log.write(&SecurityEvent {
                            ts_unix_ms: i,
                            sub: Some(&sub),
                            ..base()
                        });
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        drop(log);
        // Reopening appends.
        SecurityLog::open(path.to_str().unwrap()).unwrap().write(&base());
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2001);
        for l in lines {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            assert_eq!(v["event"], "handshake");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn counters_render_prometheus() {
        let c = SecurityCounters::new();
        for _ in 0..3 {
            c.count(Event::Handshake, Outcome::Rejected, Reason::Expired);
        }
        c.record(&SecurityEvent::at(
            0,
            Event::Handshake,
            Outcome::Accepted,
            Reason::Ok,
        ));
        c.add(("weird", "a\"b", "c\\d\ne"));
        assert_eq!(c.get("handshake", "rejected", "expired"), 3);
        assert_eq!(c.get("handshake", "rejected", "origin"), 0);
        let mut out = String::new();
        c.render_prometheus(&mut out);
        assert!(out.contains(
            "tickgate_security_events_total{event=\"handshake\",outcome=\"rejected\",reason=\"expired\"} 3\n"
        ));
        assert!(out.contains(
            "tickgate_security_events_total{event=\"handshake\",outcome=\"accepted\",reason=\"ok\"} 1\n"
        ));
        assert!(out.contains(r#"{event="weird",outcome="a\"b",reason="c\\d\ne"} 1"#));
        assert!(out.starts_with("# HELP tickgate_security_events_total"));
        assert!(out.contains("# TYPE tickgate_security_events_total counter\n"));
        // Sorted, stable output.
        let mut again = String::new();
        c.render_prometheus(&mut again);
        assert_eq!(out, again);
    }

    #[test]
    fn counters_are_exact_under_concurrency() {
        let c = Arc::new(SecurityCounters::new());
        let handles: Vec<_> = (0..8)
            .map(|_| {
                let c = c.clone();
                std::thread::spawn(move || {
                    for _ in 0..1_000 {
                        c.count(Event::Ticket, Outcome::Accepted, Reason::Ok);
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        assert_eq!(c.get("ticket", "accepted", "ok"), 8_000);
    }

    fn strings<T: Copy>(all: &[T], as_str: fn(T) -> &'static str) -> Vec<&'static str> {
        all.iter().map(|v| as_str(*v)).collect()
    }

    #[test]
    fn words_are_unique_and_cover_the_documented_vocabulary() {
        let kinds = [
            ("event", strings(Event::ALL, Event::as_str)),
            ("outcome", strings(Outcome::ALL, Outcome::as_str)),
            ("reason", strings(Reason::ALL, Reason::as_str)),
        ];
        for (kind, words) in &kinds {
            let mut seen = std::collections::HashSet::new();
            for w in words {
                assert!(seen.insert(*w), "{kind} {w:?} is given to two variants");
                assert!(
                    !w.is_empty() && w.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'),
                    "{kind} {w:?} is not snake_case (it is a Prometheus label value)"
                );
            }
        }
        // docs/PROTOCOL.md section 9 (the contract names only the fields): every word it
        // names is a variant. Words the code has beyond these are its extensions.
        let documented: [(&str, &[&str]); 3] = [
            ("event", &["handshake", "ticket", "reauth", "revoke", "close"]),
            ("outcome", &["accepted", "rejected", "closed"]),
            (
                "reason",
                &[
                    "ok",
                    "bad_request_shape",
                    "draining",
                    "rate_limited",
                    "origin",
                    "no_token",
                    "bad_ticket",
                    "device_binding",
                    "ip_binding",
                    "user_cap",
                    "subprotocol",
                    "method",
                    "ticket_store_full",
                    "preflight",
                    "expired",
                    "identity_mismatch",
                    "not_admin",
                    "bad_request",
                    "revocation_list_full",
                    "token_expired",
                    "idle",
                    "slow_consumer",
                    "message_rate",
                    "revoked",
                    "protocol_error",
                    "malformed_http",
                    "timeout",
                    "shard_full",
                    "tls", // section 3, the verifier's reasons:
                    "malformed",
                    "too_large",
                    "bad_alg",
                    "crit",
                    "missing_kid",
                    "unknown_kid",
                    "bad_typ",
                    "bad_signature",
                    "not_yet_valid",
                    "issued_in_future",
                    "too_long_lived",
                    "bad_issuer",
                    "bad_audience",
                    "missing_sub",
                    "missing_exp",
                    "bad_claims",
                ],
            ),
        ];
        for ((kind, words), (doc_kind, doc_words)) in kinds.iter().zip(documented) {
            assert_eq!(*kind, doc_kind);
            for w in doc_words {
                assert!(
                    words.contains(w),
                    "docs/PROTOCOL.md names {kind} {w:?}: no variant has it"
                );
            }
        }
        assert_eq!(Reason::Ok.to_string(), "ok");
    }
}
