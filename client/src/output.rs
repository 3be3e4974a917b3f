//! How results reach the user: aligned tables for people, one JSON value per line for scripts,
//! and progress bars on stderr only when a person is watching.

use std::io::{IsTerminal, Write};
use std::time::Duration;

use indicatif::{ProgressBar, ProgressState, ProgressStyle};
use serde::Serialize;

use crate::error::Result;

/// Left-aligned columns, two spaces apart; columns listed in `right` are right-aligned (numbers).
pub fn table(
    out: &mut dyn Write,
    headers: &[&str],
    right: &[usize],
    rows: &[Vec<String>],
) -> Result<()> {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut s = String::new();
        for (i, (cell, w)) in cells.iter().zip(&widths).enumerate() {
            if i > 0 {
                s.push_str("  ");
            }
            let pad = w.saturating_sub(cell.chars().count());
            if right.contains(&i) {
                s.push_str(&" ".repeat(pad));
                s.push_str(cell);
            } else {
                s.push_str(cell);
                if i + 1 < cells.len() {
                    s.push_str(&" ".repeat(pad));
                }
            }
        }
        s
    };
    writeln!(out, "{}", line(headers.to_vec()))?;
    for row in rows {
        writeln!(out, "{}", line(row.iter().map(String::as_str).collect()))?;
    }
    Ok(())
}

/// `key  value` lines with the keys aligned: for summaries of one thing (`info`).
pub fn key_values(out: &mut dyn Write, pairs: &[(&str, String)]) -> Result<()> {
    let width = pairs
        .iter()
        .map(|(k, _)| k.chars().count())
        .max()
        .unwrap_or(0);
    for (k, v) in pairs {
        writeln!(out, "{k:<width$}  {v}")?;
    }
    Ok(())
}

/// One compact JSON value and a newline: what `jq` and line-oriented scripts read.
pub fn json_line(out: &mut dyn Write, value: &impl Serialize) -> Result<()> {
    let s = serde_json::to_string(value).map_err(std::io::Error::other)?;
    writeln!(out, "{s}")?;
    Ok(())
}

/// A bar with rate and ETA on stderr; hidden for `--json` and when stderr is not a terminal,
/// so logs and pipes stay clean.
pub fn progress(len: u64, unit: &str, json: bool) -> ProgressBar {
    if json || !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::new(len);
    let template =
        format!("{{msg}} [{{bar:30.cyan/blue}}] {{pos}}/{{len}} {unit} {{rate}} ETA {{eta}}");
    if let Ok(style) = ProgressStyle::with_template(&template) {
        // indicatif's own {per_sec} prints four decimals; one is what a person reads.
        let rate = |state: &ProgressState, w: &mut dyn std::fmt::Write| {
            let _ = write!(w, "{:.1}/s", state.per_sec());
        };
        pb.set_style(style.with_key("rate", rate).progress_chars("=> "));
    }
    pb.enable_steady_tick(Duration::from_millis(200));
    pb
}

/// `1.23 s` / `850 ms`: durations as people read them.
pub fn human_duration(d: Duration) -> String {
    let ms = d.as_secs_f64() * 1000.0;
    if ms >= 1000.0 {
        format!("{:.2} s", ms / 1000.0)
    } else {
        format!("{ms:.0} ms")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_aligns_columns() {
        let mut out = Vec::new();
        let rows = vec![
            vec!["a.jpg".to_string(), "0.5".to_string()],
            vec!["long.jpg".to_string(), "0.25".to_string()],
        ];
        table(&mut out, &["image", "p"], &[1], &rows).unwrap();
        let s = String::from_utf8(out).unwrap();
        assert_eq!(s, "image        p\na.jpg      0.5\nlong.jpg  0.25\n");
    }

    #[test]
    fn json_line_is_one_line() {
        let mut out = Vec::new();
        json_line(&mut out, &serde_json::json!({"a": [1, 2]})).unwrap();
        assert_eq!(String::from_utf8(out).unwrap(), "{\"a\":[1,2]}\n");
    }
}
