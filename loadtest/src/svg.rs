//! A dependency-free SVG chart: two stacked panels sharing the time axis
//! (top: latency series, bottom: counts), one polyline per series.

use std::fmt::Write;

const W: f64 = 900.0;
const PANEL_H: f64 = 220.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 20.0;
const COLORS: [&str; 4] = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd"];

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

fn panel(out: &mut String, top: f64, series: &[(&str, Vec<(u64, f64)>)], t_max: f64) {
    let y_max = series
        .iter()
        .flat_map(|(_, pts)| pts.iter().map(|p| p.1))
        .filter(|v| v.is_finite())
        .fold(0.0f64, f64::max)
        .max(1e-9)
        * 1.1;
    let plot_w = W - LEFT - RIGHT;
    let plot_h = PANEL_H - 40.0;
    let x = |t: f64| LEFT + t / t_max.max(1.0) * plot_w;
    let y = |v: f64| top + 10.0 + plot_h - v / y_max * plot_h;
    let _ = write!(
        out,
        r##"<rect x="{LEFT}" y="{}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#999"/>"##,
        top + 10.0
    );
    for i in 0..=4 {
        let v = y_max * f64::from(i) / 4.0;
        let _ = write!(
            out,
            r##"<text x="{}" y="{}" font-size="11" text-anchor="end" fill="#555">{v:.3}</text><line x1="{LEFT}" x2="{}" y1="{}" y2="{}" stroke="#eee"/>"##,
            LEFT - 5.0,
            y(v) + 4.0,
            W - RIGHT,
            y(v),
            y(v)
        );
    }
    for (i, (name, pts)) in series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let points: Vec<String> = pts
            .iter()
            .filter(|p| p.1.is_finite())
            .map(|(t, v)| format!("{:.1},{:.1}", x(*t as f64), y(*v)))
            .collect();
        let _ = write!(
            out,
            r##"<polyline fill="none" stroke="{color}" stroke-width="1.5" points="{}"/>"##,
            points.join(" ")
        );
        let _ = write!(
            out,
            r##"<text x="{}" y="{}" font-size="12" fill="{color}">{}</text>"##,
            LEFT + 10.0 + 220.0 * i as f64,
            top + 26.0,
            escape(name)
        );
    }
}

/// Renders the chart.
pub fn render(
    title: &str,
    top: &[(&str, Vec<(u64, f64)>)],
    bottom: &[(&str, Vec<(u64, f64)>)],
) -> String {
    let t_max = top
        .iter()
        .chain(bottom)
        .flat_map(|(_, p)| p.iter().map(|x| x.0 as f64))
        .fold(1.0f64, f64::max);
    let h = 2.0 * PANEL_H + 60.0;
    let mut out = String::new();
    let _ = write!(
        out,
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{h}" viewBox="0 0 {W} {h}" font-family="sans-serif"><rect width="100%" height="100%" fill="white"/><text x="{LEFT}" y="22" font-size="15">{}</text>"##,
        escape(title)
    );
    panel(&mut out, 30.0, top, t_max);
    panel(&mut out, 30.0 + PANEL_H, bottom, t_max);
    let _ = write!(
        out,
        r##"<text x="{}" y="{}" font-size="12" text-anchor="middle" fill="#555">seconds (0 … {t_max:.0})</text></svg>"##,
        LEFT + (W - LEFT - RIGHT) / 2.0,
        h - 8.0
    );
    out.push('\n');
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn renders_every_series() {
        let svg = super::render(
            "t <1>",
            &[("a", vec![(0, 1.0), (1, 2.0)])],
            &[("b", vec![(0, 5.0)]), ("c", vec![])],
        );
        assert!(svg.starts_with("<svg"));
        assert_eq!(svg.matches("<polyline").count(), 3);
        assert!(svg.contains("t &lt;1&gt;"));
    }
}
