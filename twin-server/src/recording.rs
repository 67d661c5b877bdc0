//! Writes a run's readings as JSON Lines, the format `replay` reads back:
//! `{"timestamp":12.5,"device":"pump-00001","sensor":"temperature","value":21.37}`
//! (`value` is an array for vector sensors). Numbers are written in their shortest exact form,
//! so a replay of a recording reproduces the readings bit for bit.

use std::io::{self, Write};

use serde::Serialize;
use twin_core::RecordedSample;

#[derive(Serialize)]
struct Line<'a> {
    timestamp: f64,
    device: &'a str,
    sensor: &'a str,
    value: Value<'a>,
}

#[derive(Serialize)]
#[serde(untagged)]
enum Value<'a> {
    Scalar(f64),
    Vector(&'a [f64]),
}

/// Appends one reading to `out`.
///
/// # Errors
/// Write failures.
pub fn write_sample(out: &mut impl Write, sample: &RecordedSample<'_>) -> io::Result<()> {
    let value = if sample.values.len() == 1 {
        Value::Scalar(sample.values[0])
    } else {
        Value::Vector(sample.values)
    };
    serde_json::to_writer(
        &mut *out,
        &Line {
            timestamp: sample.timestamp,
            device: sample.device,
            sensor: sample.sensor,
            value,
        },
    )?;
    out.write_all(b"\n")
}
