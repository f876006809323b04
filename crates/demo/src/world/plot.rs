//! PNG charts for the experiment's report: the reward / KL frontier of every method (the paper's
//! figure 2, left) and training curves; and several charts tiled in one picture (`dpo plot`).
//!
//! plotters maps coordinates and draws grid, lines and markers into a pixel buffer; text is drawn
//! afterwards with `ab_glyph` from DejaVu Sans embedded in the binary (no system fonts), because
//! plotters' own ab_glyph text path drops the glyphs' side bearings (uneven letter spacing) and
//! cannot rotate the y-axis label. `png` encodes the buffer.

use std::ops::Range;
use std::path::Path;

use ab_glyph::{point, Font, FontRef, GlyphId, PxScale, ScaleFont};
use plotters::coord::Shift;
use plotters::element::{Drawable, PointCollection};
use plotters::prelude::*;
use plotters_backend::{BackendCoord, DrawingErrorKind};

use super::WorldError;

/// How a series is drawn.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Style {
    Line,
    Points,
    LineAndPoints,
}

/// One method's (or one run's) points, in the order they are joined when drawn as a line.
#[derive(Clone, Debug, PartialEq)]
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
    pub style: Style,
    /// `(low, high)` of an interval around each point's y (a 95% interval), drawn as a vertical bar;
    /// empty: none.
    pub intervals: Vec<(f64, f64)>,
}

impl Series {
    pub fn new(name: impl Into<String>, points: Vec<(f64, f64)>, style: Style) -> Self {
        Series { name: name.into(), points, style, intervals: Vec::new() }
    }

    /// This series with an interval `(low, high)` around each point's y.
    pub fn with_intervals(self, intervals: Vec<(f64, f64)>) -> Self {
        Series { intervals, ..self }
    }

    /// The bars of the intervals: `(x, low, high)` of every point that has a finite one.
    fn bars(&self) -> impl Iterator<Item = (f64, f64, f64)> + '_ {
        let ok = |v: &f64| v.is_finite();
        self.points
            .iter()
            .zip(&self.intervals)
            .filter_map(move |(&(x, _), &(lo, hi))| (ok(&x) && ok(&lo) && ok(&hi)).then_some((x, lo, hi)))
    }
}

/// Win rate (or any rate) against a setting such as the sampling temperature, each point with its 95%
/// interval as a bar, and a reference line at `reference` (0.5: a tie).
pub fn interval_chart_png(
    path: &Path,
    series: &[Series],
    reference: Option<f64>,
    title: &str,
    x_label: &str,
    y_label: &str,
) -> Result<(), WorldError> {
    let mut all = series.to_vec();
    if let Some(r) = reference {
        let xs = series.iter().flat_map(|s| s.points.iter().map(|p| p.0)).filter(|x| x.is_finite());
        let (lo, hi) = xs.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), x| (a.min(x), b.max(x)));
        if lo.is_finite() {
            all.push(Series::new(format!("{r} (tie)"), vec![(lo, r), (hi, r)], Style::Line));
        }
    }
    let rgb = render(&all, [title, x_label, y_label], usize::MAX).map_err(|reason| chart_error(path, reason))?;
    write_png(path, &rgb, (WIDTH, HEIGHT))
}

/// Reward against KL(pi || ref), one series per method: every point gets a marker (each point is a
/// separate run or checkpoint); shapes as well as colours tell the methods apart.
pub fn frontier_png(
    path: &Path,
    series: &[Series],
    title: &str,
    x_label: &str,
    y_label: &str,
) -> Result<(), WorldError> {
    let rgb = render(series, [title, x_label, y_label], usize::MAX).map_err(|reason| chart_error(path, reason))?;
    write_png(path, &rgb, (WIDTH, HEIGHT))
}

/// Curves over training steps (e.g. the mean DPO weight sigma(r_l - r_w) per pair): long series get
/// a marker only every so often, so the line stays readable.
pub fn line_chart_png(
    path: &Path,
    series: &[Series],
    title: &str,
    x_label: &str,
    y_label: &str,
) -> Result<(), WorldError> {
    let rgb = render(series, [title, x_label, y_label], 24).map_err(|reason| chart_error(path, reason))?;
    write_png(path, &rgb, (WIDTH, HEIGHT))
}

/// One chart of a picture of several ([`panels_png`]), drawn as [`line_chart_png`] draws it.
#[derive(Clone, Debug, PartialEq)]
pub struct Panel {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub series: Vec<Series>,
}

/// Line charts tiled `columns` wide, row by row, in one PNG (each `WIDTH x HEIGHT`; an unused tile of the
/// last row stays white).
pub fn panels_png(path: &Path, panels: &[Panel], columns: usize) -> Result<(), WorldError> {
    let columns = columns.clamp(1, panels.len().max(1));
    let rows = panels.len().div_ceil(columns).max(1);
    let (w, h) = (WIDTH as usize, HEIGHT as usize);
    let mut out = vec![255u8; w * columns * h * rows * 3];
    for (i, p) in panels.iter().enumerate() {
        let rgb = render(&p.series, [&p.title, &p.x_label, &p.y_label], 24).map_err(|r| chart_error(path, r))?;
        let (col, row) = (i % columns, i / columns);
        for (y, line) in rgb.chunks_exact(w * 3).enumerate() {
            let at = ((row * h + y) * w * columns + col * w) * 3;
            out[at..at + w * 3].copy_from_slice(line);
        }
    }
    write_png(path, &out, ((w * columns) as u32, (h * rows) as u32))
}

fn chart_error(path: &Path, reason: String) -> WorldError {
    WorldError::Chart { path: path.to_path_buf(), reason }
}

const WIDTH: u32 = 1200;
const HEIGHT: u32 = 800;
/// Pixel sizes of the text (ab_glyph's scale: ascent to descent).
const TITLE_PX: f32 = 34.0;
const AXIS_PX: f32 = 26.0;
const TICK_PX: f32 = 21.0;
const LEGEND_PX: f32 = 22.0;

const INK: RGBColor = RGBColor(0x22, 0x22, 0x22);
const AXIS: RGBColor = RGBColor(0x44, 0x44, 0x44);
const GRID: RGBColor = RGBColor(0xE4, 0xE4, 0xE4);

/// Tableau 10: distinct hues that stay apart for the common forms of colour blindness and in grey.
const PALETTE: [RGBColor; 10] = [
    RGBColor(0x4E, 0x79, 0xA7),
    RGBColor(0xF2, 0x8E, 0x2B),
    RGBColor(0xE1, 0x57, 0x59),
    RGBColor(0x59, 0xA1, 0x4F),
    RGBColor(0xB0, 0x7A, 0xA1),
    RGBColor(0x76, 0xB7, 0xB2),
    RGBColor(0x9C, 0x75, 0x5F),
    RGBColor(0xED, 0xC9, 0x48),
    RGBColor(0xFF, 0x9D, 0xA7),
    RGBColor(0xBA, 0xB0, 0xAC),
];

static FONT_DATA: &[u8] = include_bytes!("../../assets/DejaVuSans.ttf");

/// Draws the chart into a `[HEIGHT, WIDTH, 3]` RGB buffer.
fn render(series: &[Series], labels: [&str; 3], max_markers: usize) -> Result<Vec<u8>, String> {
    let [title, x_label, y_label] = labels;
    let font = FontRef::try_from_slice(FONT_DATA).map_err(|e| format!("the embedded font: {e}"))?;
    let finite: Vec<Vec<(f64, f64)>> = series
        .iter()
        .map(|s| s.points.iter().copied().filter(|(x, y)| x.is_finite() && y.is_finite()).collect())
        .collect();
    // The interval bars' ends are in the frame too.
    let ends: Vec<(f64, f64)> =
        series.iter().flat_map(|s| s.bars().flat_map(|(x, lo, hi)| [(x, lo), (x, hi)])).collect();
    let (xr, yr) =
        ranges(finite.iter().flatten().chain(&ends)).ok_or_else(|| format!("{title}: no finite points to plot"))?;
    let (xt, yt) = (Ticks::new(&xr, 9), Ticks::new(&yr, 7));

    // Room for the labels: the widest y tick label decides the left margin.
    let tick_w = yt.values.iter().map(|&v| text_width(&font, TICK_PX, &yt.label(v))).fold(0.0, f32::max);
    let (top, bottom, right) = (TITLE_PX as i32 + 44, AXIS_PX as i32 + TICK_PX as i32 + 44, 44);
    let left = AXIS_PX as i32 + tick_w.ceil() as i32 + 44;

    let mut texts = Vec::new();
    let mut buf = vec![0u8; (WIDTH * HEIGHT * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut buf, (WIDTH, HEIGHT)).into_drawing_area();
        let frame = Frame { margins: (top, bottom, left, right), ranges: (xr, yr), ticks: (&xt, &yt), max_markers };
        draw(&root, &font, series, &finite, &frame, &mut texts).map_err(|e| format!("{title}: {e}"))?;
        root.present().map_err(|e| format!("{title}: {e}"))?;
    }
    texts.push(Text::new(title, TITLE_PX, (WIDTH as f32 / 2.0, 22.0), Anchor::TopCenter));
    let plot_mid_x = left as f32 + (WIDTH as i32 - left - right) as f32 / 2.0;
    let plot_mid_y = top as f32 + (HEIGHT as i32 - top - bottom) as f32 / 2.0;
    texts.push(Text::new(x_label, AXIS_PX, (plot_mid_x, HEIGHT as f32 - 18.0), Anchor::BottomCenter));
    texts.push(Text { rotated: true, ..Text::new(y_label, AXIS_PX, (18.0, plot_mid_y), Anchor::TopCenter) });
    for t in &texts {
        draw_text(&mut buf, &font, t);
    }
    Ok(buf)
}

/// Where the plot sits and what it shows.
struct Frame<'a> {
    /// top, bottom, left, right, in pixels
    margins: (i32, i32, i32, i32),
    ranges: (Range<f64>, Range<f64>),
    ticks: (&'a Ticks, &'a Ticks),
    max_markers: usize,
}

/// Grid, axes, series and legend; the text it needs is pushed onto `texts` for the text pass.
fn draw<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    font: &FontRef,
    series: &[Series],
    finite: &[Vec<(f64, f64)>],
    frame: &Frame,
    texts: &mut Vec<Text>,
) -> Result<(), DrawingAreaErrorKind<DB::ErrorType>> {
    root.fill(&WHITE)?;
    let (top, bottom, left, right) = frame.margins;
    let (xr, yr) = frame.ranges.clone();
    let (xt, yt) = frame.ticks;
    let chart = ChartBuilder::on(root)
        .margin_top(top)
        .margin_bottom(bottom)
        .margin_left(left)
        .margin_right(right)
        .build_cartesian_2d(xr.clone(), yr.clone())?;
    let area = chart.plotting_area();
    let px = |x: f64, y: f64| chart.backend_coord(&(x, y));
    let (x0, y0) = px(xr.start, yr.start); // bottom left corner, in pixels
    let (x1, y1) = px(xr.end, yr.end);

    // Light grid at the major ticks, axes on the left and bottom, ticks pointing out.
    for &v in &xt.values {
        area.draw(&PathElement::new(vec![(v, yr.start), (v, yr.end)], GRID.stroke_width(1)))?;
        let (x, _) = px(v, yr.start);
        root.draw(&PathElement::new(vec![(x, y0), (x, y0 + 7)], AXIS.stroke_width(2)))?;
        texts.push(Text::new(&xt.label(v), TICK_PX, (x as f32, y0 as f32 + 12.0), Anchor::TopCenter));
    }
    for &v in &yt.values {
        area.draw(&PathElement::new(vec![(xr.start, v), (xr.end, v)], GRID.stroke_width(1)))?;
        let (_, y) = px(xr.start, v);
        root.draw(&PathElement::new(vec![(x0 - 7, y), (x0, y)], AXIS.stroke_width(2)))?;
        texts.push(Text::new(&yt.label(v), TICK_PX, (x0 as f32 - 12.0, y as f32), Anchor::MiddleRight));
    }
    root.draw(&PathElement::new(vec![(x0, y1), (x0, y0), (x1, y0)], AXIS.stroke_width(2)))?;

    for (i, (s, pts)) in series.iter().zip(finite).enumerate() {
        let color = PALETTE[i % PALETTE.len()];
        for (x, lo, hi) in s.bars() {
            let ((px_x, px_lo), (_, px_hi)) = (px(x, lo), px(x, hi));
            root.draw(&PathElement::new(vec![(px_x, px_lo), (px_x, px_hi)], color.stroke_width(2)))?;
            for y in [px_lo, px_hi] {
                root.draw(&PathElement::new(vec![(px_x - 6, y), (px_x + 6, y)], color.stroke_width(2)))?;
            }
        }
        if matches!(s.style, Style::Line | Style::LineAndPoints) && pts.len() > 1 {
            area.draw(&PathElement::new(pts.clone(), color.stroke_width(3)))?;
        }
        if matches!(s.style, Style::Points | Style::LineAndPoints) {
            let every = pts.len().div_ceil(frame.max_markers).max(1);
            for &at in pts.iter().step_by(every) {
                area.draw(&Marker { at, kind: i % MARKERS, color, legend_line: None })?;
            }
        }
    }
    legend(root, font, series, finite, frame, (x0, y1, x1, y0), texts)
}

/// The legend box, in the corner of the plot that covers the fewest points.
fn legend<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    font: &FontRef,
    series: &[Series],
    finite: &[Vec<(f64, f64)>],
    frame: &Frame,
    (left, top, right, bottom): (i32, i32, i32, i32),
    texts: &mut Vec<Text>,
) -> Result<(), DrawingAreaErrorKind<DB::ErrorType>> {
    if series.is_empty() {
        return Ok(());
    }
    const ROW: i32 = 34;
    const PAD: i32 = 14;
    const SAMPLE: i32 = 40;
    let text_w = series.iter().map(|s| text_width(font, LEGEND_PX, &s.name)).fold(0.0, f32::max).ceil() as i32;
    let (w, h) = (PAD + SAMPLE + 12 + text_w + PAD, ROW * series.len() as i32 + 2 * PAD - 8);
    let (at_left, at_top) = emptiest_corner(finite, &frame.ranges.0, &frame.ranges.1);
    let inset = 16;
    let bx = if at_left { left + inset } else { right - inset - w };
    let by = if at_top { top + inset } else { bottom - inset - h };
    root.draw(&Rectangle::new([(bx, by), (bx + w, by + h)], WHITE.mix(0.9).filled()))?;
    root.draw(&Rectangle::new([(bx, by), (bx + w, by + h)], RGBColor(0xBB, 0xBB, 0xBB).stroke_width(1)))?;
    for (i, s) in series.iter().enumerate() {
        let y = by + PAD - 4 + ROW / 2 + ROW * i as i32;
        let line = matches!(s.style, Style::Line | Style::LineAndPoints);
        let kind = if matches!(s.style, Style::Points | Style::LineAndPoints) { i % MARKERS } else { MARKERS };
        let color = PALETTE[i % PALETTE.len()];
        root.draw(&Marker { at: (bx + PAD, y), kind, color, legend_line: Some(line) })?;
        texts.push(Text::new(&s.name, LEGEND_PX, ((bx + PAD + SAMPLE + 12) as f32, y as f32), Anchor::MiddleLeft));
    }
    Ok(())
}

const MARKERS: usize = 5;
const MARKER_SIZE: i32 = 7;

/// A point marker (circle, triangle, square, diamond or cross, by `kind`) with a white rim so
/// overlapping points stay apart. In the legend (`legend_line`) it sits on a short line sample
/// starting at `at`; `kind >= MARKERS` draws the line alone.
struct Marker<C> {
    at: C,
    kind: usize,
    color: RGBColor,
    legend_line: Option<bool>,
}

impl<'a, C> PointCollection<'a, C> for &'a Marker<C> {
    type Point = &'a C;
    type IntoIter = std::iter::Once<&'a C>;
    fn point_iter(self) -> Self::IntoIter {
        std::iter::once(&self.at)
    }
}

impl<DB: DrawingBackend, C> Drawable<DB> for Marker<C> {
    fn draw<I: Iterator<Item = BackendCoord>>(
        &self,
        mut pos: I,
        backend: &mut DB,
        _: (u32, u32),
    ) -> Result<(), DrawingErrorKind<DB::ErrorType>> {
        let Some((mut x, y)) = pos.next() else { return Ok(()) };
        if let Some(line) = self.legend_line {
            if line {
                backend.draw_path([(x, y), (x + 40, y)], &self.color.stroke_width(3))?;
            }
            x += 20;
        }
        let (fill, rim, s) = (self.color.filled(), WHITE.stroke_width(1), MARKER_SIZE);
        let mut polygon = |pts: &[(i32, i32)]| {
            backend.fill_polygon(pts.iter().map(|&(dx, dy)| (x + dx, y + dy)), &fill)?;
            backend.draw_path(pts.iter().chain(pts.first()).map(|&(dx, dy)| (x + dx, y + dy)), &rim)
        };
        match self.kind {
            0 => {
                backend.draw_circle((x, y), s as u32, &fill, true)?;
                backend.draw_circle((x, y), s as u32, &rim, false)
            }
            1 => polygon(&[(0, -s - 1), (s + 1, s - 1), (-s - 1, s - 1)]),
            2 => polygon(&[(-s + 1, -s + 1), (s - 1, -s + 1), (s - 1, s - 1), (-s + 1, s - 1)]),
            3 => polygon(&[(0, -s - 2), (s + 1, 0), (0, s + 2), (-s - 1, 0)]),
            4 => {
                let st = self.color.stroke_width(3);
                backend.draw_path([(x - s, y - s), (x + s, y + s)], &st)?;
                backend.draw_path([(x - s, y + s), (x + s, y - s)], &st)
            }
            _ => Ok(()),
        }
    }
}

/// Data ranges with 6% room on each side (so markers are not cut by the axes); a flat or single
/// point range is widened so it still has a scale.
fn ranges<'a>(points: impl Iterator<Item = &'a (f64, f64)>) -> Option<(Range<f64>, Range<f64>)> {
    let mut b: Option<[f64; 4]> = None;
    for &(x, y) in points {
        let v = b.get_or_insert([x, x, y, y]);
        *v = [v[0].min(x), v[1].max(x), v[2].min(y), v[3].max(y)];
    }
    let [x0, x1, y0, y1] = b?;
    Some((pad(x0, x1), pad(y0, y1)))
}

fn pad(lo: f64, hi: f64) -> Range<f64> {
    let span = hi - lo;
    if span <= 1e-9 * hi.abs().max(lo.abs()).max(1e-300) {
        let half = if lo == 0.0 { 1.0 } else { lo.abs() * 0.1 };
        return (lo - half)..(hi + half);
    }
    (lo - 0.06 * span)..(hi + 0.06 * span)
}

/// Whether the left / top corner (a third of the width, 40% of the height) holds the fewest
/// points, so the legend covers as little data as possible. Ties prefer the upper left.
fn emptiest_corner(finite: &[Vec<(f64, f64)>], xr: &Range<f64>, yr: &Range<f64>) -> (bool, bool) {
    let count = |left: bool, top: bool| {
        let pts = finite.iter().flatten();
        pts.filter(|&&(x, y)| {
            let (u, v) = ((x - xr.start) / (xr.end - xr.start), (y - yr.start) / (yr.end - yr.start));
            (if left { u < 0.34 } else { u > 0.66 }) && (if top { v > 0.6 } else { v < 0.4 })
        })
        .count()
    };
    let corners = [(true, true), (false, true), (false, false), (true, false)];
    corners.into_iter().min_by_key(|&(l, t)| count(l, t)).unwrap_or((true, true))
}

/// Round tick values (steps of 1, 2, 2.5 or 5 times a power of ten) and labels with as many
/// decimals as the step needs, so there is no "0.30000000000000004" and no "0.5000".
struct Ticks {
    values: Vec<f64>,
    step: f64,
}

impl Ticks {
    fn new(r: &Range<f64>, target: usize) -> Self {
        let span = r.end - r.start;
        let mag = 10f64.powf((span / target as f64).log10().floor());
        let step = [1.0, 2.0, 2.5, 5.0, 10.0]
            .iter()
            .map(|m| m * mag)
            .find(|s| span / s <= target as f64)
            .unwrap_or(10.0 * mag);
        let first = (r.start / step).ceil();
        let values = (0..=2 * target)
            .map(|i| (first + i as f64) * step)
            .take_while(|v| *v <= r.end + step * 1e-9)
            .map(|v| if v.abs() < step * 1e-9 { 0.0 } else { v })
            .collect();
        Ticks { values, step }
    }

    fn label(&self, v: f64) -> String {
        // Very large or very small values: a shared power of ten, written on each label.
        let big = self.values.iter().fold(0.0f64, |m, v| m.max(v.abs()));
        let exp = if big >= 1e5 || (big > 0.0 && big < 1e-2) { big.log10().floor() as i32 } else { 0 };
        let scale = 10f64.powi(exp);
        let (v, step) = (v / scale, self.step / scale);
        // 2.5 x 10^k needs one decimal more than 1, 2 or 5 x 10^k.
        let mut decimals = (-step.log10().floor()).max(0.0) as usize;
        if (step / 10f64.powf(step.log10().floor()) - 2.5).abs() < 1e-9 {
            decimals += 1;
        }
        match exp {
            0 => format!("{v:.decimals$}"),
            _ if v == 0.0 => "0".into(),
            _ => format!("{v:.decimals$}e{exp}"),
        }
    }
}

#[derive(Clone, Copy)]
enum Anchor {
    TopCenter,
    BottomCenter,
    MiddleLeft,
    MiddleRight,
}

struct Text {
    text: String,
    px: f32,
    at: (f32, f32),
    anchor: Anchor,
    /// Reads bottom to top (the y-axis label); `at` and `anchor` then describe the rotated box.
    rotated: bool,
}

impl Text {
    fn new(text: &str, px: f32, at: (f32, f32), anchor: Anchor) -> Self {
        Text { text: text.to_string(), px, at, anchor, rotated: false }
    }
}

/// Glyphs of `text` laid out on a baseline from x = 0, with kerning, and the total advance.
fn layout(font: &FontRef, px: f32, text: &str) -> (Vec<(GlyphId, f32)>, f32) {
    let scaled = font.as_scaled(PxScale::from(px));
    let mut caret = 0.0;
    let mut prev: Option<GlyphId> = None;
    let mut glyphs = Vec::with_capacity(text.len());
    for c in text.chars() {
        let id = scaled.glyph_id(c);
        if let Some(p) = prev {
            caret += scaled.kern(p, id);
        }
        glyphs.push((id, caret));
        caret += scaled.h_advance(id);
        prev = Some(id);
    }
    (glyphs, caret)
}

fn text_width(font: &FontRef, px: f32, text: &str) -> f32 {
    layout(font, px, text).1
}

/// Blends `t` into the RGB buffer (anti-aliased, INK colour).
fn draw_text(buf: &mut [u8], font: &FontRef, t: &Text) {
    let (glyphs, width) = layout(font, t.px, &t.text);
    let scaled = font.as_scaled(PxScale::from(t.px));
    // Cap height centres digits and capitals on a tick; ascent/descent bound the whole line.
    let cap = font.outline_glyph(scaled.scaled_glyph('H')).map(|g| g.px_bounds().height()).unwrap_or(t.px * 0.6);
    // The baseline start, in the text's own frame (x along the text, y down), relative to `at`.
    let (ox, oy) = match t.anchor {
        Anchor::TopCenter => (-width / 2.0, scaled.ascent()),
        Anchor::BottomCenter => (-width / 2.0, scaled.descent()),
        Anchor::MiddleLeft => (0.0, cap / 2.0),
        Anchor::MiddleRight => (-width, cap / 2.0),
    };
    let mut put = |lx: f32, ly: f32, coverage: f32| {
        // Rotated by 270 degrees: the text's x runs up the image, its y (down) runs right.
        let (x, y) = if t.rotated { (t.at.0 + ly, t.at.1 - lx) } else { (t.at.0 + lx, t.at.1 + ly) };
        let (x, y) = (x.round(), y.round());
        if x < 0.0 || y < 0.0 || x >= WIDTH as f32 || y >= HEIGHT as f32 {
            return;
        }
        let i = (y as usize * WIDTH as usize + x as usize) * 3;
        let c = coverage.clamp(0.0, 1.0);
        for (k, ink) in [INK.0, INK.1, INK.2].into_iter().enumerate() {
            buf[i + k] = (buf[i + k] as f32 * (1.0 - c) + ink as f32 * c).round() as u8;
        }
    };
    for (id, x) in glyphs {
        let glyph = id.with_scale_and_position(PxScale::from(t.px), point(ox + x, oy));
        if let Some(outline) = font.outline_glyph(glyph) {
            let b = outline.px_bounds();
            outline.draw(|gx, gy, c| put(b.min.x + gx as f32, b.min.y + gy as f32, c));
        }
    }
}

/// Encodes the RGB buffer and writes it atomically, so a reader (or an interrupted run) never sees half
/// a PNG.
fn write_png(path: &Path, rgb: &[u8], (width, height): (u32, u32)) -> Result<(), WorldError> {
    let mut bytes = Vec::new();
    let encoded = (|| {
        let mut enc = png::Encoder::new(&mut bytes, width, height);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        let mut w = enc.write_header()?;
        w.write_image_data(rgb)?;
        w.finish()
    })();
    encoded.map_err(|e| chart_error(path, format!("PNG encoding: {e}")))?;
    dpo::io::write_atomic(path, &bytes).map_err(|source| WorldError::Io { path: path.to_path_buf(), source })
}

#[cfg(test)]
#[path = "plot_tests.rs"]
mod tests;
