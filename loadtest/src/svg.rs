//! A dependency-free SVG chart: stacked panels sharing the x axis, each
//! with its own y scale (latency, counts and memory differ by orders of
//! magnitude), one polyline per series, round tick values, and an
//! optional horizontal bound in the first panel.

use std::fmt::Write;

const W: f64 = 900.0;
const PANEL_H: f64 = 220.0;
const LEFT: f64 = 80.0;
const RIGHT: f64 = 20.0;
const COLORS: [&str; 4] = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd"];

/// One named line: (x, value) points.
pub type Series<'a> = (&'a str, Vec<(u64, f64)>);

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// A round step (1, 2, 2.5 or 5 times a power of ten) that splits `max`
/// into at most `ticks` intervals.
fn nice_step(max: f64, ticks: f64) -> f64 {
    let raw = (max / ticks).max(1e-9);
    let pow = 10f64.powf(raw.log10().floor());
    [1.0, 2.0, 2.5, 5.0, 10.0]
        .into_iter()
        .map(|m| m * pow)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * pow)
}

/// A tick label short enough for the margin: 1.2M, 350k, 36, 0.25.
fn label(v: f64) -> String {
    let a = v.abs();
    let trim = |s: String| {
        if s.contains('.') {
            s.trim_end_matches('0').trim_end_matches('.').to_owned()
        } else {
            s
        }
    };
    if a >= 1e6 {
        format!("{}M", trim(format!("{:.2}", v / 1e6)))
    } else if a >= 1e3 {
        format!("{}k", trim(format!("{:.1}", v / 1e3)))
    } else if a >= 10.0 || a == 0.0 {
        format!("{v:.0}")
    } else {
        trim(format!("{v:.2}"))
    }
}

/// How the x axis is labelled.
struct XAxis<'a> {
    /// Caption under the axis.
    caption: &'a str,
    /// Tick positions and labels.
    ticks: Vec<(u64, String)>,
    /// Largest x.
    max: f64,
}

fn panel(
    out: &mut String,
    top: f64,
    series: &[Series<'_>],
    x_axis: &XAxis<'_>,
    bound: Option<f64>,
) {
    let data_max = series
        .iter()
        .flat_map(|(_, pts)| pts.iter().map(|p| p.1))
        .chain(bound)
        .filter(|v| v.is_finite())
        .fold(0.0f64, f64::max)
        .max(1e-9);
    let step = nice_step(data_max * 1.05, 4.0);
    let y_max = (data_max * 1.05 / step).ceil() * step;
    let plot_w = W - LEFT - RIGHT;
    let plot_h = PANEL_H - 40.0;
    let x = |t: f64| LEFT + t / x_axis.max.max(1.0) * plot_w;
    let y = |v: f64| top + 10.0 + plot_h - v / y_max * plot_h;
    let _ = write!(
        out,
        r##"<rect x="{LEFT}" y="{}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#999"/>"##,
        top + 10.0
    );
    let mut v = 0.0;
    while v <= y_max + step / 2.0 {
        let _ = write!(
            out,
            r##"<text x="{}" y="{}" font-size="11" text-anchor="end" fill="#555">{}</text><line x1="{LEFT}" x2="{}" y1="{}" y2="{}" stroke="#eee"/>"##,
            LEFT - 5.0,
            y(v) + 4.0,
            label(v),
            W - RIGHT,
            y(v),
            y(v)
        );
        v += step;
    }
    for (t, text) in &x_axis.ticks {
        let _ = write!(
            out,
            r##"<line x1="{0:.1}" x2="{0:.1}" y1="{1}" y2="{2}" stroke="#999"/><text x="{0:.1}" y="{3}" font-size="10" text-anchor="middle" fill="#555">{4}</text>"##,
            x(*t as f64),
            top + 10.0 + plot_h,
            top + 14.0 + plot_h,
            top + 25.0 + plot_h,
            escape(text)
        );
    }
    if let Some(b) = bound {
        let _ = write!(
            out,
            r##"<line x1="{LEFT}" x2="{right}" y1="{yb:.1}" y2="{yb:.1}" stroke="#d62728" stroke-dasharray="6 4"/><text x="{tx}" y="{ty:.1}" font-size="11" text-anchor="end" fill="#d62728">bound {text}</text>"##,
            right = W - RIGHT,
            yb = y(b),
            tx = W - RIGHT - 4.0,
            ty = y(b) - 4.0,
            text = label(b)
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

fn chart(title: &str, x_axis: &XAxis<'_>, bound: Option<f64>, panels: &[&[Series<'_>]]) -> String {
    let h = panels.len().max(1) as f64 * PANEL_H + 60.0;
    let mut out = String::new();
    let _ = write!(
        out,
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{h}" viewBox="0 0 {W} {h}" font-family="sans-serif"><rect width="100%" height="100%" fill="white"/><text x="{LEFT}" y="22" font-size="15">{}</text>"##,
        escape(title)
    );
    for (i, series) in panels.iter().enumerate() {
        let top = 30.0 + PANEL_H * i as f64;
        panel(&mut out, top, series, x_axis, bound.filter(|_| i == 0));
    }
    let _ = write!(
        out,
        r##"<text x="{}" y="{}" font-size="12" text-anchor="middle" fill="#555">{}</text></svg>"##,
        LEFT + (W - LEFT - RIGHT) / 2.0,
        h - 6.0,
        escape(x_axis.caption)
    );
    out.push('\n');
    out
}

/// A chart over time: x is seconds since the run started.
pub fn render(title: &str, panels: &[&[Series<'_>]]) -> String {
    let max = panels
        .iter()
        .flat_map(|series| series.iter())
        .flat_map(|(_, p)| p.iter().map(|x| x.0 as f64))
        .fold(1.0f64, f64::max);
    let step = nice_step(max, 10.0).max(1.0) as u64;
    let ticks = (0..=max as u64)
        .step_by(step as usize)
        .map(|t| (t, t.to_string()))
        .collect();
    let x_axis = XAxis {
        caption: "seconds",
        ticks,
        max,
    };
    chart(title, &x_axis, None, panels)
}

/// A chart over steps (x = step index, labelled with `steps`), with the
/// first panel's `bound` drawn as a dashed line.
pub fn render_steps(
    title: &str,
    caption: &str,
    steps: &[String],
    bound: f64,
    panels: &[&[Series<'_>]],
) -> String {
    let x_axis = XAxis {
        caption,
        ticks: steps
            .iter()
            .enumerate()
            .map(|(i, s)| (i as u64, s.clone()))
            .collect(),
        max: steps.len().saturating_sub(1).max(1) as f64,
    };
    chart(title, &x_axis, Some(bound), panels)
}

/// Per-second increase of a cumulative counter series.
pub fn per_second(cumulative: &[(u64, f64)]) -> Vec<(u64, f64)> {
    cumulative
        .windows(2)
        .map(|w| {
            let dt = w[1].0.saturating_sub(w[0].0).max(1) as f64;
            (w[1].0, ((w[1].1 - w[0].1) / dt).max(0.0))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_series() {
        let svg = render(
            "t <1>",
            &[
                &[("a", vec![(0, 1.0), (1, 2.0)])],
                &[("b", vec![(0, 5.0)]), ("c", vec![])],
                &[("d", vec![(0, 5e6)])],
            ],
        );
        assert!(svg.starts_with("<svg"));
        assert_eq!(svg.matches("<polyline").count(), 4);
        assert_eq!(svg.matches("<rect x=").count(), 3, "one frame per panel");
        assert!(svg.contains("t &lt;1&gt;"));
    }

    #[test]
    fn ticks_are_round_and_short() {
        assert_eq!(nice_step(1_420_511.0, 4.0), 500_000.0);
        assert_eq!(nice_step(72.7, 4.0), 20.0);
        assert_eq!(nice_step(0.9, 4.0), 0.25);
        assert_eq!(label(1_500_000.0), "1.5M");
        assert_eq!(label(350_000.0), "350k");
        assert_eq!(label(40.0), "40");
        assert_eq!(label(0.25), "0.25");
    }

    #[test]
    fn steps_chart_labels_steps_and_bound() {
        let svg = render_steps(
            "ramp",
            "msg/s per room",
            &["400".into(), "560".into()],
            50.0,
            &[
                &[("p99 (ms)", vec![(0, 14.0), (1, 66.0)])],
                &[("deliveries/s", vec![(0, 4e5), (1, 5.6e5)])],
            ],
        );
        assert!(svg.contains(">560<"));
        assert!(svg.contains("bound 50"));
        assert!(svg.contains("msg/s per room"));
        assert_eq!(svg.matches("bound").count(), 1, "the bound is drawn once");
    }

    #[test]
    fn per_second_differences_a_cumulative_counter() {
        let rate = per_second(&[(1, 0.0), (2, 100.0), (4, 500.0)]);
        assert_eq!(rate, vec![(2, 100.0), (4, 200.0)]);
    }
}
