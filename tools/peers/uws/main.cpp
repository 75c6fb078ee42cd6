// uws-peer: the tools/baseline wire protocol on uWebSockets, as a third column for
// perf/compare.sh (issue 17). Single-threaded: one uWS::App (uSockets' default epoll loop,
// no SSL, no compression), one topic per symbol, one `app.publish(symbol, tick, TEXT)` per
// published tick; uWS queues them and writes each subscriber's batch, corked, once per loop
// iteration. Settings: 1 MiB `maxBackpressure` with `closeOnBackpressureLimit = false` (a
// subscriber more than 1 MiB behind misses ticks; the load generator counts them as drops
// and seq gaps; uWS's default), no idle timeout, no automatic pings, 16 MiB messages in.
//
// The same subset of tickgate's contract as tools/baseline: `GET /v1/stream` with
// `Authorization: Bearer <JWT>` verified like tickgate's Verifier (EdDSA over the exact
// bytes with OpenSSL's libcrypto, `kid`, `crit` refused, `exp`/`nbf`/`iat` with 30 s leeway,
// at most 15 min lifetime, roles and symbol patterns; no iss/aud/cip/typ checks, which the
// load generator never sets), 401 otherwise; `welcome`; `subscribe`/`subscribed` (the
// subscriber role and the token's symbol patterns, `*` suffix = prefix); `unsubscribe`;
// `publish`/`published` (the publisher role, a per-symbol `seq`); `tick` JSON with `type`
// first, like tickgate; `ping`/`pong`; `reauth`/`reauthed`. No origin checks, rate limits,
// caps, timers or conflation. Flags as the baseline's: --listen, --key-dir or --pub, --kid.
//
// Listens on loopback by default (127.0.0.1:8091); it is a yardstick, not a service.

#include "App.h"

#include <openssl/evp.h>
#include <openssl/pem.h>

#include <cctype>
#include <charconv>
#include <csignal>
#include <cstdio>
#include <cstring>
#include <ctime>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

using std::string, std::string_view;

// ---- A small JSON reader: enough for the client messages and a token's claims ----------

struct Cur {
    const char *p, *e;
};

static void ws(Cur &c) {
    while (c.p < c.e && (*c.p == ' ' || *c.p == '\t' || *c.p == '\n' || *c.p == '\r')) ++c.p;
}
static bool lit(Cur &c, char ch) {
    ws(c);
    if (c.p < c.e && *c.p == ch) return ++c.p, true;
    return false;
}
static void utf8(string &o, unsigned cp) {
    if (cp >= 0x800) o += char(0xE0 | cp >> 12);
    if (cp >= 0x80) o += char(cp >= 0x800 ? 0x80 | (cp >> 6 & 63) : 0xC0 | cp >> 6);
    o += char(cp >= 0x80 ? 0x80 | (cp & 63) : cp);
}
// A string (escapes decoded; \u surrogate pairs are refused: no symbol or claim needs one).
static bool str(Cur &c, string &o) {
    o.clear();
    if (!lit(c, '"')) return false;
    while (c.p < c.e) {
        char ch = *c.p++;
        if (ch == '"') return true;
        if ((unsigned char) ch < 0x20) return false;
        if (ch != '\\') { o += ch; continue; }
        if (c.p >= c.e) return false;
        switch (char x = *c.p++) {
        case '"': case '\\': case '/': o += x; break;
        case 'b': o += '\b'; break;
        case 'f': o += '\f'; break;
        case 'n': o += '\n'; break;
        case 'r': o += '\r'; break;
        case 't': o += '\t'; break;
        case 'u': {
            unsigned cp = 0;
            if (c.e - c.p < 4 || std::from_chars(c.p, c.p + 4, cp, 16).ptr != c.p + 4) return false;
            if (cp >= 0xD800 && cp < 0xE000) return false;
            c.p += 4;
            utf8(o, cp);
            break;
        }
        default: return false;
        }
    }
    return false;
}
// A number, as its text.
static bool num(Cur &c, string_view &o) {
    ws(c);
    const char *s = c.p;
    while (c.p < c.e && (isdigit((unsigned char) *c.p) || memchr("+-.eE", *c.p, 5))) ++c.p;
    o = string_view(s, size_t(c.p - s));
    double d;
    return !o.empty() && std::from_chars(s, c.p, d).ptr == c.p;
}
static bool u64(Cur &c, uint64_t &v) {
    string_view t;
    return num(c, t) && std::from_chars(t.data(), t.data() + t.size(), v).ptr == t.data() + t.size();
}
template <class F> static bool seq(Cur &c, char open, char close, F &&item) {
    if (!lit(c, open)) return false;
    if (lit(c, close)) return true;
    do if (!item()) return false; while (lit(c, ','));
    return lit(c, close);
}
// An object: `field(key)` reads the value at `c`.
template <class F> static bool object(Cur &c, F &&field) {
    string k;
    return seq(c, '{', '}', [&] { return str(c, k) && lit(c, ':') && field(k); });
}
static bool skip(Cur &c, int depth = 0) {
    ws(c);
    if (c.p >= c.e || depth > 32) return false;
    string s;
    string_view n;
    switch (*c.p) {
    case '"': return str(c, s);
    case '{': return object(c, [&](const string &) { return skip(c, depth + 1); });
    case '[': return seq(c, '[', ']', [&] { return skip(c, depth + 1); });
    }
    for (string_view w : {"true", "false", "null"})
        if (string_view(c.p, size_t(c.e - c.p)).starts_with(w)) return c.p += w.size(), true;
    return num(c, n);
}
// The raw text of any value (an `id` is echoed as it came).
static bool raw(Cur &c, string_view &o) {
    ws(c);
    const char *s = c.p;
    if (!skip(c)) return false;
    o = string_view(s, size_t(c.p - s));
    return true;
}
static bool strings(Cur &c, std::vector<string> &v) {
    return seq(c, '[', ']', [&] { return str(c, v.emplace_back()); });
}

// ---- Writing JSON -----------------------------------------------------------------------

static void jstr(string &o, string_view s) {
    o += '"';
    for (char ch : s) {
        if (ch == '"' || ch == '\\') {
            o += '\\';
            o += ch;
        } else if ((unsigned char) ch < 0x20) {
            char b[8];
            snprintf(b, sizeof b, "\\u%04x", ch);
            o += b;
        } else o += ch;
    }
    o += '"';
}
static string q(string_view s) {
    string o;
    jstr(o, s);
    return o;
}
static string qs(const std::vector<string> &v) {
    string o = "[";
    for (auto &s : v) {
        if (o.size() > 1) o += ',';
        jstr(o, s);
    }
    return o + "]";
}
// Concatenation of the parts (strings, string_views, literals).
template <class... T> static string cat(const T &...part) {
    string o;
    (o.append(string_view(part)), ...);
    return o;
}
// A number as serde_json prints an f64 (`3` -> `3.0`), which the baseline's ticks carry.
static void jf64(string &o, string_view n) {
    o += n;
    if (n.find_first_of(".eE") == string_view::npos) o += ".0";
}

// ---- Tokens: tickgate's Verifier, default policy ---------------------------------------

static EVP_PKEY *g_key;
static string g_kid = "k1";
static constexpr uint64_t LEEWAY = 30, MAX_LIFETIME = 15 * 60;

struct Claims {
    string sub, sid;
    uint64_t exp = 0;
    bool subscriber = false, publisher = false;
    std::vector<string> symbols;
};

static bool b64url(string_view in, string &out) {
    out.clear();
    unsigned acc = 0;
    int bits = 0;
    for (char ch : in) {
        int v = ch >= 'A' && ch <= 'Z' ? ch - 'A' : ch >= 'a' && ch <= 'z' ? ch - 'a' + 26
              : ch >= '0' && ch <= '9' ? ch - '0' + 52 : ch == '-' ? 62 : ch == '_' ? 63 : -1;
        if (v < 0) return false;
        acc = acc << 6 | unsigned(v);
        if ((bits += 6) >= 8) out += char(acc >> (bits -= 8) & 0xFF);
    }
    return in.size() % 4 != 1;
}

static bool verify(string_view tok, uint64_t now, Claims &c) {
    size_t d1 = tok.find('.'), d2 = tok.find('.', d1 + 1);
    if (tok.size() > 8192 || d2 == string_view::npos || tok.find('.', d2 + 1) != string_view::npos) return false;
    string head, sig, payload, k, alg, kid;
    if (!b64url(tok.substr(0, d1), head)) return false;
    Cur h{head.data(), head.data() + head.size()};
    bool crit = false;
    if (!object(h, [&](const string &key) {
            if (key == "alg") return str(h, alg);
            if (key == "kid") return str(h, kid);
            crit |= key == "crit";
            return skip(h);
        }) || alg != "EdDSA" || crit || kid != g_kid)
        return false;
    if (tok.size() - d2 - 1 != 86 || !b64url(tok.substr(d2 + 1), sig) || sig.size() != 64) return false;
    EVP_MD_CTX *md = EVP_MD_CTX_new();
    bool ok = md && EVP_DigestVerifyInit(md, nullptr, nullptr, nullptr, g_key) == 1 &&
              EVP_DigestVerify(md, (const unsigned char *) sig.data(), 64, (const unsigned char *) tok.data(), d2) == 1;
    EVP_MD_CTX_free(md);
    if (!ok || !b64url(tok.substr(d1 + 1, d2 - d1 - 1), payload)) return false;
    // Only now is the payload trusted enough to read.
    uint64_t iat = 0, nbf = 0;
    bool has_iat = false, has_exp = false;
    std::vector<string> roles;
    Cur p{payload.data(), payload.data() + payload.size()};
    if (!object(p, [&](const string &key) {
            if (key == "sub") return str(p, c.sub);
            if (key == "sid") return str(p, c.sid);
            if (key == "exp") return has_exp = true, u64(p, c.exp);
            if (key == "iat") return has_iat = true, u64(p, iat);
            if (key == "nbf") return u64(p, nbf);
            if (key == "roles") return strings(p, roles);
            if (key == "symbols") return strings(p, c.symbols);
            return skip(p);
        }))
        return false;
    if (c.sub.empty() || c.sub.size() > 256 || c.sid.size() > 256 || !has_exp) return false;
    if (c.exp + LEEWAY <= now || nbf > now + LEEWAY || iat > now + LEEWAY) return false;
    if (has_iat ? (c.exp < iat || c.exp - iat > MAX_LIFETIME) : (c.exp > now && c.exp - now > MAX_LIFETIME)) return false;
    if (c.symbols.size() > 1024) return false;
    for (auto &s : c.symbols) if (s.size() > 64) return false;
    for (auto &r : roles) c.subscriber |= r == "subscriber", c.publisher |= r == "publisher";
    return true;
}

static bool entitled(const Claims &c, string_view sym) {
    for (string_view p : c.symbols)
        if (p.ends_with('*') ? sym.starts_with(p.substr(0, p.size() - 1)) : p == sym) return true;
    return false;
}

// ---- The server ------------------------------------------------------------------------

struct Conn {
    Claims claims;
};
using WS = uWS::WebSocket<false, true, Conn>;

static uWS::App *g_app;
static std::unordered_map<string, uint64_t> g_seq; // per symbol

struct TickIn {
    string s;
    uint64_t ts = 0;
    string_view bid, ask, last, qty;
};

// One published tick; all six fields are required, as by the baseline's serde struct.
static bool tick(Cur &c, TickIn &t) {
    bool s = false, ts = false;
    return object(c, [&](const string &f) {
        if (f == "s") return s = true, str(c, t.s);
        if (f == "ts") return ts = true, u64(c, t.ts);
        if (f == "bid") return num(c, t.bid);
        if (f == "ask") return num(c, t.ask);
        if (f == "last") return num(c, t.last);
        if (f == "qty") return num(c, t.qty);
        return skip(c);
    }) && s && ts && !t.bid.empty() && !t.ask.empty() && !t.last.empty() && !t.qty.empty();
}

static string error(string_view id, string_view code, string_view message) {
    return cat("{\"type\":\"error\",\"id\":", id, ",\"code\":", q(code), ",\"message\":", q(message), "}");
}

static string on_message(WS *ws, string_view text) {
    Claims &cl = ws->getUserData()->claims;
    string op, token;
    string_view id = "null";
    std::vector<string> symbols;
    std::vector<TickIn> ticks;
    Cur c{text.data(), text.data() + text.size()};
    bool ok = object(c, [&](const string &key) {
        if (key == "op") return str(c, op);
        if (key == "id") return raw(c, id);
        if (key == "symbols") return strings(c, symbols);
        if (key == "token") return str(c, token);
        if (key != "ticks") return skip(c);
        return seq(c, '[', ']', [&] { return tick(c, ticks.emplace_back()); });
    });
    if (!ok || op.empty()) return error("null", "bad_request", "malformed message");
    if (op == "ping") return cat("{\"type\":\"pong\",\"id\":", id, "}");
    if (op == "subscribe") {
        if (!cl.subscriber) return error(id, "forbidden", "subscriber role required");
        std::vector<string> done;
        string rejected;
        for (auto &s : symbols) {
            if (!entitled(cl, s)) {
                rejected += cat(rejected.empty() ? "" : ",", "{\"symbol\":", q(s), ",\"code\":\"forbidden\"}");
                continue;
            }
            ws->subscribe(s);
            done.push_back(std::move(s));
        }
        return cat("{\"type\":\"subscribed\",\"id\":", id, ",\"symbols\":", qs(done), ",\"rejected\":[", rejected, "]}");
    }
    if (op == "unsubscribe") {
        for (auto &s : symbols) ws->unsubscribe(s);
        return cat("{\"type\":\"unsubscribed\",\"id\":", id, ",\"symbols\":", qs(symbols), "}");
    }
    if (op == "publish") {
        if (!cl.publisher) return error(id, "forbidden", "publisher role required");
        for (auto &t : ticks)
            if (!entitled(cl, t.s)) return error(id, "forbidden", "not entitled");
        string m;
        for (auto &t : ticks) {
            m = "{\"type\":\"tick\",\"s\":";
            jstr(m, t.s);
            m += ",\"seq\":" + std::to_string(++g_seq[t.s]) + ",\"ts\":" + std::to_string(t.ts) + ",\"bid\":";
            jf64(m, t.bid);
            m += ",\"ask\":";
            jf64(m, t.ask);
            m += ",\"last\":";
            jf64(m, t.last);
            m += ",\"qty\":";
            jf64(m, t.qty);
            m += '}';
            g_app->publish(t.s, m, uWS::OpCode::TEXT, false);
        }
        return cat("{\"type\":\"published\",\"id\":", id, ",\"count\":", std::to_string(ticks.size()), "}");
    }
    if (op == "reauth") {
        if (token.empty()) return error(id, "bad_request", "token required");
        Claims n;
        if (!verify(token, uint64_t(time(nullptr)), n) || n.sub != cl.sub || n.sid != cl.sid)
            return error(id, "forbidden", "reauth refused");
        cl = std::move(n);
        return cat("{\"type\":\"reauthed\",\"id\":", id, ",\"exp\":", std::to_string(cl.exp), "}");
    }
    return error(id, "unknown_op", "unknown op");
}

static EVP_PKEY *load_key(const string &path) {
    FILE *f = fopen(path.c_str(), "r");
    if (!f) return nullptr;
    EVP_PKEY *k = PEM_read_PUBKEY(f, nullptr, nullptr, nullptr);
    fclose(f);
    return k && EVP_PKEY_id(k) == EVP_PKEY_ED25519 ? k : nullptr;
}

int main(int argc, char **argv) {
    string listen = "127.0.0.1:8091", key_dir, pub;
    for (int i = 1; i + 1 < argc; i += 2) {
        string_view a = argv[i];
        if (a == "--listen") listen = argv[i + 1];
        else if (a == "--key-dir") key_dir = argv[i + 1];
        else if (a == "--pub") pub = argv[i + 1];
        else if (a == "--kid") g_kid = argv[i + 1];
        else return fprintf(stderr, "uws-peer: unknown flag %s\n", argv[i]), 1;
    }
    if (argc % 2 == 0) return fprintf(stderr, "uws-peer: flags are --name value pairs\n"), 1;
    if (pub.empty() && key_dir.empty())
        return fprintf(stderr, "usage: uws-peer [--listen 127.0.0.1:8091] (--pub FILE | --key-dir DIR) [--kid k1]\n"), 1;
    if (pub.empty()) pub = key_dir + "/" + g_kid + ".pub";
    if (!(g_key = load_key(pub))) return fprintf(stderr, "uws-peer: %s: not an Ed25519 SPKI PEM public key\n", pub.c_str()), 1;
    size_t colon = listen.rfind(':');
    int port = 0;
    if (colon == string::npos || std::from_chars(listen.data() + colon + 1, listen.data() + listen.size(), port).ec != std::errc())
        return fprintf(stderr, "uws-peer: --listen HOST:PORT\n"), 1;
    string host = listen.substr(0, colon);
    signal(SIGPIPE, SIG_IGN);

    uWS::App app;
    g_app = &app;
    app.ws<Conn>("/v1/stream", {
        .compression = uWS::DISABLED,
        .maxPayloadLength = 16 * 1024 * 1024,
        .idleTimeout = 0,
        .maxBackpressure = 1024 * 1024,
        .closeOnBackpressureLimit = false,
        .resetIdleTimeoutOnSend = false,
        .sendPingsAutomatically = false,
        .upgrade = [](auto *res, auto *req, auto *context) {
            string_view auth = req->getHeader("authorization");
            Conn conn;
            if (!auth.starts_with("Bearer ") || !verify(auth.substr(7), uint64_t(time(nullptr)), conn.claims)) {
                res->writeStatus("401 Unauthorized")->end({}, true);
                return;
            }
            res->template upgrade<Conn>(std::move(conn), req->getHeader("sec-websocket-key"),
                req->getHeader("sec-websocket-protocol"), req->getHeader("sec-websocket-extensions"), context);
        },
        .open = [](WS *ws) {
            const Claims &c = ws->getUserData()->claims;
            ws->send(cat("{\"type\":\"welcome\",\"sub\":", q(c.sub), ",\"sid\":", c.sid.empty() ? "null" : q(c.sid),
                         ",\"exp\":", std::to_string(c.exp), ",\"heartbeat_ms\":15000}"),
                     uWS::OpCode::TEXT);
        },
        .message = [](WS *ws, string_view msg, uWS::OpCode op) {
            if (op != uWS::OpCode::TEXT) return ws->end(1003);
            ws->send(on_message(ws, msg), uWS::OpCode::TEXT);
        },
    });
    app.any("/*", [](auto *res, auto *) { res->writeStatus("404 Not Found")->end({}, true); });
    bool up = false;
    app.listen(host, port, [&](auto *ls) { up = ls != nullptr; });
    if (!up) return fprintf(stderr, "uws-peer: bind %s failed\n", listen.c_str()), 2;
    fprintf(stderr, "uws-peer: listening on %s\n", listen.c_str());
    app.run();
}
