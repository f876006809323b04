//! Tests of the PNG charts (kept in the temp dir so they can be looked at).

use super::*;

fn out_dir() -> std::path::PathBuf {
    // Kept after the test (in the temp dir) so the charts can be looked at.
    let d = std::env::temp_dir().join("dpo-world-plots");
    std::fs::create_dir_all(&d).expect("temp dir");
    d
}

fn check_png(path: &Path) {
    check_png_size(path, (WIDTH, HEIGHT));
}

fn check_png_size(path: &Path, (width, height): (u32, u32)) {
    let bytes = std::fs::read(path).expect("png written");
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
    // IHDR: width and height, big-endian, at bytes 16..24.
    assert_eq!(u32::from_be_bytes(bytes[16..20].try_into().expect("4 bytes")), width);
    assert_eq!(u32::from_be_bytes(bytes[20..24].try_into().expect("4 bytes")), height);
    assert!(bytes.len() > 15_000, "{} bytes: a blank image?", bytes.len());
}

#[test]
fn panels_tile_row_by_row() {
    let path = out_dir().join("panels.png");
    let curve = |k: f64| (0..50).map(|s| (s as f64, (-(s as f64) * k).exp())).collect::<Vec<_>>();
    let panel = |t: &str, k: f64| Panel {
        title: t.into(),
        x_label: "step".into(),
        y_label: t.into(),
        series: vec![Series::new("train", curve(k), Style::Line)],
    };
    let panels = vec![panel("a", 0.1), panel("b", 0.05), panel("c", 0.02), panel("d", 0.2)];
    panels_png(&path, &panels, 3).expect("draw");
    check_png_size(&path, (3 * WIDTH, 2 * HEIGHT));
    // A panel with nothing finite is refused with its title.
    let bad = vec![Panel { series: vec![Series::new("x", vec![(f64::NAN, 1.0)], Style::Line)], ..panel("e", 0.1) }];
    let err = panels_png(&out_dir().join("bad.png"), &bad, 3).unwrap_err().to_string();
    assert!(err.contains("e: no finite points"), "{err}");
}

/// A frontier shaped like the paper's figure 2: reward rising with KL and saturating.
fn frontier(scale: f64, kls: &[f64]) -> Vec<(f64, f64)> {
    kls.iter().map(|&k| (k, 0.3 + scale * (1.0 - (-k / 6.0).exp()))).collect()
}

#[test]
fn frontier_chart() {
    let path = out_dir().join("frontier.png");
    let kls = [0.5, 1.5, 3.0, 5.0, 8.0, 12.0, 16.0, 20.0];
    let series = vec![
        Series::new("DPO (ours)", frontier(0.65, &kls), Style::LineAndPoints),
        Series::new("PPO", frontier(0.5, &kls[1..]), Style::LineAndPoints),
        Series::new("PPO-GT", frontier(0.58, &kls[2..]), Style::Points),
        Series::new("Unlikelihood", frontier(0.3, &kls[..5]), Style::Points),
        Series::new("Preferred-FT", vec![(2.0, 0.55), (4.0, 0.6), (6.5, 0.62)], Style::Points),
        Series::new("Best of 128", vec![(1.0, 0.5), (2.5, 0.7), (4.0, 0.82)], Style::Line),
    ];
    frontier_png(&path, &series, "IMDb Sentiment Generation", "KL(π_θ ‖ π_ref)", "Reward").expect("draw");
    check_png(&path);
}

#[test]
fn line_chart() {
    let path = out_dir().join("weights.png");
    let steps =
        |lr: f64| (0..400).map(|s| (s as f64, 0.5 / (1.0 + lr * s as f64) + 0.02 * (s as f64 * 0.3).sin())).collect();
    let series = vec![
        Series::new("β = 0.1", steps(0.02), Style::Line),
        Series::new("β = 0.5", steps(0.005), Style::LineAndPoints),
    ];
    line_chart_png(&path, &series, "Mean weight σ(r_l − r_w) per pair", "training step", "mean weight").expect("draw");
    check_png(&path);
}

#[test]
fn interval_chart() {
    let path = out_dir().join("win_rate.png");
    let temps = [0.0, 0.25, 0.5, 0.75, 1.0];
    let dpo: Vec<(f64, f64)> = temps.iter().map(|&t| (t, 0.7 - 0.1 * t)).collect();
    let ppo: Vec<(f64, f64)> = temps.iter().map(|&t| (t, 0.6 - 0.3 * t)).collect();
    let bars = |v: &[(f64, f64)]| v.iter().map(|&(_, y)| (y - 0.08, y + 0.08)).collect();
    let series = vec![
        Series::new("DPO", dpo.clone(), Style::LineAndPoints).with_intervals(bars(&dpo)),
        Series::new("PPO", ppo.clone(), Style::LineAndPoints).with_intervals(bars(&ppo)),
    ];
    assert_eq!(series[0].bars().count(), 5);
    interval_chart_png(&path, &series, Some(0.5), "Win rate", "temperature", "win rate").expect("draw");
    check_png(&path);
}

#[test]
fn degenerate_input() {
    let dir = out_dir();
    // One point, a flat series, and non-finite values still make a chart.
    let series = vec![
        Series::new("one", vec![(1.0, 1.0)], Style::Points),
        Series::new("flat", vec![(1.0, 1.0), (1.0, 1.0), (f64::NAN, 2.0), (1.0, f64::INFINITY)], Style::Line),
    ];
    frontier_png(&dir.join("single.png"), &series, "t", "x", "y").expect("draw");
    check_png(&dir.join("single.png"));
    // Huge and tiny values get readable ticks.
    let wide = vec![Series::new("w", vec![(0.0, 1e-5), (2e6, 3e-5)], Style::LineAndPoints)];
    frontier_png(&dir.join("wide.png"), &wide, "t", "x", "y").expect("draw");
    // Nothing finite at all is an error, not a panic; so is an unwritable path.
    let empty = vec![Series::new("nan", vec![(f64::NAN, 0.0)], Style::Line)];
    assert!(frontier_png(&dir.join("none.png"), &empty, "t", "x", "y").is_err());
    assert!(frontier_png(&dir.join("no/such/dir/x.png"), &series, "t", "x", "y").is_err());
    assert!(!dir.join("none.png").exists());
}

#[test]
fn ticks() {
    let t = Ticks::new(&(0.25..0.95), 7);
    assert_eq!(
        t.values.iter().map(|&v| t.label(v)).collect::<Vec<_>>(),
        ["0.3", "0.4", "0.5", "0.6", "0.7", "0.8", "0.9"]
    );
    let t = Ticks::new(&(-1.2..21.0), 9);
    assert_eq!(
        t.values.iter().map(|&v| t.label(v)).collect::<Vec<_>>(),
        ["0.0", "2.5", "5.0", "7.5", "10.0", "12.5", "15.0", "17.5", "20.0"]
    );
    let t = Ticks::new(&(-12.0..412.0), 9);
    assert_eq!(t.label(t.values[0]), "0");
    assert_eq!(t.step, 50.0);
    let t = Ticks::new(&(-1e5..2.1e6), 9);
    assert_eq!(t.values.iter().map(|&v| t.label(v)).collect::<Vec<_>>()[..3], ["0", "0.25e6", "0.50e6"]);
    let t = Ticks::new(&(0.9e-5..3.1e-5), 5);
    assert_eq!(t.label(t.values[0]), "1.0e-5");
}
