//! Recorded telemetry as a signal: CSV or JSON Lines files with a timestamp column, grouped into
//! per-sensor series and mapped onto simulated time (speed factor, loop, start offset).
//!
//! Parsing is pure: the caller reads the file and hands over its text, so `twin-core` stays
//! free of IO. Malformed rows are reported with the file name and line.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::UNIX_EPOCH;

use thiserror::Error;

/// A replay file could not be used.
#[derive(Debug, Error, PartialEq)]
pub enum ReplayError {
    /// A row is malformed.
    #[error("{file}:{line}: {reason}")]
    Row {
        /// File as named in the scenario.
        file: String,
        /// 1-based line.
        line: u64,
        /// What is wrong.
        reason: String,
    },
    /// The file as a whole is unusable.
    #[error("{file}: {reason}")]
    File {
        /// File as named in the scenario.
        file: String,
        /// What is wrong.
        reason: String,
    },
}

/// File formats a replay can read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReplayFormat {
    /// Header row, comma-separated.
    Csv,
    /// One JSON object per line.
    Jsonl,
}

/// Which file time maps to the scenario start.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Origin {
    /// The first row of each series.
    FirstRow,
    /// A fixed file time, in seconds.
    At(f64),
}

/// How a sensor replays a file.
#[derive(Clone, Debug)]
pub struct ReplaySpec {
    /// File as named in the scenario.
    pub file: String,
    /// Format.
    pub format: ReplayFormat,
    /// Timestamp column.
    pub timestamp: String,
    /// Value columns.
    pub columns: Vec<String>,
    /// Channels per sample (columns, or the length of an array-valued column).
    pub dims: usize,
    /// (column, template) pairs a row must match.
    pub filter: Vec<(String, String)>,
    /// Playback speed factor.
    pub speed: f64,
    /// Start again at the end.
    pub looping: bool,
    /// Seconds of the recording skipped.
    pub start_offset: f64,
    /// Time origin.
    pub origin: Origin,
    /// Parsed rows, grouped by filter key.
    pub table: Arc<ReplayTable>,
}

/// One sensor's replayed samples on the simulation's time axis.
#[derive(Debug, Default)]
pub struct ReplaySeries {
    /// Simulated seconds of each sample, non-decreasing.
    pub times: Vec<f64>,
    /// Values, `dims` per sample.
    pub values: Vec<f64>,
    /// Loop period in simulated seconds (span plus the last gap).
    pub period: f64,
    /// Values per row.
    pub dims: usize,
}

/// Rows of a file grouped by the values of the filter columns.
#[derive(Debug, Default)]
pub struct ReplayTable {
    /// Key (filter values joined by U+001F) to series.
    pub series: HashMap<String, Arc<ReplaySeries>>,
}

/// Joins filter values into a series key.
pub fn series_key<'a>(values: impl IntoIterator<Item = &'a str>) -> String {
    let mut key = String::new();
    for (i, value) in values.into_iter().enumerate() {
        if i > 0 {
            key.push('\u{1f}');
        }
        key.push_str(value);
    }
    key
}

struct RawRow {
    line: u64,
    key: String,
    time: f64,
    values: Vec<f64>,
}

fn parse_timestamp(text: &str) -> Result<f64, String> {
    if let Ok(seconds) = text.trim().parse::<f64>() {
        if seconds.is_finite() {
            return Ok(seconds);
        }
        return Err(format!("timestamp `{text}` is not finite"));
    }
    let time = humantime::parse_rfc3339_weak(text.trim())
        .map_err(|err| format!("timestamp `{text}` is neither seconds nor RFC 3339 ({err})"))?;
    let since = time
        .duration_since(UNIX_EPOCH)
        .map_err(|_| format!("timestamp `{text}` is before 1970"))?;
    Ok(since.as_secs_f64())
}

fn parse_number(column: &str, text: &str) -> Result<f64, String> {
    match text.trim().parse::<f64>() {
        Ok(v) if v.is_finite() => Ok(v),
        Ok(_) => Err(format!("column `{column}`: value `{text}` is not finite")),
        Err(_) => Err(format!("column `{column}`: `{text}` is not a number")),
    }
}

/// Parses a replay file and groups its rows into series, as `spec` (whose `table` and `dims`
/// are ignored) describes. Rows of one series must all have the same number of values.
///
/// # Errors
/// The first malformed row (file and line named), or a file without usable rows.
pub fn parse(spec: &ReplaySpec, text: &str) -> Result<ReplayTable, ReplayError> {
    let rows = match spec.format {
        ReplayFormat::Csv => parse_csv(spec, text)?,
        ReplayFormat::Jsonl => parse_jsonl(spec, text)?,
    };
    if rows.is_empty() {
        return Err(ReplayError::File {
            file: spec.file.clone(),
            reason: "no data rows".into(),
        });
    }
    let mut grouped: HashMap<String, Vec<RawRow>> = HashMap::new();
    for row in rows {
        let series = grouped.entry(row.key.clone()).or_default();
        if let Some(first) = series.first()
            && first.values.len() != row.values.len()
        {
            return Err(ReplayError::Row {
                file: spec.file.clone(),
                line: row.line,
                reason: format!(
                    "{} values where line {} of the same series has {}",
                    row.values.len(),
                    first.line,
                    first.values.len()
                ),
            });
        }
        series.push(row);
    }
    let mut table = ReplayTable::default();
    for (key, rows) in grouped {
        let dims = rows[0].values.len();
        let series = build_series(spec, &rows, dims)?;
        table.series.insert(key, Arc::new(series));
    }
    Ok(table)
}

fn build_series(spec: &ReplaySpec, rows: &[RawRow], dims: usize) -> Result<ReplaySeries, ReplayError> {
    let origin = match spec.origin {
        Origin::FirstRow => rows[0].time,
        Origin::At(t) => t,
    };
    let mut series = ReplaySeries {
        dims,
        ..ReplaySeries::default()
    };
    let mut previous_time = f64::NEG_INFINITY;
    for row in rows {
        if row.time < previous_time {
            return Err(ReplayError::Row {
                file: spec.file.clone(),
                line: row.line,
                reason: format!("timestamp {} goes backwards (previous {previous_time})", row.time),
            });
        }
        previous_time = row.time;
        let file_offset = row.time - origin - spec.start_offset;
        if file_offset < 0.0 {
            continue;
        }
        series.times.push(file_offset / spec.speed);
        series.values.extend_from_slice(&row.values[..dims]);
    }
    let n = series.times.len();
    series.period = match n {
        0 => 0.0,
        1 => 1.0,
        _ => {
            let gap = series.times[n - 1] - series.times[n - 2];
            series.times[n - 1] - series.times[0] + if gap > 0.0 { gap } else { 1.0 }
        }
    };
    Ok(series)
}

fn parse_csv(spec: &ReplaySpec, text: &str) -> Result<Vec<RawRow>, ReplayError> {
    let file_error = |reason: String| ReplayError::File {
        file: spec.file.clone(),
        reason,
    };
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(true)
        .trim(csv::Trim::All)
        .from_reader(text.as_bytes());
    let headers = reader
        .headers()
        .map_err(|err| file_error(format!("unreadable header: {err}")))?
        .clone();
    let find = |name: &str| {
        headers.iter().position(|h| h == name).ok_or_else(|| {
            file_error(format!(
                "no column `{name}` (columns: {})",
                headers.iter().collect::<Vec<_>>().join(", ")
            ))
        })
    };
    let time_index = find(&spec.timestamp)?;
    let value_indices = spec.columns.iter().map(|c| find(c)).collect::<Result<Vec<_>, _>>()?;
    let filter_indices = spec
        .filter
        .iter()
        .map(|(c, _)| find(c))
        .collect::<Result<Vec<_>, _>>()?;
    let mut rows = Vec::new();
    for record in reader.records() {
        let record = record.map_err(|err| {
            let line = err.position().map_or(0, csv::Position::line);
            ReplayError::Row {
                file: spec.file.clone(),
                line,
                reason: err.to_string(),
            }
        })?;
        let line = record.position().map_or(0, csv::Position::line);
        let row_error = |reason: String| ReplayError::Row {
            file: spec.file.clone(),
            line,
            reason,
        };
        let field = |i: usize| record.get(i).unwrap_or("");
        let time = parse_timestamp(field(time_index)).map_err(row_error)?;
        let values = value_indices
            .iter()
            .zip(&spec.columns)
            .map(|(&i, c)| parse_number(c, field(i)))
            .collect::<Result<Vec<_>, _>>()
            .map_err(row_error)?;
        let key = series_key(filter_indices.iter().map(|&i| field(i)));
        rows.push(RawRow {
            line,
            key,
            time,
            values,
        });
    }
    Ok(rows)
}

fn json_text(value: &serde_json::Value) -> Option<String> {
    match value {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Number(n) => Some(n.to_string()),
        serde_json::Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

fn parse_jsonl(spec: &ReplaySpec, text: &str) -> Result<Vec<RawRow>, ReplayError> {
    let mut rows = Vec::new();
    for (index, line_text) in text.lines().enumerate() {
        let line = index as u64 + 1;
        if line_text.trim().is_empty() {
            continue;
        }
        let row_error = |reason: String| ReplayError::Row {
            file: spec.file.clone(),
            line,
            reason,
        };
        let object: serde_json::Map<String, serde_json::Value> =
            serde_json::from_str(line_text).map_err(|err| row_error(format!("not a JSON object: {err}")))?;
        let field = |name: &str| object.get(name).ok_or_else(|| row_error(format!("no field `{name}`")));
        let time = match field(&spec.timestamp)? {
            serde_json::Value::Number(n) => n
                .as_f64()
                .filter(|v| v.is_finite())
                .ok_or_else(|| row_error(format!("timestamp `{n}` is not finite")))?,
            serde_json::Value::String(s) => parse_timestamp(s).map_err(row_error)?,
            other => {
                return Err(row_error(format!(
                    "timestamp `{other}` is neither a number nor a string"
                )));
            }
        };
        let mut values = Vec::with_capacity(spec.columns.len());
        for column in &spec.columns {
            match field(column)? {
                serde_json::Value::Number(n) => values.push(
                    n.as_f64()
                        .ok_or_else(|| row_error(format!("column `{column}`: `{n}` is not a number")))?,
                ),
                serde_json::Value::Array(items) if spec.columns.len() == 1 => {
                    for item in items {
                        values.push(
                            item.as_f64()
                                .ok_or_else(|| row_error(format!("column `{column}`: `{item}` is not a number")))?,
                        );
                    }
                }
                other => {
                    return Err(row_error(format!("column `{column}`: `{other}` is not a number")));
                }
            }
        }
        let mut filter_values = Vec::with_capacity(spec.filter.len());
        for (column, _) in &spec.filter {
            let value = field(column)?;
            filter_values
                .push(json_text(value).ok_or_else(|| row_error(format!("column `{column}`: `{value}` is not text")))?);
        }
        let key = series_key(filter_values.iter().map(String::as_str));
        rows.push(RawRow {
            line,
            key,
            time,
            values,
        });
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(format: ReplayFormat, filter: Vec<(String, String)>) -> ReplaySpec {
        ReplaySpec {
            file: "rec.data".into(),
            format,
            timestamp: "timestamp".into(),
            columns: vec!["value".into()],
            dims: 1,
            filter,
            speed: 2.0,
            looping: false,
            start_offset: 1.0,
            origin: Origin::FirstRow,
            table: Arc::default(),
        }
    }

    #[test]
    fn csv_groups_maps_time_and_names_bad_lines() {
        let text = "timestamp,device,value\n10,a,1.5\n11,a,2.5\n12,a,3.5\n10,b,7\n";
        let table = parse(&spec(ReplayFormat::Csv, vec![("device".into(), "{id}".into())]), text).expect("parses");
        let a = &table.series["a"];
        assert_eq!(a.dims, 1);
        // start_offset 1 s skips the first row; speed 2 halves the gaps.
        assert_eq!(a.times, vec![0.0, 0.5]);
        assert_eq!(a.values, vec![2.5, 3.5]);
        let bad = "timestamp,device,value\n10,a,1.5\n11,a,oops\n";
        let err = parse(&spec(ReplayFormat::Csv, vec![]), bad).expect_err("malformed");
        assert_eq!(err.to_string(), "rec.data:3: column `value`: `oops` is not a number");
    }

    #[test]
    fn jsonl_arrays_and_rfc3339() {
        let text = "{\"timestamp\":\"2026-01-01T00:00:00Z\",\"value\":[1,2,3]}\n{\"timestamp\":\"2026-01-01T00:00:04Z\",\"value\":[4,5,6]}\n";
        let mut s = spec(ReplayFormat::Jsonl, vec![]);
        s.start_offset = 0.0;
        s.speed = 1.0;
        let table = parse(&s, text).expect("parses");
        let series = &table.series[""];
        assert_eq!(series.dims, 3);
        assert_eq!(series.times, vec![0.0, 4.0]);
        assert_eq!(series.period, 8.0);
        let err = parse(&s, "{\"timestamp\":1}\n").expect_err("missing value");
        assert_eq!(err.to_string(), "rec.data:1: no field `value`");
    }
}
