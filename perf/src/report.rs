//! Latency files people can read or look at: HdrHistogram's classic
//! percentile-distribution text (`.hgrm`, readable by HdrHistogram's
//! plotter and by hand) and an SVG percentile curve of several runs.
//! Hand-written: both formats are a few lines, and a plotting crate would
//! bring a font stack for one chart.

use std::fmt::Write;

use hdrhistogram::Histogram;

/// The `.hgrm` text of a histogram of microseconds, values in milliseconds.
pub fn hgrm(latency_us: &Histogram<u64>) -> String {
    let mut out = String::from("       Value     Percentile TotalCount 1/(1-Percentile)\n\n");
    let mut total = 0u64;
    for v in latency_us.iter_quantiles(5) {
        total += v.count_since_last_iteration();
        let q = v.quantile_iterated_to();
        let inverse = if q < 1.0 { format!("{:.2}", 1.0 / (1.0 - q)) } else { "inf".into() };
        let _ =
            writeln!(out, "{:12.3} {:14.12} {:10} {:>14}", v.value_iterated_to() as f64 / 1000.0, q, total, inverse);
    }
    let _ = writeln!(
        out,
        "#[Mean    = {:12.3}, StdDeviation   = {:12.3}]\n#[Max     = {:12.3}, Total count    = {:12}]",
        latency_us.mean() / 1000.0,
        latency_us.stdev() / 1000.0,
        latency_us.max() as f64 / 1000.0,
        latency_us.len()
    );
    out
}

/// An SVG chart: latency (ms, log scale) against percentile (log scale of
/// 1/(1-p), from 0% to 99.999%), one curve per named histogram.
pub fn svg(title: &str, curves: &[(String, &Histogram<u64>)]) -> String {
    const W: f64 = 900.0;
    const H: f64 = 520.0;
    const LEFT: f64 = 70.0;
    const BOTTOM: f64 = 60.0;
    const TOP: f64 = 40.0;
    const RIGHT: f64 = 180.0;
    const COLOURS: [&str; 6] = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b"];
    let nines_max = 5.0; // 99.999%
    let max_ms = curves.iter().map(|(_, h)| h.max() as f64 / 1000.0).fold(1.0, f64::max);
    let (log_min, log_max) = (-2.0f64, max_ms.log10().ceil().max(0.0)); // 0.01 ms ..
    let x = |q: f64| LEFT + ((1.0 / (1.0 - q.min(0.99999))).log10() / nines_max) * (W - LEFT - RIGHT);
    let y = |ms: f64| {
        let l = ms.max(0.01).log10().clamp(log_min, log_max);
        H - BOTTOM - (l - log_min) / (log_max - log_min) * (H - BOTTOM - TOP)
    };
    let mut out = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{W}\" height=\"{H}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n<text x=\"{LEFT}\" y=\"24\" font-size=\"15\">{}</text>\n",
        escape(title)
    );
    for n in 0..=5 {
        let q = 1.0 - 10f64.powi(-n);
        let label = ["0%", "90%", "99%", "99.9%", "99.99%", "99.999%"][n as usize];
        let px = x(q);
        let _ = writeln!(
            out,
            "<line x1=\"{px:.1}\" y1=\"{TOP}\" x2=\"{px:.1}\" y2=\"{:.1}\" stroke=\"#ddd\"/><text x=\"{px:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{label}</text>",
            H - BOTTOM,
            H - BOTTOM + 18.0
        );
    }
    let mut decade = log_min;
    while decade <= log_max {
        let ms = 10f64.powf(decade);
        let py = y(ms);
        let _ = writeln!(
            out,
            "<line x1=\"{LEFT}\" y1=\"{py:.1}\" x2=\"{:.1}\" y2=\"{py:.1}\" stroke=\"#ddd\"/><text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{ms} ms</text>",
            W - RIGHT,
            LEFT - 6.0,
            py + 4.0
        );
        decade += 1.0;
    }
    let _ = writeln!(
        out,
        "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">percentile (latency from the scheduled send time)</text>",
        (LEFT + W - RIGHT) / 2.0,
        H - 16.0
    );
    for (i, (name, h)) in curves.iter().enumerate() {
        let colour = COLOURS[i % COLOURS.len()];
        let points: Vec<String> = h
            .iter_quantiles(5)
            .filter(|v| v.quantile_iterated_to() <= 0.99999)
            .map(|v| format!("{:.1},{:.1}", x(v.quantile_iterated_to()), y(v.value_iterated_to() as f64 / 1000.0)))
            .collect();
        let _ = writeln!(
            out,
            "<polyline fill=\"none\" stroke=\"{colour}\" stroke-width=\"1.6\" points=\"{}\"/>",
            points.join(" ")
        );
        let ly = TOP + 16.0 * i as f64 + 10.0;
        let _ = writeln!(
            out,
            "<line x1=\"{:.1}\" y1=\"{ly:.1}\" x2=\"{:.1}\" y2=\"{ly:.1}\" stroke=\"{colour}\" stroke-width=\"3\"/><text x=\"{:.1}\" y=\"{:.1}\">{}</text>",
            W - RIGHT + 10.0,
            W - RIGHT + 30.0,
            W - RIGHT + 36.0,
            ly + 4.0,
            escape(name)
        );
    }
    out.push_str("</svg>\n");
    out
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_have_the_expected_shape() {
        let mut h = Histogram::<u64>::new(3).unwrap();
        for v in 1..=10_000u64 {
            h.record(v * 10).unwrap();
        }
        let text = hgrm(&h);
        assert!(text.starts_with("       Value     Percentile"));
        assert!(text.contains("Total count    =        10000"));
        let chart = svg("t <1>", &[("a".into(), &h), ("b".into(), &h)]);
        assert!(chart.starts_with("<svg") && chart.ends_with("</svg>\n"));
        assert_eq!(chart.matches("<polyline").count(), 2);
        assert!(chart.contains("t &lt;1&gt;"));
    }
}
