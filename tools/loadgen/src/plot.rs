//! Latency plots: HdrHistogram's classic "latency by percentile distribution" as a
//! self-contained SVG (no scripts, no external fonts), and the histogram files they are
//! drawn from.
//!
//! - x: the percentile on a log scale of `1/(1-p)`, ticks at 0 %, 90 %, 99 %, 99.9 %, ...
//!   (one decade each, at least up to 99.999 %, more when a run has the samples for it);
//! - y: latency in ms, linear from 0;
//! - one line per series, the points from [`Histogram::iter_quantiles`], and a legend with
//!   each series' p50, p99, max and sample count.
//!
//! A histogram file (`--save-hist FILE`) holds one histogram (ns) in HdrHistogram's V2
//! encoding (`V2Serializer`; zero runs are run-length coded, so a run is a few KiB) in
//! base64, after `#` comment lines. Reading one checks the V2 header first (cookie, payload
//! length equal to what follows, bounded range and precision), so a damaged or foreign file
//! is an error rather than a huge allocation; `loadgen plot --out FILE.svg --series LABEL=FILE ...` draws
//! several of them on one plot, and `fanout`/`floor` take `--plot FILE.svg` for their own
//! run. The drawing is a plain function: [`series`] (histogram in, points out) and
//! [`render_svg`] (series in, SVG text out).

use std::fmt::Write as _;
use std::io::Read;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use clap::Args;
use hdrhistogram::Histogram;
use hdrhistogram::serialization::{Deserializer, Serializer, V2Serializer};

/// Points per halving of the distance to 100 % (HdrHistogram's own output uses 5).
const TICKS_PER_HALF: u32 = 5;
/// The x axis always reaches 99.999 % (five decades) and at most 99.9999999 %.
const MIN_DECADES: u32 = 5;
const MAX_DECADES: u32 = 9;
/// A histogram file larger than this is not one of ours.
const MAX_FILE_BYTES: u64 = 64 << 20;
/// The V2 encoding: its cookie and header size (HdrHistogram's format).
const V2_COOKIE: u32 = 0x1c84_9313;
const V2_HEADER: usize = 40;
/// Bounds on what a file may ask for (the counts array is allocated from them): loadgen's
/// own histograms track 1 ns ..= 100 s with 3 digits.
const MAX_DIGITS: u32 = 5;
const MAX_HIGHEST: u64 = 1 << 44;
const COLORS: [&str; 8] = [
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf",
];

/// One line of the plot: its points and the numbers its legend entry shows.
#[derive(Debug, Clone)]
pub struct Series {
    pub label: String,
    /// (x, y): x = log10(1/(1-p)), clamped to log10(count) (the last sample's place), and
    /// y = latency in ms. Both non-decreasing.
    pub points: Vec<(f64, f64)>,
    pub count: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

fn ms(ns: u64) -> f64 {
    ns as f64 / 1e6
}

/// The percentile distribution of a nanosecond histogram. An empty histogram is an error
/// naming the series.
pub fn series(label: &str, h: &Histogram<u64>) -> Result<Series, String> {
    if h.is_empty() {
        return Err(format!(
            "{}: no latency samples (empty histogram)",
            display_label(label)
        ));
    }
    let count = h.len();
    let x_cap = (count as f64).log10();
    let mut points: Vec<(f64, f64)> = Vec::new();
    for v in h.iter_quantiles(TICKS_PER_HALF) {
        let q = v.quantile_iterated_to();
        let x = if q >= 1.0 {
            x_cap
        } else {
            (-(1.0 - q).log10()).clamp(0.0, x_cap)
        };
        let y = ms(v.value_iterated_to());
        // Monotone by construction; the max() guards against float ties.
        let (px, py) = points.last().copied().unwrap_or((0.0, 0.0));
        points.push((x.max(px), y.max(py)));
    }
    Ok(Series {
        label: label.to_string(),
        points,
        count,
        p50_ms: ms(h.value_at_quantile(0.5)),
        p99_ms: ms(h.value_at_quantile(0.99)),
        max_ms: ms(h.max()),
    })
}

fn display_label(label: &str) -> &str {
    if label.is_empty() { "run" } else { label }
}

/// `text` escaped for XML character data and attribute values.
fn esc(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            // Control characters are not allowed in XML 1.0.
            c if (c as u32) < 0x20 && c != '\t' && c != '\n' => out.push(' '),
            c => out.push(c),
        }
    }
    out
}

/// The percentile at decade `d` (p = 1 - 10^-d) as the classic plot labels it.
pub fn decade_label(d: u32) -> String {
    match d {
        0 => "0%".into(),
        1 => "90%".into(),
        2 => "99%".into(),
        d => format!("99.{}%", "9".repeat(d as usize - 2)),
    }
}

/// A "nice" tick step (1, 2 or 5 x 10^k) giving at most about `max_ticks` ticks up to `top`.
fn nice_step(top: f64, max_ticks: f64) -> f64 {
    let raw = top / max_ticks;
    let mag = 10f64.powf(raw.log10().floor());
    for m in [1.0, 2.0, 5.0, 10.0] {
        if m * mag >= raw {
            return m * mag;
        }
    }
    10.0 * mag
}

fn fmt_ms(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else if v >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

fn group_digits(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// The plot as SVG text: a title, an optional note line under it, and every series with a
/// legend. No series, or a series without points, is an error.
pub fn render_svg(series: &[Series], title: &str, note: &str) -> Result<String, String> {
    if series.is_empty() {
        return Err("nothing to plot (no series)".into());
    }
    if let Some(s) = series.iter().find(|s| s.points.is_empty()) {
        return Err(format!("{}: no points", display_label(&s.label)));
    }
    // The legend goes under the axis title, one row per series, so it never hides a curve.
    let lh = 18.0;
    let legend_h = lh * series.len() as f64 + 12.0;
    let (w, ph) = (900.0, 420.0);
    let (left, right, top) = (80.0, 30.0, if note.is_empty() { 50.0 } else { 68.0 });
    let pw = w - left - right;
    let axis_title_y = top + ph + 42.0;
    let h = axis_title_y + 12.0 + legend_h;
    let max_x = series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.0))
        .fold(0.0f64, f64::max);
    let decades = (max_x.ceil() as u32).clamp(MIN_DECADES, MAX_DECADES);
    let max_y = series.iter().map(|s| s.max_ms).fold(0.0f64, f64::max);
    let max_y = if max_y.is_finite() && max_y > 0.0 {
        max_y
    } else {
        0.001
    };
    let step = nice_step(max_y, 8.0);
    let y_top = (max_y / step).ceil().max(1.0) * step;
    let sx = |x: f64| left + x.clamp(0.0, decades as f64) / decades as f64 * pw;
    let sy = |y: f64| top + ph - y.clamp(0.0, y_top) / y_top * ph;
    let y_decimals = if step >= 1.0 {
        0
    } else {
        (-step.log10()).ceil() as usize
    };

    let mut o = String::new();
    let _ = writeln!(o, r#"<?xml version="1.0" encoding="UTF-8"?>"#);
    let _ = writeln!(
        o,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(o, "<title>{}</title>", esc(title));
    let _ = writeln!(o, r##"<rect width="{w}" height="{h}" fill="#ffffff"/>"##);
    let _ = writeln!(
        o,
        r#"<text x="{}" y="26" text-anchor="middle" font-size="16" font-weight="bold">{}</text>"#,
        w / 2.0,
        esc(title)
    );
    if !note.is_empty() {
        let _ = writeln!(
            o,
            r##"<text x="{}" y="46" text-anchor="middle" fill="#555555">{}</text>"##,
            w / 2.0,
            esc(note)
        );
    }
    // Grid, ticks and labels.
    let _ = writeln!(o, r##"<g stroke="#dddddd" stroke-width="1">"##);
    for d in 0..=decades {
        let x = sx(d as f64);
        let _ = writeln!(
            o,
            r#"<line x1="{x:.1}" y1="{top}" x2="{x:.1}" y2="{}"/>"#,
            top + ph
        );
    }
    let ny = (y_top / step).round() as u32;
    for i in 0..=ny {
        let y = sy(i as f64 * step);
        let _ = writeln!(
            o,
            r#"<line x1="{left}" y1="{y:.1}" x2="{}" y2="{y:.1}"/>"#,
            left + pw
        );
    }
    let _ = writeln!(o, "</g>");
    let _ = writeln!(o, r#"<g text-anchor="middle">"#);
    for d in 0..=decades {
        let _ = writeln!(
            o,
            r#"<text x="{:.1}" y="{}">{}</text>"#,
            sx(d as f64),
            top + ph + 18.0,
            decade_label(d)
        );
    }
    let _ = writeln!(o, "</g>");
    let _ = writeln!(o, r#"<g text-anchor="end">"#);
    for i in 0..=ny {
        let v = i as f64 * step;
        let _ = writeln!(
            o,
            r#"<text x="{}" y="{:.1}">{v:.y_decimals$}</text>"#,
            left - 6.0,
            sy(v) + 4.0
        );
    }
    let _ = writeln!(o, "</g>");
    let _ = writeln!(
        o,
        r##"<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#333333"/>"##
    );
    let _ = writeln!(
        o,
        r#"<text x="{}" y="{}" text-anchor="middle">percentile (log scale of 1/(1-p))</text>"#,
        left + pw / 2.0,
        axis_title_y
    );
    let _ = writeln!(
        o,
        r#"<text x="18" y="{0}" text-anchor="middle" transform="rotate(-90 18 {0})">latency (ms)</text>"#,
        top + ph / 2.0
    );
    // The series.
    for (i, s) in series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let pts: Vec<String> = s
            .points
            .iter()
            .map(|&(x, y)| format!("{:.1},{:.1}", sx(x), sy(y)))
            .collect();
        let _ = writeln!(
            o,
            r#"<polyline fill="none" stroke="{color}" stroke-width="2" stroke-linejoin="round" points="{}"><title>{}</title></polyline>"#,
            pts.join(" "),
            esc(&s.label)
        );
    }
    let (lx, ly) = (left, axis_title_y + 12.0);
    let _ = writeln!(
        o,
        r##"<rect x="{lx}" y="{ly}" width="{pw}" height="{}" fill="none" stroke="#bbbbbb"/>"##,
        legend_h - 4.0
    );
    for (i, s) in series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let y = ly + 5.0 + lh * (i as f64 + 0.5);
        let _ = writeln!(
            o,
            r#"<line x1="{}" y1="{y:.1}" x2="{}" y2="{y:.1}" stroke="{color}" stroke-width="3"/>"#,
            lx + 8.0,
            lx + 32.0
        );
        let _ = writeln!(
            o,
            r#"<text x="{}" y="{:.1}">{}: p50 {} ms, p99 {} ms, max {} ms ({} samples)</text>"#,
            lx + 40.0,
            y + 4.0,
            esc(display_label(&s.label)),
            fmt_ms(s.p50_ms),
            fmt_ms(s.p99_ms),
            fmt_ms(s.max_ms),
            group_digits(s.count)
        );
    }
    let _ = writeln!(o, "</svg>");
    Ok(o)
}

/// The text of a histogram file: comment lines, then the V2 encoding in base64.
pub fn encode_hist(h: &Histogram<u64>, comment: &str) -> Result<String, String> {
    let mut bytes = Vec::new();
    V2Serializer::new()
        .serialize(h, &mut bytes)
        .map_err(|e| format!("encoding the histogram: {e:?}"))?;
    let mut out = String::from("# loadgen latency histogram (ns), HdrHistogram V2 encoding, base64\n");
    for line in comment.lines() {
        let _ = writeln!(out, "# {line}");
    }
    out.push_str(&base64::engine::general_purpose::STANDARD.encode(bytes));
    out.push('\n');
    Ok(out)
}

/// Reads back [`encode_hist`]'s text (`#` lines and blank lines are skipped).
pub fn decode_hist(text: &str) -> Result<Histogram<u64>, String> {
    let b64: String = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    if b64.is_empty() {
        return Err("no histogram in it (expected base64 after the # lines)".into());
    }
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(b64.as_bytes())
        .map_err(|e| format!("not base64: {e}"))?;
    check_v2_header(&bytes)?;
    Deserializer::new()
        .deserialize(&mut bytes.as_slice())
        .map_err(|e| format!("not an HdrHistogram V2 encoding: {e:?}"))
}

/// The V2 header's fields, checked before the deserializer allocates from them.
fn check_v2_header(b: &[u8]) -> Result<(), String> {
    let u32_at = |i: usize| u32::from_be_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
    let u64_at = |i: usize| (u64::from(u32_at(i)) << 32) | u64::from(u32_at(i + 4));
    if b.len() < V2_HEADER || u32_at(0) != V2_COOKIE {
        return Err("not an HdrHistogram V2 encoding (no V2 header)".into());
    }
    if u32_at(4) as usize != b.len() - V2_HEADER {
        return Err(format!(
            "damaged: the header says {} bytes of counts, {} follow",
            u32_at(4),
            b.len() - V2_HEADER
        ));
    }
    let (digits, low, high) = (u32_at(12), u64_at(16), u64_at(24));
    if digits > MAX_DIGITS || low == 0 || high > MAX_HIGHEST {
        return Err(format!(
            "unsupported range or precision ({digits} digits, {low}..={high})"
        ));
    }
    Ok(())
}

pub fn save_hist(path: &Path, h: &Histogram<u64>, comment: &str) -> Result<(), String> {
    let text = encode_hist(h, comment)?;
    std::fs::write(path, text).map_err(|e| format!("{}: {e}", path.display()))
}

pub fn load_hist(path: &Path) -> Result<Histogram<u64>, String> {
    let f = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut text = String::new();
    f.take(MAX_FILE_BYTES + 1)
        .read_to_string(&mut text)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if text.len() as u64 > MAX_FILE_BYTES {
        return Err(format!("{}: larger than {MAX_FILE_BYTES} bytes", path.display()));
    }
    decode_hist(&text).map_err(|e| format!("{}: {e}", path.display()))
}

pub fn write_svg(path: &Path, series: &[Series], title: &str, note: &str) -> Result<(), String> {
    let svg = render_svg(series, title, note)?;
    std::fs::write(path, svg).map_err(|e| format!("{}: {e}", path.display()))
}

/// An output file must go into an existing directory: checked before a run, so a typo
/// does not cost a benchmark.
pub fn check_writable_dir(flag: &str, path: &Path) -> Result<(), String> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    if dir.is_dir() {
        Ok(())
    } else {
        Err(format!(
            "{flag} {}: no directory {}",
            path.display(),
            dir.display()
        ))
    }
}

/// `--plot` and `--save-hist`, shared by `fanout` and `floor`.
#[derive(Args, Debug, Clone, Default)]
pub struct HistOut {
    /// Write the run's latency by percentile distribution as an SVG plot (with `--rates`,
    /// one line per step).
    #[arg(long, value_name = "FILE.svg")]
    pub plot: Option<PathBuf>,
    /// Save the run's latency histogram (ns; HdrHistogram V2 encoding, base64) for
    /// `loadgen plot`. One rate only.
    #[arg(long, value_name = "FILE")]
    pub save_hist: Option<PathBuf>,
}

impl HistOut {
    /// Checks before the run; `steps` is how many measured steps the run will have.
    pub fn check(&self, steps: usize) -> Result<(), String> {
        if let Some(p) = &self.plot {
            check_writable_dir("--plot", p)?;
        }
        if let Some(p) = &self.save_hist {
            check_writable_dir("--save-hist", p)?;
            if steps > 1 {
                return Err("--save-hist holds one histogram: give one rate, not --rates".into());
            }
        }
        Ok(())
    }

    /// Writes what was asked for the finished run: `runs` are (series label, histogram), one
    /// per step. Prints where; errors are printed and give exit code 1.
    pub fn write(&self, runs: &[(String, Histogram<u64>)], title: &str, note: &str) -> i32 {
        let mut code = 0;
        if let Some(p) = &self.save_hist {
            match runs.last() {
                Some((label, h)) => match save_hist(p, h, &format!("label: {label}\n{note}")) {
                    Ok(()) => eprintln!("loadgen: histogram saved to {}", p.display()),
                    Err(e) => {
                        eprintln!("loadgen: --save-hist {e}");
                        code = 1;
                    }
                },
                None => {
                    eprintln!("loadgen: --save-hist: no measured run");
                    code = 1;
                }
            }
        }
        if let Some(p) = &self.plot {
            let r = runs
                .iter()
                .map(|(label, h)| series(label, h))
                .collect::<Result<Vec<_>, _>>()
                .and_then(|s| write_svg(p, &s, title, note));
            match r {
                Ok(()) => eprintln!("loadgen: latency plot written to {}", p.display()),
                Err(e) => {
                    eprintln!("loadgen: --plot {}: {e}", p.display());
                    code = 1;
                }
            }
        }
        code
    }
}

#[derive(Args, Debug, Clone)]
pub struct PlotArgs {
    /// The SVG file to write.
    #[arg(long, value_name = "FILE.svg")]
    pub out: PathBuf,
    /// A histogram file from `--save-hist`, as LABEL=FILE (or FILE: labelled with its
    /// name). Repeatable; one line each, in order.
    #[arg(long = "series", value_name = "LABEL=FILE", required = true)]
    pub series: Vec<String>,
    /// The plot's title.
    #[arg(long, default_value = "Latency by percentile distribution")]
    pub title: String,
    /// A line of small print under the title (scenario, machine, date).
    #[arg(long, default_value = "")]
    pub note: String,
}

/// `LABEL=FILE`, or `FILE` labelled with its file name.
pub fn parse_series_arg(arg: &str) -> (String, PathBuf) {
    match arg.split_once('=') {
        Some((label, file)) if !label.is_empty() && !file.is_empty() => {
            (label.to_string(), PathBuf::from(file))
        }
        _ => {
            let p = PathBuf::from(arg);
            let label = p
                .file_stem()
                .map_or_else(|| arg.to_string(), |s| s.to_string_lossy().into_owned());
            (label, p)
        }
    }
}

/// `loadgen plot`: reads every series, draws them on one plot; a summary line per series
/// on stdout. Exit 1 on any unreadable file or empty histogram (nothing is written then).
pub fn main(a: PlotArgs) -> i32 {
    let mut all = Vec::new();
    for arg in &a.series {
        let (label, path) = parse_series_arg(arg);
        match load_hist(&path).and_then(|h| series(&label, &h)) {
            Ok(s) => all.push(s),
            Err(e) => {
                eprintln!("loadgen plot: {e}");
                return 1;
            }
        }
    }
    if let Err(e) = write_svg(&a.out, &all, &a.title, &a.note) {
        eprintln!("loadgen plot: {e}");
        return 1;
    }
    for s in &all {
        println!(
            "  {:<24} p50 {} ms  p99 {} ms  max {} ms  ({} samples)",
            s.label,
            fmt_ms(s.p50_ms),
            fmt_ms(s.p99_ms),
            fmt_ms(s.max_ms),
            group_digits(s.count)
        );
    }
    println!("latency plot: {}", a.out.display());
    0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::common::histogram;

    /// A minimal XML well-formedness check: balanced and properly nested tags, one root,
    /// quoted attributes, no stray `<`, every `&` an entity.
    fn well_formed(s: &str) -> Result<(), String> {
        fn text_ok(t: &str) -> Result<(), String> {
            let mut rest = t;
            while let Some(i) = rest.find('&') {
                rest = &rest[i + 1..];
                let end = rest.find(';').ok_or("& without ;")?;
                let ent = &rest[..end];
                let ok = matches!(ent, "amp" | "lt" | "gt" | "quot" | "apos")
                    || (ent.starts_with('#') && ent.len() > 1);
                if !ok {
                    return Err(format!("bad entity &{ent};"));
                }
            }
            Ok(())
        }
        let mut stack: Vec<&str> = Vec::new();
        let mut roots = 0;
        let mut rest = s;
        while let Some(i) = rest.find('<') {
            text_ok(&rest[..i])?;
            if stack.is_empty() && !rest[..i].trim().is_empty() {
                return Err("text outside the root".into());
            }
            rest = &rest[i..];
            if let Some(r) = rest.strip_prefix("<?") {
                let e = r.find("?>").ok_or("unclosed <?")?;
                rest = &r[e + 2..];
                continue;
            }
            if let Some(r) = rest.strip_prefix("<!--") {
                let e = r.find("-->").ok_or("unclosed comment")?;
                rest = &r[e + 3..];
                continue;
            }
            let e = rest.find('>').ok_or("unclosed tag")?;
            let tag = &rest[1..e];
            rest = &rest[e + 1..];
            if tag.contains('<') {
                return Err(format!("< inside tag {tag}"));
            }
            if let Some(name) = tag.strip_prefix('/') {
                let open = stack.pop().ok_or(format!("</{name}> without an open tag"))?;
                if open != name.trim() {
                    return Err(format!("<{open}> closed by </{name}>"));
                }
                continue;
            }
            let self_closing = tag.ends_with('/');
            let body = tag.trim_end_matches('/');
            let name = body.split_whitespace().next().ok_or("empty tag")?;
            if !body.matches('"').count().is_multiple_of(2) {
                return Err(format!("unbalanced quotes in <{tag}>"));
            }
            text_ok(body)?;
            if stack.is_empty() {
                roots += 1;
            }
            if !self_closing {
                stack.push(name);
            }
        }
        text_ok(rest)?;
        if !rest.trim().is_empty() {
            return Err("text after the root".into());
        }
        if let Some(open) = stack.pop() {
            return Err(format!("<{open}> never closed"));
        }
        if roots != 1 {
            return Err(format!("{roots} root elements"));
        }
        Ok(())
    }

    /// 100,000 samples: mostly 50..150 µs, a tail up to 20 ms.
    fn sample_hist(scale: u64) -> Histogram<u64> {
        let mut h = histogram();
        let mut rng = crate::common::Rng::new(7);
        for i in 0..100_000u64 {
            let v = if i % 1000 == 0 {
                1_000_000 + rng.below(19_000_000) as u64
            } else {
                50_000 + rng.below(100_000) as u64
            };
            h.record(v * scale).unwrap();
        }
        h
    }

    #[test]
    fn the_checker_catches_broken_xml() {
        assert!(well_formed("<a><b/></a>").is_ok());
        assert!(well_formed("<a><b></a>").is_err());
        assert!(well_formed("<a>x & y</a>").is_err());
        assert!(well_formed("<a x=\"1></a>").is_err());
        assert!(well_formed("<a/><b/>").is_err());
        assert!(well_formed("<a>").is_err());
    }

    #[test]
    fn the_svg_is_well_formed_and_labelled() {
        let s = vec![
            series("tickgate", &sample_hist(1)).unwrap(),
            series("baseline <tokio> & co", &sample_hist(3)).unwrap(),
        ];
        let svg = render_svg(&s, "(A) fan-out", "short run, 2 vCPU").unwrap();
        well_formed(&svg).unwrap();
        assert!(svg.starts_with("<?xml"));
        assert!(svg.contains(r#"xmlns="http://www.w3.org/2000/svg""#));
        for l in ["0%", "90%", "99%", "99.9%", "99.99%", "99.999%"] {
            assert!(svg.contains(&format!(">{l}</text>")), "tick label {l}");
        }
        assert!(svg.contains("latency (ms)"));
        assert!(svg.contains("(A) fan-out") && svg.contains("short run, 2 vCPU"));
        assert!(svg.contains(">tickgate: p50 "));
        assert!(svg.contains("baseline &lt;tokio&gt; &amp; co: p50"));
        assert_eq!(svg.matches("<polyline").count(), 2);
        // Nothing external.
        assert!(!svg.contains("<script") && !svg.contains("@import") && !svg.contains("href"));
    }

    #[test]
    fn points_are_monotone_and_span_the_distribution() {
        let h = sample_hist(1);
        let s = series("x", &h).unwrap();
        assert!(s.points.len() > 20, "{} points", s.points.len());
        for w in s.points.windows(2) {
            assert!(w[1].0 >= w[0].0 && w[1].1 >= w[0].1, "{:?} then {:?}", w[0], w[1]);
        }
        let first = s.points[0];
        let last = *s.points.last().unwrap();
        assert_eq!(first.0, 0.0);
        assert!((first.1 - ms(h.min())).abs() < 0.001);
        // The last point is the max, at the place of 1 sample in 100,000.
        assert!((last.0 - 5.0).abs() < 1e-9, "{last:?}");
        assert!((last.1 - ms(h.max())).abs() < 1e-9);
        assert!((s.p50_ms - 0.1).abs() < 0.01, "{}", s.p50_ms);
        assert_eq!(s.count, 100_000);
    }

    #[test]
    fn the_axis_grows_with_the_samples() {
        let mut h = histogram();
        for v in 1..=2_000_000u64 {
            h.record(v).unwrap();
        }
        let svg = render_svg(&[series("big", &h).unwrap()], "t", "").unwrap();
        well_formed(&svg).unwrap();
        assert!(svg.contains(">99.9999%</text>") && svg.contains(">99.99999%</text>"));
        assert!(!svg.contains(">99.999999%</text>"));
        // Few samples: still the five decades.
        let mut h = histogram();
        h.record(1_000).unwrap();
        let s = series("one", &h).unwrap();
        assert!(s.points.iter().all(|p| p.0 == 0.0));
        let svg = render_svg(&[s], "t", "").unwrap();
        well_formed(&svg).unwrap();
        assert!(svg.contains(">99.999%</text>"));
    }

    #[test]
    fn empty_input_is_an_error_not_a_panic() {
        let e = series("floor", &histogram()).unwrap_err();
        assert!(e.contains("floor") && e.contains("no latency samples"), "{e}");
        assert!(render_svg(&[], "t", "").unwrap_err().contains("no series"));
        let hollow = Series {
            label: "h".into(),
            points: vec![],
            count: 0,
            p50_ms: 0.0,
            p99_ms: 0.0,
            max_ms: 0.0,
        };
        assert!(render_svg(&[hollow], "t", "").is_err());
    }

    #[test]
    fn histogram_files_round_trip_and_bad_ones_are_errors() {
        let h = sample_hist(1);
        let text = encode_hist(&h, "label: x\nsecond line").unwrap();
        assert!(text.starts_with("# loadgen") && text.contains("# second line\n"));
        let back = decode_hist(&text).unwrap();
        assert_eq!(back.len(), h.len());
        assert_eq!(back.max(), h.max());
        assert_eq!(back.value_at_quantile(0.99), h.value_at_quantile(0.99));

        let dir = std::env::temp_dir().join(format!("loadgen-plot-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("a.hist");
        save_hist(&f, &h, "").unwrap();
        assert_eq!(load_hist(&f).unwrap().len(), h.len());
        let missing = dir.join("missing.hist");
        assert!(load_hist(&missing).unwrap_err().contains("missing.hist"));
        for bad in ["", "# only a comment\n", "!!! not base64", "aGVsbG8gd29ybGQ=\n"] {
            assert!(decode_hist(bad).is_err(), "{bad:?}");
        }
        // A header asking for 4 GiB of counts, a truncated file, a huge range: errors, before
        // any allocation from them.
        let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
        let good = base64::engine::general_purpose::STANDARD
            .decode(text.lines().last().unwrap())
            .unwrap();
        let mut huge = good.clone();
        huge[4..8].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(decode_hist(&b64(&huge)).unwrap_err().contains("damaged"));
        let cut = &good[..good.len() - 1];
        assert!(decode_hist(&b64(cut)).unwrap_err().contains("damaged"));
        let mut wide = good.clone();
        wide[24..32].copy_from_slice(&u64::MAX.to_be_bytes());
        assert!(decode_hist(&b64(&wide)).unwrap_err().contains("unsupported"));
        let mut deflated = Vec::new();
        hdrhistogram::serialization::V2DeflateSerializer::new()
            .serialize(&h, &mut deflated)
            .unwrap();
        assert!(decode_hist(&b64(&deflated)).unwrap_err().contains("no V2 header"));
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn the_plot_command_draws_files_and_fails_cleanly() {
        let dir = std::env::temp_dir().join(format!("loadgen-plot-cmd-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (a, b) = (dir.join("a.hist"), dir.join("b.hist"));
        save_hist(&a, &sample_hist(1), "").unwrap();
        save_hist(&b, &sample_hist(2), "").unwrap();
        let out = dir.join("p.svg");
        let args = |series: Vec<String>, out: PathBuf| PlotArgs {
            out,
            series,
            title: "t".into(),
            note: String::new(),
        };
        let ok = args(
            vec![format!("tickgate={}", a.display()), b.display().to_string()],
            out.clone(),
        );
        assert_eq!(main(ok), 0);
        let svg = std::fs::read_to_string(&out).unwrap();
        well_formed(&svg).unwrap();
        assert!(svg.contains(">tickgate: p50") && svg.contains(">b: p50"));

        let out2 = dir.join("q.svg");
        let missing = args(vec![format!("x={}", dir.join("nope").display())], out2.clone());
        assert_eq!(main(missing), 1);
        let empty = dir.join("empty.hist");
        save_hist(&empty, &histogram(), "").unwrap();
        assert_eq!(main(args(vec![empty.display().to_string()], out2.clone())), 1);
        assert!(!out2.exists(), "nothing written on error");
        let no_dir = args(vec![a.display().to_string()], dir.join("no/such/dir.svg"));
        assert_eq!(main(no_dir), 1);
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn series_args_and_decade_labels() {
        assert_eq!(
            parse_series_arg("tg=a/b.hist"),
            ("tg".into(), PathBuf::from("a/b.hist"))
        );
        assert_eq!(
            parse_series_arg("a/floor.hist"),
            ("floor".into(), PathBuf::from("a/floor.hist"))
        );
        assert_eq!(parse_series_arg("=x").1, PathBuf::from("=x"));
        let l: Vec<String> = (0..6).map(decade_label).collect();
        assert_eq!(l, ["0%", "90%", "99%", "99.9%", "99.99%", "99.999%"]);
    }

    #[test]
    fn hist_out_checks_before_the_run() {
        let o = HistOut {
            plot: Some(PathBuf::from("/no/such/dir/x.svg")),
            save_hist: None,
        };
        assert!(o.check(1).unwrap_err().contains("--plot"));
        let o = HistOut {
            plot: None,
            save_hist: Some(std::env::temp_dir().join("x.hist")),
        };
        assert!(o.check(1).is_ok());
        assert!(o.check(3).is_err());
        assert!(HistOut::default().check(5).is_ok());
        // Nothing measured: an error, not a panic.
        let o = HistOut {
            plot: Some(std::env::temp_dir().join(format!("lg-empty-{}.svg", std::process::id()))),
            save_hist: None,
        };
        assert_eq!(o.write(&[("x".into(), histogram())], "t", ""), 1);
    }
}
