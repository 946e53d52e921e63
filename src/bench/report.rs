//! Bench output: the progress and summary lines, the terminal table, the
//! JSON document and a self-contained HTML report with inline SVG charts.

use std::fmt::Write;

use serde::Serialize;

use super::results::{IdleResult, StepResult, TIERS_MS};

#[derive(Serialize)]
pub struct Report {
    pub url: String,
    pub started: i64,
    pub duration_secs: u64,
    pub room_size: usize,
    pub open_files: (u64, u64),
    pub steps: Vec<StepResult>,
}

fn verdict(b: bool) -> &'static str {
    if b { "pass" } else { "FAIL" }
}

fn opt(v: Option<f64>, digits: usize) -> String {
    v.map(|x| format!("{x:.digits$}"))
        .unwrap_or_else(|| "-".into())
}

pub fn print_step_line(r: &StepResult) {
    println!(
        "{} users, {} msg/s: achieved {:.0}/s, sent {}, errors {}, lost {}, history mismatches {}, \
         deliver p50 {:.2} ms p99 {:.2} ms max {:.2} ms, server CPU {}%, RSS {} MB — {} (≤{} ms)",
        r.users,
        r.rate,
        r.achieved_rate,
        r.sent,
        r.errors,
        r.lost,
        r.history_mismatches,
        r.deliver_ms.p50,
        r.deliver_ms.p99,
        r.deliver_ms.max,
        opt(r.server_cpu_percent, 0),
        opt(r.server_rss_mb, 0),
        verdict(r.pass[0]),
        TIERS_MS[0],
    );
    if !r.errors_by_kind.is_empty() {
        println!("  errors: {:?}", r.errors_by_kind);
    }
}

pub fn print_table(steps: &[StepResult]) {
    println!();
    println!(
        "| users | rate | achieved | sent | errors | lost | deliver p50 | p90 | p99 | p99.9 | max | ack p99 | CPU % | RSS MB | ≤1000 ms | ≤2000 ms |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for r in steps {
        println!(
            "| {} | {} | {:.0} | {} | {} | {} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {} | {} | {} | {} |",
            r.users,
            r.rate,
            r.achieved_rate,
            r.sent,
            r.errors,
            r.lost + r.history_mismatches,
            r.deliver_ms.p50,
            r.deliver_ms.p90,
            r.deliver_ms.p99,
            r.deliver_ms.p999,
            r.deliver_ms.max,
            r.ack_ms.p99,
            opt(r.server_cpu_percent, 0),
            opt(r.server_rss_peak_mb.or(r.server_rss_mb), 0),
            verdict(r.pass[0]),
            verdict(r.pass[1]),
        );
    }
    println!(
        "(latencies in ms, send→deliver unless marked; lost counts undelivered and history mismatches)"
    );
}

pub fn print_idle(r: &IdleResult) {
    println!(
        "idle connections: {} of {} open ({} failed); server RSS {:.1} → {:.1} MB, {:.2} KB per connection; \
         server fds {}; bench open-file limit soft {} hard {}",
        r.opened,
        r.requested,
        r.failed,
        r.rss_before_mb,
        r.rss_after_mb,
        r.rss_per_connection_kb,
        r.server_open_fds,
        r.bench_open_files.0,
        r.bench_open_files.1,
    );
    if let Some(e) = &r.first_error {
        println!("  first error: {e}");
    }
    println!("  {}", r.note);
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// A named, coloured line of (x, y) points.
type Series<'a> = (&'a str, &'a str, Vec<(f64, f64)>);

/// A line chart as inline SVG. `log_x` plots x as -log10(1 - x/100)
/// (percentiles: 0, 90, 99, 99.9 … equally spaced).
fn chart(title: &str, x_label: &str, series: &[Series<'_>], log_x: bool) -> String {
    let (w, h, l, b, t, r) = (520.0, 260.0, 56.0, 36.0, 24.0, 12.0);
    let tx = |x: f64| {
        if log_x {
            let q = (x / 100.0).min(0.99999);
            -(1.0 - q).log10()
        } else {
            x
        }
    };
    let pts: Vec<(f64, f64)> = series
        .iter()
        .flat_map(|s| s.2.iter().map(|&(x, y)| (tx(x), y)))
        .collect();
    let xmax = pts.iter().map(|p| p.0).fold(0.0f64, f64::max).max(1e-9);
    let ymax = pts.iter().map(|p| p.1).fold(0.0f64, f64::max).max(1e-3) * 1.1;
    let px = |x: f64| l + (x / xmax) * (w - l - r);
    let py = |y: f64| h - b - (y / ymax) * (h - b - t);
    let mut s = String::new();
    let _ = write!(
        s,
        r#"<svg viewBox="0 0 {w} {h}" width="{w}" height="{h}" role="img" aria-label="{}"><rect width="100%" height="100%" fill="white"/><text x="{l}" y="16" font-size="13" font-weight="bold">{}</text>"#,
        esc(title),
        esc(title)
    );
    for i in 0..=4 {
        let y = ymax * i as f64 / 4.0;
        let _ = write!(
            s,
            r##"<line x1="{l}" x2="{}" y1="{py:.1}" y2="{py:.1}" stroke="#ddd"/><text x="{}" y="{:.1}" font-size="10" text-anchor="end">{y:.1}</text>"##,
            w - r,
            l - 4.0,
            py(y) + 3.0,
            py = py(y),
        );
    }
    let ticks: Vec<(f64, String)> = if log_x {
        [0.0, 90.0, 99.0, 99.9, 99.99, 99.999]
            .iter()
            .map(|&p| (tx(p), format!("{p}")))
            .filter(|(x, _)| *x <= xmax + 1e-9)
            .collect()
    } else {
        (0..=5)
            .map(|i| {
                (
                    xmax * i as f64 / 5.0,
                    format!("{:.0}", xmax * i as f64 / 5.0),
                )
            })
            .collect()
    };
    for (x, label) in ticks {
        let _ = write!(
            s,
            r#"<text x="{:.1}" y="{}" font-size="10" text-anchor="middle">{}</text>"#,
            px(x),
            h - b + 14.0,
            esc(&label)
        );
    }
    let _ = write!(
        s,
        r#"<text x="{}" y="{}" font-size="11" text-anchor="middle">{}</text><text x="12" y="{}" font-size="11" transform="rotate(-90 12 {})" text-anchor="middle">ms</text>"#,
        (l + w - r) / 2.0,
        h - 6.0,
        esc(x_label),
        (t + h - b) / 2.0,
        (t + h - b) / 2.0
    );
    for (i, (name, color, data)) in series.iter().enumerate() {
        let path: Vec<String> = data
            .iter()
            .map(|&(x, y)| format!("{:.1},{:.1}", px(tx(x)), py(y)))
            .collect();
        let _ = write!(
            s,
            r#"<polyline fill="none" stroke="{color}" stroke-width="1.6" points="{}"/><text x="{}" y="16" font-size="11" fill="{color}">{}</text>"#,
            path.join(" "),
            w - r - 150.0 + 75.0 * i as f64,
            esc(name)
        );
    }
    s.push_str("</svg>");
    s
}

pub fn html(rep: &Report) -> String {
    let mut s = String::from(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>confab bench report</title>\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><style>\
         body{font-family:system-ui,sans-serif;margin:1.5rem;color:#111}table{border-collapse:collapse;font-size:13px}\
         td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}.pass{background:#d9f5dd}.fail{background:#fbd5d5}\
         .charts{display:flex;flex-wrap:wrap;gap:12px}section{margin:1.5rem 0}svg{max-width:100%;height:auto}\
         </style></head><body><h1>confab bench</h1>",
    );
    let _ = write!(
        s,
        "<p>Target {} · {} s per step · {} users per room · bench open-file limit {}/{}</p>",
        esc(&rep.url),
        rep.duration_secs,
        rep.room_size,
        rep.open_files.0,
        rep.open_files.1
    );
    s.push_str("<table><tr><th>users</th><th>rate</th><th>achieved</th><th>sent</th><th>errors</th><th>lost</th><th>p50</th><th>p90</th><th>p99</th><th>p99.9</th><th>max</th><th>ack p99</th><th>CPU %</th><th>RSS MB</th><th>≤1000 ms</th><th>≤2000 ms</th></tr>");
    for r in &rep.steps {
        let cls = |b: bool| if b { "pass" } else { "fail" };
        let _ = write!(
            s,
            "<tr><td>{}</td><td>{}</td><td>{:.0}</td><td>{}</td><td>{}</td><td>{}</td><td>{:.2}</td><td>{:.2}</td><td>{:.2}</td><td>{:.2}</td><td>{:.2}</td><td>{:.2}</td><td>{}</td><td>{}</td><td class=\"{}\">{}</td><td class=\"{}\">{}</td></tr>",
            r.users,
            r.rate,
            r.achieved_rate,
            r.sent,
            r.errors,
            r.lost + r.history_mismatches,
            r.deliver_ms.p50,
            r.deliver_ms.p90,
            r.deliver_ms.p99,
            r.deliver_ms.p999,
            r.deliver_ms.max,
            r.ack_ms.p99,
            opt(r.server_cpu_percent, 0),
            opt(r.server_rss_peak_mb.or(r.server_rss_mb), 0),
            cls(r.pass[0]),
            verdict(r.pass[0]),
            cls(r.pass[1]),
            verdict(r.pass[1]),
        );
    }
    s.push_str("</table><p>Latencies in milliseconds, send→deliver (from the scheduled send time) unless marked.</p>");
    for r in &rep.steps {
        let _ = write!(
            s,
            "<section><h2>{} users, {} msg/s</h2><div class=\"charts\">",
            r.users, r.rate
        );
        let p50: Vec<(f64, f64)> = r.per_second.iter().map(|p| (p.0 as f64, p.1)).collect();
        let p99: Vec<(f64, f64)> = r.per_second.iter().map(|p| (p.0 as f64, p.2)).collect();
        let max: Vec<(f64, f64)> = r.per_second.iter().map(|p| (p.0 as f64, p.3)).collect();
        s.push_str(&chart(
            "send→deliver latency over time",
            "second of the step",
            &[
                ("p50", "#1f77b4", p50),
                ("p99", "#d62728", p99),
                ("max", "#999", max),
            ],
            false,
        ));
        s.push_str(&chart(
            "send→deliver latency by percentile",
            "percentile",
            &[("latency", "#2ca02c", r.deliver_curve.clone())],
            true,
        ));
        s.push_str("</div></section>");
    }
    s.push_str("</body></html>\n");
    s
}
