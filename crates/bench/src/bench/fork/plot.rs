//! The fork benchmark's plot: T1 and T2 (p50, and the last child's T1) against the
//! number of children, one line per fork-pool size, as an SVG.

use plotters::prelude::*;

#[allow(unused_imports)]
use super::*;

/// One line of the plot: a measure of one pool size, per child count.
struct Line {
    label: String,
    points: Vec<(f64, f64)>,
    /// Which pool size it belongs to (its colour).
    pool: usize,
    dashed: bool,
}

fn lines(summaries: &[CountSummary], measure: Measure) -> Vec<Line> {
    let mut pools: Vec<u32> = summaries.iter().map(|s| s.pool).collect();
    pools.dedup();
    let mut out = Vec::new();
    for (pool_index, pool) in pools.into_iter().enumerate() {
        let of_pool: Vec<&CountSummary> = summaries.iter().filter(|s| s.pool == pool).collect();
        let mut add = |label: String, dashed: bool, f: &dyn Fn(&CountSummary) -> Option<f64>| {
            let mut points: Vec<(f64, f64)> = of_pool
                .iter()
                .filter_map(|s| Some((f64::from(s.count), f(s)?)))
                .filter(|&(_, y)| y > 0.0)
                .collect();
            points.sort_by(|a, b| a.0.total_cmp(&b.0));
            if !points.is_empty() {
                out.push(Line {
                    label,
                    points,
                    pool: pool_index,
                    dashed,
                });
            }
        };
        match measure {
            Measure::T1 => {
                add(format!("pool {pool}: T1 p50"), false, &|s| {
                    s.t1_ms.map(|d| d.p50)
                });
                add(format!("pool {pool}: last child's T1 p50"), true, &|s| {
                    s.last_t1_ms.map(|d| d.p50)
                });
            }
            Measure::T2 => add(format!("pool {pool}: T2 p50"), false, &|s| {
                s.t2_ms.map(|d| d.p50)
            }),
        }
    }
    out
}

#[derive(Clone, Copy)]
enum Measure {
    T1,
    T2,
}

/// Draws T1 (left) and T2 (right) against the child count, log-log, into an SVG.
pub fn svg(summaries: &[CountSummary], cold: Option<&ColdSummary>) -> Result<String> {
    let mut out = String::new();
    {
        let root = SVGBackend::with_string(&mut out, (1100, 480)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| anyhow!("{e}"))?;
        let (left, right) = root.split_horizontally(550);
        let panels = [
            (
                left,
                Measure::T1,
                "T1: fork request -> child running",
                cold.and_then(|c| c.ready_ms).map(|d| d.p50),
            ),
            (
                right,
                Measure::T2,
                "T2: fork request -> child's agent answers",
                cold.and_then(|c| c.agent_ms).map(|d| d.p50),
            ),
        ];
        for (area, measure, title, cold_ms) in panels {
            panel(&area, &lines(summaries, measure), title, cold_ms)?;
        }
        root.present().map_err(|e| anyhow!("{e}"))?;
    }
    Ok(out)
}

fn panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    lines: &[Line],
    title: &str,
    cold_ms: Option<f64>,
) -> Result<()>
where
    DB::ErrorType: 'static,
{
    let xs = lines.iter().flat_map(|l| l.points.iter().map(|p| p.0));
    let ys = lines
        .iter()
        .flat_map(|l| l.points.iter().map(|p| p.1))
        .chain(cold_ms);
    let x_max = xs.fold(1.0f64, f64::max) * 1.5;
    let (y_min, y_max) = ys.fold((f64::MAX, 0.0f64), |(lo, hi), y| (lo.min(y), hi.max(y)));
    let (y_min, y_max) = if y_max > 0.0 {
        (y_min / 2.0, y_max * 2.0)
    } else {
        (1.0, 10.0)
    };
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 16))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(56)
        .build_cartesian_2d((0.8f64..x_max).log_scale(), (y_min..y_max).log_scale())
        .map_err(|e| anyhow!("{e}"))?;
    chart
        .configure_mesh()
        .x_desc("children per fork")
        .y_desc("ms (p50)")
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_label_formatter(&|y| format!("{y:.0}"))
        .draw()
        .map_err(|e| anyhow!("{e}"))?;
    for line in lines {
        let color = Palette99::pick(line.pool).to_rgba();
        let style = color.stroke_width(2);
        let series = line.points.clone();
        if line.dashed {
            chart
                .draw_series(DashedLineSeries::new(series, 6, 4, style))
                .map_err(|e| anyhow!("{e}"))?
                .label(&line.label)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], color));
        } else {
            chart
                .draw_series(LineSeries::new(series, style))
                .map_err(|e| anyhow!("{e}"))?
                .label(&line.label)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], color));
        }
        chart
            .draw_series(
                line.points
                    .iter()
                    .map(|&p| Circle::new(p, 3, color.filled())),
            )
            .map_err(|e| anyhow!("{e}"))?;
    }
    if let Some(ms) = cold_ms {
        chart
            .draw_series(DashedLineSeries::new(
                [(0.8, ms), (x_max, ms)],
                3,
                3,
                BLACK.stroke_width(1),
            ))
            .map_err(|e| anyhow!("{e}"))?
            .label("one cold boot")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], BLACK));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(|e| anyhow!("{e}"))?;
    Ok(())
}
