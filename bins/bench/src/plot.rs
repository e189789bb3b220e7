//! `--plot FILE.svg`: the measured figures drawn against what the machine
//! allows, with plotters' SVG backend.
//!
//! * [`speed`]: a roofline. x is arithmetic intensity (FLOP per byte of
//!   weights read), y is GFLOP/s; the roof is `min(bandwidth x intensity,
//!   FMA peak)`. Decode (tg) reads the active weights once per token;
//!   prefill (pp) reads every weight once per batch, so its intensity grows
//!   with the batch. Each point is labelled with its tokens/s.
//! * [`kernels`]: one bar per kernel, GB/s against the read bandwidth line
//!   (matrix-vector products), and GFLOP/s against the FMA peak line
//!   (matrix-matrix products) in a second panel.
//!
//! The SVG is rendered into memory and written at the end, so a write error
//! is reported once with the file's name.

use std::path::Path;

use plotters::coord::Shift;
use plotters::prelude::*;
use roundhouse::cli::CliError;
use roundhouse::kernels::bench::{KernelReport, KernelRow};
use roundhouse::speedbench::SpeedReport;

const WIDTH: u32 = 960;
const ROOF: RGBColor = RGBColor(200, 40, 40);
const TG: RGBColor = RGBColor(30, 100, 200);
const PP: RGBColor = RGBColor(230, 130, 0);
const BAR: RGBColor = RGBColor(120, 170, 230);
const GREY: RGBColor = RGBColor(110, 110, 110);

/// A plotters error as the CLI's error, naming the plot.
fn failed(path: &Path, e: impl std::fmt::Display) -> CliError {
    CliError::failure(format!("{}: cannot draw the plot: {e}", path.display()))
}

/// Fails early, before a long run, when the plot could not be written: its
/// directory does not exist.
pub fn check_target(path: &Path) -> Result<(), CliError> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    if dir.is_dir() {
        Ok(())
    } else {
        Err(CliError::usage(format!(
            "--plot {}: directory {} does not exist",
            path.display(),
            dir.display()
        )))
    }
}

fn write(path: &Path, svg: &str) -> Result<(), CliError> {
    std::fs::write(path, svg)
        .map_err(|e| CliError::failure(format!("{}: cannot write the plot: {e}", path.display())))
}

/// One measured test placed on the roofline.
struct RooflinePoint {
    label: String,
    intensity: f64,
    gflops: f64,
    color: RGBColor,
}

/// The tests of a speed report as roofline points; tests whose intensity is
/// unknown (no weight bytes, no MACs) are left out.
fn roofline_points(r: &SpeedReport) -> Vec<RooflinePoint> {
    let flops_per_token = 2.0 * r.prefill_macs_per_token as f64;
    let mut points = Vec::new();
    for t in &r.tests {
        let (bytes_per_forward, tokens_per_forward, color) = if t.test.starts_with("pp") {
            (r.size_bytes as f64, t.tokens as f64, PP)
        } else {
            (r.weight_bytes_per_token as f64, 1.0, TG)
        };
        if !(bytes_per_forward > 0.0 && flops_per_token > 0.0 && t.mean_tps > 0.0) {
            continue;
        }
        points.push(RooflinePoint {
            label: format!("{} {:.1} t/s", t.test, t.mean_tps),
            intensity: flops_per_token * tokens_per_forward / bytes_per_forward,
            gflops: flops_per_token * t.mean_tps / 1e9,
            color,
        });
    }
    points
}

/// `rh-bench --plot`: the run's pp and tg on the roofline of the measured
/// read bandwidth and FMA peak.
pub fn speed(r: &SpeedReport, path: &Path) -> Result<(), CliError> {
    let points = roofline_points(r);
    let (Some(bw), Some(peak)) = (
        r.bandwidth_gbs.filter(|&b| b > 0.0),
        r.fma_peak_gflops.filter(|&p| p > 0.0),
    ) else {
        return Err(CliError::failure(format!(
            "{}: no plot: the run has no bandwidth or FMA peak figure",
            path.display()
        )));
    };
    if points.is_empty() {
        return Err(CliError::failure(format!(
            "{}: no plot: no test with tokens/s and weight bytes to place",
            path.display()
        )));
    }
    let ridge = peak / bw;
    let (mut x_lo, mut x_hi, mut y_lo) = (ridge, ridge, peak);
    for p in &points {
        x_lo = x_lo.min(p.intensity);
        x_hi = x_hi.max(p.intensity);
        y_lo = y_lo.min(p.gflops).min(bw * p.intensity);
    }
    let (x_lo, x_hi) = (x_lo / 4.0, x_hi * 4.0);
    let (y_lo, y_hi) = ((y_lo / 4.0).min(bw * x_lo), peak * 3.0);

    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (WIDTH, 600)).into_drawing_area();
        draw_roofline(&root, r, &points, (bw, peak), (x_lo..x_hi, y_lo..y_hi))
            .map_err(|e| failed(path, e))?;
        root.present().map_err(|e| failed(path, e))?;
    }
    write(path, &svg)
}

type DrawResult = Result<(), DrawingAreaErrorKind<std::io::Error>>;

fn draw_roofline(
    root: &DrawingArea<SVGBackend, Shift>,
    r: &SpeedReport,
    points: &[RooflinePoint],
    (bw, peak): (f64, f64),
    (x, y): (std::ops::Range<f64>, std::ops::Range<f64>),
) -> DrawResult {
    root.fill(&WHITE)?;
    let caption = format!("{} · {} · {} threads", r.model, r.backend, r.threads);
    let mut chart = ChartBuilder::on(root)
        .caption(caption, ("sans-serif", 20))
        .margin(16)
        .x_label_area_size(48)
        .y_label_area_size(72)
        .build_cartesian_2d(x.clone().log_scale(), y.clone().log_scale())?;
    chart
        .configure_mesh()
        .x_desc("arithmetic intensity (FLOP per byte of weights read)")
        .y_desc("GFLOP/s")
        .light_line_style(WHITE.mix(0.0))
        .label_style(("sans-serif", 14))
        .axis_desc_style(("sans-serif", 15))
        .draw()?;

    // The roof: sampled densely enough that the log-log slope and the ridge
    // corner come out straight.
    let steps = 200;
    let roof = (0..=steps).map(|i| {
        let t = i as f64 / steps as f64;
        let xi = (x.start.ln() + t * (x.end.ln() - x.start.ln())).exp();
        (xi, (bw * xi).min(peak))
    });
    chart
        .draw_series(LineSeries::new(roof, ROOF.stroke_width(2)))?
        .label(format!(
            "roofline: read bandwidth {bw:.1} GB/s, FMA peak {peak:.0} GFLOP/s"
        ))
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], ROOF.stroke_width(2)));

    for p in points {
        let roof_here = (bw * p.intensity).min(peak);
        let share = p.gflops / roof_here * 100.0;
        let text = format!("{} ({share:.0}% of roof)", p.label);
        chart
            .draw_series(std::iter::once(
                EmptyElement::at((p.intensity, p.gflops))
                    + Circle::new((0, 0), 6, p.color.filled())
                    + Text::new(
                        text,
                        (10, -18),
                        ("sans-serif", 15).into_font().color(&p.color),
                    ),
            ))?
            .label(if p.label.starts_with("pp") {
                "pp: prompt, every weight read once per batch"
            } else {
                "tg: decode, active weights read once per token"
            })
            .legend(move |(x, y)| Circle::new((x + 10, y), 5, p.color.filled()));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .label_font(("sans-serif", 14))
        .background_style(WHITE.mix(0.9))
        .border_style(GREY)
        .draw()?;
    Ok(())
}

/// `rh-bench kernels --plot`: GB/s of each matrix-vector kernel against the
/// read bandwidth, and GFLOP/s of each matrix-matrix kernel against the FMA
/// peak.
pub fn kernels(r: &KernelReport, path: &Path) -> Result<(), CliError> {
    let matvec: Vec<&KernelRow> = r.rows.iter().filter(|k| k.op != "matmul").collect();
    let matmul: Vec<&KernelRow> = r.rows.iter().filter(|k| k.op == "matmul").collect();
    if r.rows.is_empty() {
        return Err(CliError::failure(format!(
            "{}: no plot: no kernel was measured",
            path.display()
        )));
    }
    let panel_height = |rows: usize| if rows == 0 { 0 } else { 110 + 26 * rows as u32 };
    let (top, bottom) = (panel_height(matvec.len()), panel_height(matmul.len()));
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (WIDTH, top + bottom)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| failed(path, e))?;
        let (upper, lower) = root.split_vertically(top);
        let bw = &r.bandwidth;
        if !matvec.is_empty() {
            let panel = Bars {
                title: format!(
                    "matrix × vector (decode) on {} threads, {}: GB/s of weights read",
                    r.threads, r.isa
                ),
                unit: "GB/s",
                lines: vec![
                    (
                        format!("read bandwidth, {} threads", bw.threads),
                        bw.all_threads_gbs,
                    ),
                    ("read bandwidth, 1 thread".into(), bw.single_thread_gbs),
                ],
                bars: matvec.iter().map(|k| (bar_label(k), k.gbs)).collect(),
            };
            draw_bars(&upper, &panel).map_err(|e| failed(path, e))?;
        }
        if !matmul.is_empty() {
            let tokens = matmul[0].tokens;
            let panel = Bars {
                title: format!("matrix × matrix (prefill, {tokens} tokens): GFLOP/s"),
                unit: "GFLOP/s",
                lines: vec![
                    (
                        format!("FMA peak, {} threads", r.threads),
                        r.fma_peak_gflops,
                    ),
                    ("FMA peak, 1 thread".into(), r.fma_peak_1t_gflops),
                ],
                bars: matmul.iter().map(|k| (bar_label(k), k.gflops)).collect(),
            };
            let area = if matvec.is_empty() { &upper } else { &lower };
            draw_bars(area, &panel).map_err(|e| failed(path, e))?;
        }
        root.present().map_err(|e| failed(path, e))?;
    }
    write(path, &svg)
}

fn bar_label(k: &KernelRow) -> String {
    // Batched matvecs (several matrices in one parallel region) apart
    // from the lone matvec of the same shape.
    let batch = if k.op == "batch" { " · batched" } else { "" };
    format!(
        "{} {:?} {}×{} · {} {}{batch}",
        k.shape, k.kind, k.rows, k.cols, k.isa, k.path
    )
}

/// A horizontal bar chart with vertical reference lines.
struct Bars {
    title: String,
    unit: &'static str,
    /// (label, value) of each reference line; the first is drawn solid.
    lines: Vec<(String, f64)>,
    /// (label, value) of each bar, top to bottom.
    bars: Vec<(String, f64)>,
}

fn draw_bars(area: &DrawingArea<SVGBackend, Shift>, p: &Bars) -> DrawResult {
    let n = p.bars.len();
    let top = p
        .bars
        .iter()
        .map(|b| b.1)
        .chain(p.lines.iter().map(|l| l.1))
        .filter(|v| v.is_finite())
        .fold(0.0f64, f64::max);
    let x_max = if top > 0.0 { top * 1.12 } else { 1.0 };
    let mut chart = ChartBuilder::on(area)
        .caption(&p.title, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(8)
        .build_cartesian_2d(0.0..x_max, 0.0..n as f64)?;
    chart
        .configure_mesh()
        .disable_y_mesh()
        .y_labels(0)
        .x_desc(p.unit)
        .light_line_style(WHITE.mix(0.0))
        .label_style(("sans-serif", 13))
        .draw()?;
    // Bar i sits in the band [n-1-i, n-i], so the first row is on top.
    for (i, (label, value)) in p.bars.iter().enumerate() {
        let y0 = (n - 1 - i) as f64 + 0.15;
        let y1 = y0 + 0.7;
        let v = if value.is_finite() {
            value.max(0.0)
        } else {
            0.0
        };
        chart.draw_series(std::iter::once(Rectangle::new(
            [(0.0, y0), (v, y1)],
            BAR.filled(),
        )))?;
        chart.draw_series(std::iter::once(Text::new(
            format!("{label}: {v:.1} {}", p.unit),
            (x_max * 0.005, y1 - 0.12),
            ("sans-serif", 13).into_font(),
        )))?;
    }
    for (j, (label, value)) in p.lines.iter().enumerate() {
        if !(value.is_finite() && *value > 0.0) {
            continue;
        }
        let style = if j == 0 {
            ROOF.stroke_width(2)
        } else {
            ROOF.mix(0.5).stroke_width(1)
        };
        chart
            .draw_series(LineSeries::new([(*value, 0.0), (*value, n as f64)], style))?
            .label(format!("{label}: {value:.1} {}", p.unit))
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], style));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .label_font(("sans-serif", 13))
        .background_style(WHITE.mix(0.9))
        .border_style(GREY)
        .draw()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use roundhouse::kernels::bench::WeightKind;
    use roundhouse::membw::Bandwidth;
    use roundhouse::speedbench::TestResult;

    /// Parses the file as XML and returns its text content (every <text>).
    fn svg_text(path: &Path) -> String {
        let svg = std::fs::read_to_string(path).unwrap();
        let doc = roxmltree::Document::parse(&svg).unwrap_or_else(|e| panic!("not XML: {e}"));
        assert_eq!(doc.root_element().tag_name().name(), "svg");
        doc.descendants()
            .filter(|n| n.has_tag_name("text"))
            .filter_map(|n| n.text())
            .collect::<Vec<_>>()
            .join("\n")
    }

    fn speed_report(tests: Vec<TestResult>) -> SpeedReport {
        SpeedReport {
            model: "bench-cache (8L)".into(),
            size_bytes: 6 << 30,
            params: 10_000_000_000,
            backend: "CPU (avx2)".into(),
            threads: 8,
            tests,
            parallel: Vec::new(),
            load_s: 0.5,
            peak_rss_bytes: 1 << 30,
            weight_bytes_per_token: 400 << 20,
            effective_gbs: None,
            bandwidth_gbs: Some(20.0),
            bandwidth_ratio: None,
            bandwidth_source: None,
            prefill_macs_per_token: 700_000_000,
            prefill_gflops: None,
            fma_peak_gflops: Some(500.0),
            mapped: None,
        }
    }

    #[test]
    fn speed_plot_is_svg_with_both_tests_and_the_roof() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("speed.svg");
        let r = speed_report(vec![
            TestResult::from_times("pp512".into(), 512, &[4.0, 4.1]),
            TestResult::from_times("tg128".into(), 128, &[3.0, 3.2]),
        ]);
        speed(&r, &path).unwrap();
        let text = svg_text(&path);
        for want in [
            "pp512 126.4 t/s",
            "tg128 41.3 t/s",
            "roofline",
            "20.0 GB/s",
            "500 GFLOP/s",
        ] {
            assert!(text.contains(want), "{want:?} missing from:\n{text}");
        }
        // tg's point: 2 x 700 M FLOP over 400 MiB per token; 41 t/s is
        // 58 GFLOP/s of a 20 GB/s x 3.34 FLOP/B = 67 GFLOP/s roof.
        assert!(text.contains("tg128 41.3 t/s (87% of roof)"), "{text}");
    }

    #[test]
    fn speed_plot_without_a_peak_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("speed.svg");
        let mut r = speed_report(vec![TestResult::from_times("tg8".into(), 8, &[1.0])]);
        r.fma_peak_gflops = None;
        let e = speed(&r, &path).unwrap_err().to_string();
        assert!(e.contains("speed.svg") && e.contains("FMA peak"), "{e}");
        assert!(!path.exists());
    }

    fn row(shape: &str, op: &'static str, gbs: f64, gflops: f64) -> KernelRow {
        KernelRow {
            shape: shape.into(),
            kind: WeightKind::Int4,
            rows: 512,
            cols: 2048,
            op,
            path: "int8-act",
            isa: "avx2",
            tokens: if op == "matmul" { 512 } else { 1 },
            seconds: 1e-4,
            gbs,
            of_bandwidth: gbs / 20.0,
            gflops,
            of_fma_peak: gflops / 500.0,
            calls: 10,
            huge_page_share: None,
        }
    }

    #[test]
    fn kernel_plot_is_svg_with_every_kernel_and_both_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kernels.svg");
        let r = KernelReport {
            isa: "avx2",
            threads: 2,
            bandwidth: Bandwidth {
                single_thread_gbs: 9.5,
                all_threads_gbs: 18.3,
                threads: 2,
                buffer_bytes: 1 << 30,
            },
            bandwidth_probes: vec![18.3, 17.1],
            bandwidth_methods: vec![("sum", 9.5, 18.3, 17.0)],
            bandwidth_windows: 80,
            bandwidth_huge_page_share: Some(1.0),
            fma_peak_1t_gflops: 110.0,
            fma_peak_gflops: 215.0,
            rows: vec![
                row("expert-gate-up", "matvec", 15.5, 30.0),
                row("expert-down", "matvec", 12.0, 24.0),
                row("expert-gate-up", "matmul", 1.0, 160.3),
            ],
            activation_error: vec![],
        };
        kernels(&r, &path).unwrap();
        let text = svg_text(&path);
        for want in [
            "expert-gate-up Int4 512×2048 · avx2 int8-act: 15.5 GB/s",
            "expert-down Int4 512×2048 · avx2 int8-act: 12.0 GB/s",
            "expert-gate-up Int4 512×2048 · avx2 int8-act: 160.3 GFLOP/s",
            "read bandwidth, 2 threads: 18.3 GB/s",
            "FMA peak, 2 threads: 215.0 GFLOP/s",
        ] {
            assert!(text.contains(want), "{want:?} missing from:\n{text}");
        }
    }
}
