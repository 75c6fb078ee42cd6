//! The layout rules of `src/lib.rs`'s `# Layout`, checked from the source text.
//!
//! 1. No import cycles among modules, at the level of top-level modules and their direct
//!    submodules (`config`, `state`, `auth::jwt`, `feed::msg`, `rt::conn`, ...). Every
//!    `crate::…`, `super::…` and `self::…` path in non-test code under `src/` is an edge
//!    from the file's module to the module the path names (deeper modules fold into their
//!    second-level ancestor: `proto::http::request` counts as `proto::http`). Test code
//!    (`#[cfg(test)]` items, `*tests.rs` files) is left out: a test may use anything.
//! 2. Only `src/rt/` (and `src/main.rs`) owns sockets or starts threads.
//!
//! Run it alone with `cargo test --test layout`.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

/// A source file under `src/` and its module path (`["auth", "jwt"]`; `[]` for the crate root).
struct Source {
    rel: String,
    module: Vec<String>,
    /// The text with comments, string and char literals blanked and `#[cfg(test)]` items cut.
    code: String,
}

fn src_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<_> = fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            walk(&p, out);
        } else if p.extension().is_some_and(|e| e == "rs") {
            out.push(p);
        }
    }
}

fn sources() -> Vec<Source> {
    let root = src_dir();
    let mut files = Vec::new();
    walk(&root, &mut files);
    files
        .into_iter()
        .filter_map(|p| {
            let rel = p
                .strip_prefix(&root)
                .unwrap()
                .to_string_lossy()
                .replace('\\', "/");
            let stem = rel.trim_end_matches(".rs");
            if stem.ends_with("tests") {
                return None; // `#[cfg(test)] mod tests;` bodies
            }
            let mut module: Vec<String> = stem.split('/').map(str::to_owned).collect();
            let last = module.last().unwrap().as_str();
            if matches!(last, "mod" | "lib" | "main") {
                module.pop();
            }
            let text = fs::read_to_string(&p).unwrap();
            Some(Source {
                rel,
                module,
                code: cut_cfg_test(&blank(&text)),
            })
        })
        .collect()
}

/// Blanks comments, string literals and char literals (keeping newlines), so that neither
/// prose nor data is read as code.
fn blank(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    let keep = |c: u8| if c == b'\n' { b'\n' } else { b' ' };
    while i < b.len() {
        let c = b[i];
        let next = b.get(i + 1).copied();
        if c == b'/' && next == Some(b'/') {
            while i < b.len() && b[i] != b'\n' {
                out.push(b' ');
                i += 1;
            }
        } else if c == b'/' && next == Some(b'*') {
            let mut depth = 0;
            while i < b.len() {
                if b[i] == b'/' && b.get(i + 1) == Some(&b'*') {
                    depth += 1;
                    out.extend_from_slice(b"  ");
                    i += 2;
                } else if b[i] == b'*' && b.get(i + 1) == Some(&b'/') {
                    depth -= 1;
                    out.extend_from_slice(b"  ");
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    out.push(keep(b[i]));
                    i += 1;
                }
            }
        } else if (c == b'r' || (c == b'b' && next == Some(b'r')))
            && !prev_is_ident(b, i)
            && raw_string_start(b, if c == b'b' { i + 1 } else { i }).is_some()
        {
            let start = if c == b'b' { i + 1 } else { i };
            let hashes = raw_string_start(b, start).unwrap();
            let body = start + 1 + hashes + 1;
            out.extend(std::iter::repeat_n(b' ', body - i));
            i = body;
            loop {
                if i >= b.len() {
                    break;
                }
                if b[i] == b'"' && b[i + 1..].iter().take(hashes).filter(|&&h| h == b'#').count() == hashes {
                    out.extend(std::iter::repeat_n(b' ', 1 + hashes));
                    i += 1 + hashes;
                    break;
                }
                out.push(keep(b[i]));
                i += 1;
            }
        } else if c == b'"' {
            out.push(b' ');
            i += 1;
            while i < b.len() && b[i] != b'"' {
                if b[i] == b'\\' {
                    out.push(b' ');
                    i += 1;
                }
                if i < b.len() {
                    out.push(keep(b[i]));
                    i += 1;
                }
            }
            out.push(b' ');
            i += 1;
        } else if c == b'\'' {
            // A char literal ('x', '\n', '\u{..}', 'é') or a lifetime ('a).
            let rest = &s[i + 1..];
            let mut chars = rest.char_indices();
            match chars.next() {
                Some((_, '\\')) => {
                    let end = rest[1..].find('\'').map_or(rest.len(), |e| e + 2);
                    out.extend(std::iter::repeat_n(b' ', 1 + end));
                    i += 1 + end;
                }
                Some((_, ch)) if rest[ch.len_utf8()..].starts_with('\'') => {
                    let n = 2 + ch.len_utf8();
                    out.extend(std::iter::repeat_n(b' ', n));
                    i += n;
                }
                _ => {
                    out.push(c);
                    i += 1;
                }
            }
        } else {
            out.push(c);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn prev_is_ident(b: &[u8], i: usize) -> bool {
    i > 0 && (b[i - 1].is_ascii_alphanumeric() || b[i - 1] == b'_')
}

/// At `b[i] == 'r'`: the number of `#`s if a raw string starts here.
fn raw_string_start(b: &[u8], i: usize) -> Option<usize> {
    if b.get(i) != Some(&b'r') {
        return None;
    }
    let mut j = i + 1;
    while b.get(j) == Some(&b'#') {
        j += 1;
    }
    (b.get(j) == Some(&b'"')).then_some(j - i - 1)
}

/// Removes each item under `#[cfg(test)]` (up to its matching `}` or its `;`).
fn cut_cfg_test(s: &str) -> String {
    let mut out = s.to_owned();
    let pat = "#[cfg(test)]";
    let mut from = 0;
    while let Some(at) = out[from..].find(pat).map(|p| p + from) {
        let b = out.as_bytes();
        let mut j = at + pat.len();
        let mut depth = 0usize;
        while j < b.len() {
            match b[j] {
                b'{' => depth += 1,
                b'}' => {
                    depth -= 1;
                    if depth == 0 {
                        j += 1;
                        break;
                    }
                }
                b';' if depth == 0 => {
                    j += 1;
                    break;
                }
                _ => {}
            }
            j += 1;
        }
        let blanked: String = out[at..j]
            .chars()
            .map(|c| if c == '\n' { '\n' } else { ' ' })
            .collect();
        out.replace_range(at..j, &blanked);
        from = j;
    }
    out
}

/// Every path starting with `crate::`, `super::` or `self::` in `code`, use trees expanded
/// (`crate::a::{b, c::d}` gives `a::b` and `a::c::d`), made absolute for module `module`.
fn paths(code: &str, module: &[String]) -> Vec<Vec<String>> {
    let b = code.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let at_start = !prev_is_ident(b, i) && (i == 0 || b[i - 1] != b':');
        let head = ["crate", "super", "self"]
            .into_iter()
            .find(|h| code[i..].starts_with(h));
        let Some(h) = head.filter(|_| at_start) else {
            i += 1;
            continue;
        };
        let after = i + h.len();
        if !code[after..].trim_start().starts_with("::") {
            i = after;
            continue;
        }
        let mut tree = Vec::new();
        let end = use_tree(code, i, &[], &mut tree);
        for p in tree {
            if let Some(abs) = absolute(&p, module) {
                out.push(abs);
            }
        }
        i = end.max(after);
    }
    out
}

/// Parses a path or use tree at `i`, pushing each leaf path (prefix + segments); returns
/// where it ended.
fn use_tree(code: &str, mut i: usize, prefix: &[String], out: &mut Vec<Vec<String>>) -> usize {
    let b = code.as_bytes();
    let skip_ws = |mut i: usize| {
        while i < b.len() && b[i].is_ascii_whitespace() {
            i += 1;
        }
        i
    };
    let mut segs = prefix.to_vec();
    loop {
        i = skip_ws(i);
        if i < b.len() && b[i] == b'{' {
            i += 1;
            loop {
                i = skip_ws(i);
                if i >= b.len() {
                    return i;
                }
                if b[i] == b'}' {
                    return i + 1;
                }
                if b[i] == b',' {
                    i += 1;
                    continue;
                }
                let before = i;
                i = use_tree(code, i, &segs, out);
                if i == before {
                    i += 1;
                }
            }
        }
        let start = i;
        while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_' || b[i] == b'*') {
            i += 1;
        }
        if i == start {
            break;
        }
        segs.push(code[start..i].to_owned());
        let j = skip_ws(i);
        if code[j..].starts_with("::") && !code[j + 2..].trim_start().starts_with('<') {
            i = j + 2;
        } else {
            break;
        }
    }
    if segs.len() > prefix.len() {
        out.push(segs);
    }
    i
}

/// Resolves `crate::`/`super::`/`self::` against `module`; `None` if it leaves the crate.
fn absolute(path: &[String], module: &[String]) -> Option<Vec<String>> {
    let mut base: Vec<String> = Vec::new();
    let mut rest = path;
    match path.first().map(String::as_str) {
        Some("crate") => rest = &path[1..],
        Some("self" | "super") => {
            base = module.to_vec();
            while let Some(h) = rest.first().map(String::as_str) {
                match h {
                    "self" => rest = &rest[1..],
                    "super" => {
                        base.pop()?;
                        rest = &rest[1..];
                    }
                    _ => break,
                }
            }
        }
        _ => return None,
    }
    base.extend(rest.iter().filter(|s| s.as_str() != "self").cloned());
    Some(base)
}

/// The graph node a module path falls in: its longest known-module prefix, cut to two levels.
fn node(path: &[String], modules: &BTreeSet<Vec<String>>) -> Option<String> {
    let n = (1..=path.len().min(2))
        .rev()
        .find(|&n| modules.contains(&path[..n]))?;
    Some(path[..n].join("::"))
}

/// The modules that are nodes: every top-level module, and each second-level module its
/// parent declares `pub` (a private submodule, like `config::validate`, is part of its parent).
fn graph_modules(srcs: &[Source]) -> BTreeSet<Vec<String>> {
    let mut out = BTreeSet::new();
    for s in srcs {
        match s.module.as_slice() {
            [top] => {
                out.insert(vec![top.clone()]);
            }
            [top, sub] => {
                let parent = srcs.iter().find(|p| p.module.len() == 1 && &p.module[0] == top);
                let public = parent.is_some_and(|p| {
                    p.code.lines().any(|l| {
                        let l = l.trim();
                        l.starts_with("pub") && l.contains(&format!("mod {sub};"))
                    })
                });
                if public {
                    out.insert(s.module.clone());
                }
            }
            _ => {}
        }
    }
    out
}

fn graph() -> BTreeMap<String, BTreeMap<String, BTreeSet<String>>> {
    let srcs = sources();
    let modules = graph_modules(&srcs);
    let mut g: BTreeMap<String, BTreeMap<String, BTreeSet<String>>> = BTreeMap::new();
    for s in &srcs {
        let Some(from) = node(&s.module, &modules) else {
            continue;
        }; // lib.rs, main.rs
        let entry = g.entry(from.clone()).or_default();
        for p in paths(&s.code, &s.module) {
            if let Some(to) = node(&p, &modules)
                && to != from
            {
                entry
                    .entry(to)
                    .or_default()
                    .insert(format!("{}: {}", s.rel, p.join("::")));
            }
        }
    }
    g
}

/// Strongly connected components with more than one node (Tarjan).
fn cycles(g: &BTreeMap<String, BTreeMap<String, BTreeSet<String>>>) -> Vec<Vec<String>> {
    struct T<'a> {
        g: &'a BTreeMap<String, BTreeMap<String, BTreeSet<String>>>,
        index: BTreeMap<&'a str, usize>,
        low: BTreeMap<&'a str, usize>,
        stack: Vec<&'a str>,
        on: BTreeSet<&'a str>,
        next: usize,
        out: Vec<Vec<String>>,
    }
    fn visit<'a>(t: &mut T<'a>, v: &'a str) {
        t.index.insert(v, t.next);
        t.low.insert(v, t.next);
        t.next += 1;
        t.stack.push(v);
        t.on.insert(v);
        let g = t.g;
        for w in g.get(v).into_iter().flat_map(|e| e.keys()) {
            let w = w.as_str();
            if !t.index.contains_key(w) {
                visit(t, w);
                let lw = t.low[w];
                let lv = t.low.get_mut(v).unwrap();
                *lv = (*lv).min(lw);
            } else if t.on.contains(w) {
                let iw = t.index[w];
                let lv = t.low.get_mut(v).unwrap();
                *lv = (*lv).min(iw);
            }
        }
        if t.low[v] == t.index[v] {
            let mut comp = Vec::new();
            while let Some(w) = t.stack.pop() {
                t.on.remove(w);
                comp.push(w.to_owned());
                if w == v {
                    break;
                }
            }
            if comp.len() > 1 {
                comp.sort();
                t.out.push(comp);
            }
        }
    }
    let mut t = T {
        g,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on: BTreeSet::new(),
        next: 0,
        out: Vec::new(),
    };
    for v in g.keys() {
        if !t.index.contains_key(v.as_str()) {
            visit(&mut t, v);
        }
    }
    t.out
}

/// One cycle through `comp`, found by breadth-first search from its first node back to it.
fn one_cycle(g: &BTreeMap<String, BTreeMap<String, BTreeSet<String>>>, comp: &[String]) -> Vec<String> {
    let start = &comp[0];
    let inside: BTreeSet<&String> = comp.iter().collect();
    let mut prev: BTreeMap<&String, &String> = BTreeMap::new();
    let mut queue = std::collections::VecDeque::from([start]);
    while let Some(v) = queue.pop_front() {
        for w in g.get(v).into_iter().flat_map(|e| e.keys()) {
            if !inside.contains(w) {
                continue;
            }
            if w == start {
                let mut path = vec![v.clone()];
                let mut at = v;
                while at != start {
                    at = prev[at];
                    path.push(at.clone());
                }
                path.reverse();
                path.push(start.clone());
                return path;
            }
            if !prev.contains_key(w) {
                prev.insert(w, v);
                queue.push_back(w);
            }
        }
    }
    comp.to_vec()
}

#[test]
fn no_import_cycles_between_modules() {
    let g = graph();
    let found = cycles(&g);
    let mut report = String::new();
    for comp in &found {
        let cyc = one_cycle(&g, comp);
        report.push_str(&format!(
            "cycle among {{{}}}: {}\n",
            comp.join(", "),
            cyc.join(" -> ")
        ));
        report.push_str("  every edge inside it:\n");
        for from in comp {
            for (to, uses) in &g[from] {
                if !comp.contains(to) {
                    continue;
                }
                report.push_str(&format!("  {from} -> {to}:\n"));
                for u in uses.iter().take(3) {
                    report.push_str(&format!("    {u}\n"));
                }
                if uses.len() > 3 {
                    report.push_str(&format!("    ... and {} more\n", uses.len() - 3));
                }
            }
        }
    }
    assert!(found.is_empty(), "import cycles between modules:\n{report}");
}

/// Sockets and threads: the words that give them away.
const OWNED_BY_RT: &[&str] = &[
    "TcpListener",
    "TcpStream",
    "UdpSocket",
    "thread::spawn",
    "thread::Builder",
    "thread::scope",
    "libc::socket",
    "libc::recv",
    "libc::send",
    "libc::shutdown",
    "libc::accept",
    "monoio::net",
];

#[test]
fn only_rt_owns_sockets_and_threads() {
    let mut offenders = Vec::new();
    for s in sources() {
        if s.rel.starts_with("rt/") || s.rel == "main.rs" {
            continue;
        }
        for (n, line) in s.code.lines().enumerate() {
            for w in OWNED_BY_RT {
                let hit = line
                    .match_indices(w)
                    .any(|(at, _)| !prev_is_ident(line.as_bytes(), at));
                if hit {
                    offenders.push(format!("src/{}:{}: {w}: {}", s.rel, n + 1, line.trim()));
                }
            }
        }
    }
    assert!(
        offenders.is_empty(),
        "sockets or threads outside src/rt/:\n{}",
        offenders.join("\n")
    );
}

/// The checker itself: a cycle planted in text is found, comments and strings are not read.
#[test]
fn the_checker_reads_paths_as_rust_does() {
    let m = |s: &str| s.split("::").map(str::to_owned).collect::<Vec<_>>();
    let code = blank(
        "use crate::a::{b::C, d::{self, E}};\n// crate::x::y\nlet s = \"crate::z::w\";\nlet c = '\"'; super::f::g();\n",
    );
    let got: Vec<String> = paths(&code, &m("auth::jwt"))
        .iter()
        .map(|p| p.join("::"))
        .collect();
    assert_eq!(got, ["a::b::C", "a::d", "a::d::E", "auth::f::g"]);
    let cut = cut_cfg_test("use crate::a;\n#[cfg(test)]\nmod tests { use crate::b; }\nuse crate::c;");
    let got: Vec<String> = paths(&cut, &m("x")).iter().map(|p| p.join("::")).collect();
    assert_eq!(got, ["a", "c"]);
    let mut g: BTreeMap<String, BTreeMap<String, BTreeSet<String>>> = BTreeMap::new();
    for (a, b) in [("a", "b"), ("b", "c"), ("c", "a"), ("c", "d")] {
        g.entry(a.into())
            .or_default()
            .entry(b.into())
            .or_default()
            .insert(String::new());
    }
    let found = cycles(&g);
    assert_eq!(found, [vec!["a".to_owned(), "b".into(), "c".into()]]);
    assert_eq!(one_cycle(&g, &found[0]), ["a", "b", "c", "a"]);
}
