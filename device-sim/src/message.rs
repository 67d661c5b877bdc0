//! What a virtual device sends: a batch of its readings with the measurement stamp (device id,
//! sequence number, simulated time, intended send time), as protobuf (`twin.v1.TelemetryBatch`,
//! the same message DeviceSync carries) or as the equivalent JSON; and how a checker reads the
//! stamp back from either.

use std::borrow::Cow;

use bytes::{BufMut as _, BytesMut};
use prost::Message as _;
use serde::{Deserialize, Serialize};
use twin_core::Scenario;
use twin_proto::v1 as pb;

use crate::fleet::DeviceInfo;

/// One reading of one sensor.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Reading {
    /// The sensor, as an index among the device's sensors.
    pub sensor: u16,
    /// Channels used in `values` (1 or 3).
    pub dims: u8,
    /// The device's timestamp (with any clock skew), nanoseconds from the scenario start.
    pub timestamp_nanos: i64,
    /// Channel values.
    pub values: [f64; 3],
}

/// A message handed to a device's connection.
#[derive(Clone, Debug)]
pub struct Outgoing {
    /// Global device index.
    pub device: u32,
    /// Per-device sequence number, from 1.
    pub sequence: u64,
    /// Simulated time the message was due, nanoseconds since the scenario start.
    pub sim_time_nanos: i64,
    /// Wall-clock time the schedule meant to send it, Unix nanoseconds.
    pub intended_unix_nanos: i64,
    /// The readings it carries.
    pub readings: Vec<Reading>,
}

/// Payload encoding on MQTT and NATS.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PayloadFormat {
    /// JSON text, the shape of `TelemetryBatch` with proto field names.
    Json,
    /// `twin.v1.TelemetryBatch`, protobuf binary.
    Protobuf,
}

/// The measurement fields, as a checker reads them.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Stamp {
    /// Device id.
    pub device_id: String,
    /// Per-device sequence number.
    pub sequence: u64,
    /// Simulated time, nanoseconds since the scenario start.
    pub sim_time_nanos: i64,
    /// Intended send time, Unix nanoseconds.
    pub intended_send_unix_nanos: i64,
    /// Actual send time, Unix nanoseconds.
    pub sent_unix_nanos: i64,
}

/// Builds the `TelemetryBatch` of a message. Each sensor's readings form one series (a new
/// series starts where a clock skew makes timestamps go backwards, as offsets may not
/// decrease); `run_start_unix_nanos` is the wall time of simulated time 0.
pub fn batch(
    scenario: &Scenario,
    device: &DeviceInfo,
    message: &Outgoing,
    run_start_unix_nanos: i64,
    sent_unix_nanos: i64,
) -> pb::TelemetryBatch {
    pb::TelemetryBatch {
        stamp: Some(pb::BatchStamp {
            device_id: device.id.clone(),
            sequence: message.sequence,
            sim_time_nanos: message.sim_time_nanos,
            intended_send_unix_nanos: message.intended_unix_nanos,
            sent_unix_nanos,
            gateway_id: String::new(),
        }),
        sensors: series(scenario, device, &message.readings, run_start_unix_nanos),
    }
}

/// The readings of a message as `TelemetryBatch` series (see [`batch`]); no allocation when
/// there are none.
fn series(
    scenario: &Scenario,
    device: &DeviceInfo,
    readings: &[Reading],
    run_start_unix_nanos: i64,
) -> Vec<pb::SensorSeries> {
    let mut sensors: Vec<pb::SensorSeries> = Vec::new();
    let mut current: Option<(u16, i64)> = None;
    for reading in readings {
        let spec = &scenario.sensors[device.sensors.start + usize::from(reading.sensor)];
        let continues = matches!(current, Some((sensor, first)) if sensor == reading.sensor
        && sensors.last().and_then(|s| s.offsets_nanos.last()).is_some_and(|&last| {
            reading.timestamp_nanos - first >= last as i64
        }));
        if !continues {
            let names = spec.channel_names();
            sensors.push(pb::SensorSeries {
                sensor: spec.name.clone(),
                start_unix_nanos: run_start_unix_nanos.saturating_add(reading.timestamp_nanos),
                offsets_nanos: Vec::new(),
                channels: (0..usize::from(reading.dims))
                    .map(|c| pb::ChannelValues {
                        channel: names.get(c).copied().unwrap_or_default().to_owned(),
                        values: Vec::new(),
                    })
                    .collect(),
            });
            current = Some((reading.sensor, reading.timestamp_nanos));
        }
        let first = current.map_or(reading.timestamp_nanos, |(_, first)| first);
        if let Some(series) = sensors.last_mut() {
            series
                .offsets_nanos
                .push((reading.timestamp_nanos - first).max(0) as u64);
            for (channel, value) in series.channels.iter_mut().zip(reading.values) {
                channel.values.push(value);
            }
        }
    }
    sensors
}

/// Appends a message's payload to `out`: the same bytes as `encode(&batch(..), format)`, but
/// the stamp is borrowed rather than copied into a `TelemetryBatch`, and nothing is allocated
/// for a message without readings (the bytes go into the caller's reused buffer).
pub fn write_payload(
    out: &mut BytesMut,
    scenario: &Scenario,
    device: &DeviceInfo,
    message: &Outgoing,
    run_start_unix_nanos: i64,
    sent_unix_nanos: i64,
    format: PayloadFormat,
) {
    match format {
        PayloadFormat::Json => {
            // The stamp's layout is fixed: its start is the device's, written once; the
            // numbers go in with itoa (serde_json's own integer writer). What follows is
            // serde_json's, as in `encode` (a test compares the bytes).
            let mut number = itoa::Buffer::new();
            out.extend_from_slice(&device.json_prefix);
            out.extend_from_slice(number.format(message.sequence).as_bytes());
            out.extend_from_slice(br#","sim_time_nanos":"#);
            out.extend_from_slice(number.format(message.sim_time_nanos).as_bytes());
            out.extend_from_slice(br#","intended_send_unix_nanos":"#);
            out.extend_from_slice(number.format(message.intended_unix_nanos).as_bytes());
            out.extend_from_slice(br#","sent_unix_nanos":"#);
            out.extend_from_slice(number.format(sent_unix_nanos).as_bytes());
            out.extend_from_slice(br#"},"sensors":"#);
            if message.readings.is_empty() {
                out.extend_from_slice(b"[]");
            } else {
                let sensors = series(scenario, device, &message.readings, run_start_unix_nanos);
                // Writing to memory cannot fail, and these shapes always serialize.
                let _ = serde_json::to_writer(out.writer(), &json_series(&sensors));
            }
            out.put_u8(b'}');
        }
        PayloadFormat::Protobuf => {
            let batch = batch(scenario, device, message, run_start_unix_nanos, sent_unix_nanos);
            out.reserve(batch.encoded_len());
            // The buffer was just grown to fit: encoding cannot run out of room.
            let _ = batch.encode(out);
        }
    }
}

/// The JSON text of a batch, written to `out`.
fn write_json(out: impl std::io::Write, stamp: JsonStamp<'_>, sensors: &[pb::SensorSeries]) {
    let json = JsonBatch {
        stamp,
        sensors: json_series(sensors),
    };
    // Writing to memory cannot fail, and these shapes always serialize.
    let _ = serde_json::to_writer(out, &json);
}

/// The series of a batch in their JSON shape, borrowed.
fn json_series(sensors: &[pb::SensorSeries]) -> Vec<JsonSeries<'_>> {
    sensors
        .iter()
        .map(|s| JsonSeries {
            sensor: &s.sensor,
            start_unix_nanos: s.start_unix_nanos,
            offsets_nanos: &s.offsets_nanos,
            channels: s
                .channels
                .iter()
                .map(|c| JsonChannel {
                    channel: &c.channel,
                    values: &c.values,
                })
                .collect(),
        })
        .collect()
}

/// The start of a device's JSON payloads, up to the sequence number (see [`write_payload`]).
pub fn json_prefix(device_id: &str) -> Box<[u8]> {
    let mut prefix = br#"{"stamp":{"device_id":"#.to_vec();
    // A string always serializes (escaped as serde_json escapes it in `encode`).
    let _ = serde_json::to_writer(&mut prefix, device_id);
    prefix.extend_from_slice(br#","sequence":"#);
    prefix.into_boxed_slice()
}

#[derive(Serialize)]
struct JsonBatch<'a> {
    stamp: JsonStamp<'a>,
    sensors: Vec<JsonSeries<'a>>,
}

#[derive(Serialize)]
struct JsonStamp<'a> {
    device_id: &'a str,
    sequence: u64,
    sim_time_nanos: i64,
    intended_send_unix_nanos: i64,
    sent_unix_nanos: i64,
}

#[derive(Serialize)]
struct JsonSeries<'a> {
    sensor: &'a str,
    start_unix_nanos: i64,
    offsets_nanos: &'a [u64],
    channels: Vec<JsonChannel<'a>>,
}

#[derive(Serialize)]
struct JsonChannel<'a> {
    channel: &'a str,
    values: &'a [f64],
}

/// Encodes a batch as the payload of a broker message.
pub fn encode(batch: &pb::TelemetryBatch, format: PayloadFormat) -> Vec<u8> {
    match format {
        PayloadFormat::Protobuf => batch.encode_to_vec(),
        PayloadFormat::Json => {
            let default = pb::BatchStamp::default();
            let stamp = batch.stamp.as_ref().unwrap_or(&default);
            let mut out = Vec::with_capacity(256);
            write_json(
                &mut out,
                JsonStamp {
                    device_id: &stamp.device_id,
                    sequence: stamp.sequence,
                    sim_time_nanos: stamp.sim_time_nanos,
                    intended_send_unix_nanos: stamp.intended_send_unix_nanos,
                    sent_unix_nanos: stamp.sent_unix_nanos,
                },
                &batch.sensors,
            );
            out
        }
    }
}

/// Only the stamp of a `TelemetryBatch` (field 1): a checker skips the readings.
#[derive(Clone, PartialEq, prost::Message)]
struct StampOnly {
    #[prost(message, optional, tag = "1")]
    stamp: Option<pb::BatchStamp>,
}

#[derive(Deserialize)]
struct JsonStampOnly {
    stamp: Stamp,
}

/// A stamp as a checker reads it, the device id borrowed from the payload where it can be.
#[derive(Clone, Debug, PartialEq)]
pub struct StampRef<'a> {
    /// Device id.
    pub device_id: Cow<'a, str>,
    /// Per-device sequence number.
    pub sequence: u64,
    /// Simulated time, nanoseconds since the scenario start.
    pub sim_time_nanos: i64,
    /// Intended send time, Unix nanoseconds.
    pub intended_send_unix_nanos: i64,
    /// Actual send time, Unix nanoseconds.
    pub sent_unix_nanos: i64,
}

impl Stamp {
    /// This stamp as a [`StampRef`].
    pub fn borrowed(&self) -> StampRef<'_> {
        StampRef {
            device_id: Cow::Borrowed(&self.device_id),
            sequence: self.sequence,
            sim_time_nanos: self.sim_time_nanos,
            intended_send_unix_nanos: self.intended_send_unix_nanos,
            sent_unix_nanos: self.sent_unix_nanos,
        }
    }
}

impl StampRef<'_> {
    /// An owned copy.
    pub fn into_owned(self) -> Stamp {
        Stamp {
            device_id: self.device_id.into_owned(),
            sequence: self.sequence,
            sim_time_nanos: self.sim_time_nanos,
            intended_send_unix_nanos: self.intended_send_unix_nanos,
            sent_unix_nanos: self.sent_unix_nanos,
        }
    }
}

/// Reads the stamp of a payload, if it is one of device-sim's.
pub fn decode_stamp(payload: &[u8], format: PayloadFormat) -> Option<Stamp> {
    read_stamp(payload, format).map(StampRef::into_owned)
}

/// Reads the stamp of a payload, if it is one of device-sim's, without copying the device id
/// out of a JSON payload. JSON as device-sim writes it (the stamp first, its fields in order,
/// no whitespace, an id without escapes) is read by a prefix reader that looks at the
/// stamp only; any other JSON goes through serde_json, which reads the whole document.
pub fn read_stamp(payload: &[u8], format: PayloadFormat) -> Option<StampRef<'_>> {
    match format {
        PayloadFormat::Json => json_stamp_prefix(payload).or_else(|| {
            let stamp = serde_json::from_slice::<JsonStampOnly>(payload).ok()?.stamp;
            Some(StampRef {
                device_id: Cow::Owned(stamp.device_id),
                sequence: stamp.sequence,
                sim_time_nanos: stamp.sim_time_nanos,
                intended_send_unix_nanos: stamp.intended_send_unix_nanos,
                sent_unix_nanos: stamp.sent_unix_nanos,
            })
        }),
        PayloadFormat::Protobuf => {
            let stamp = StampOnly::decode(payload).ok()?.stamp?;
            Some(StampRef {
                device_id: Cow::Owned(stamp.device_id),
                sequence: stamp.sequence,
                sim_time_nanos: stamp.sim_time_nanos,
                intended_send_unix_nanos: stamp.intended_send_unix_nanos,
                sent_unix_nanos: stamp.sent_unix_nanos,
            })
        }
    }
}

/// The stamp of a JSON payload laid out exactly as [`write_payload`] writes it:
/// `{"stamp":{"device_id":"..","sequence":N,"sim_time_nanos":N,"intended_send_unix_nanos":N,
/// "sent_unix_nanos":N}` followed by the readings, which are not read (the payload must end
/// with `}`). `None` for anything else, which the caller then parses in full.
fn json_stamp_prefix(payload: &[u8]) -> Option<StampRef<'_>> {
    if payload.last() != Some(&b'}') {
        return None;
    }
    let rest = payload.strip_prefix(br#"{"stamp":{"device_id":""#.as_slice())?;
    let end = rest.iter().position(|&b| b == b'"' || b == b'\\' || b < 0x20)?;
    if rest[end] != b'"' {
        return None;
    }
    let device_id = std::str::from_utf8(&rest[..end]).ok()?;
    let (sequence, rest) = json_integer::<u64>(&rest[end + 1..], br#","sequence":"#)?;
    let (sim_time_nanos, rest) = json_integer::<i64>(rest, br#","sim_time_nanos":"#)?;
    let (intended_send_unix_nanos, rest) = json_integer::<i64>(rest, br#","intended_send_unix_nanos":"#)?;
    let (sent_unix_nanos, rest) = json_integer::<i64>(rest, br#","sent_unix_nanos":"#)?;
    if rest.first() != Some(&b'}') {
        return None;
    }
    Some(StampRef {
        device_id: Cow::Borrowed(device_id),
        sequence,
        sim_time_nanos,
        intended_send_unix_nanos,
        sent_unix_nanos,
    })
}

/// `key` then a JSON integer (optional minus sign, digits); the value and what follows it.
/// `None` when it does not fit `T` (the caller then parses the payload in full, which fails
/// the same way).
fn json_integer<'a, T: TryFrom<i128>>(bytes: &'a [u8], key: &[u8]) -> Option<(T, &'a [u8])> {
    let rest = bytes.strip_prefix(key)?;
    let negative = rest.first() == Some(&b'-');
    let digits = rest[usize::from(negative)..]
        .iter()
        .take_while(|b| b.is_ascii_digit())
        .count();
    // More than 20 digits fits neither u64 nor i64 (and could overflow the accumulator).
    if digits == 0 || digits > 20 {
        return None;
    }
    let (number, rest) = rest.split_at(usize::from(negative) + digits);
    let magnitude = number[usize::from(negative)..]
        .iter()
        .fold(0i128, |value, digit| value * 10 + i128::from(digit - b'0'));
    let value = T::try_from(if negative { -magnitude } else { magnitude }).ok()?;
    Some((value, rest))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> pb::TelemetryBatch {
        pb::TelemetryBatch {
            stamp: Some(pb::BatchStamp {
                device_id: "pump-001".into(),
                sequence: 7,
                sim_time_nanos: 1_500_000_000,
                intended_send_unix_nanos: 1_700_000_000_000_000_000,
                sent_unix_nanos: 1_700_000_000_000_100_000,
                gateway_id: String::new(),
            }),
            sensors: vec![pb::SensorSeries {
                sensor: "temperature".into(),
                start_unix_nanos: 5,
                offsets_nanos: vec![0, 10],
                channels: vec![pb::ChannelValues {
                    channel: String::new(),
                    values: vec![21.5, 21.25],
                }],
            }],
        }
    }

    #[test]
    fn both_encodings_give_back_the_stamp() {
        for format in [PayloadFormat::Json, PayloadFormat::Protobuf] {
            let stamp = decode_stamp(&encode(&sample(), format), format).expect("stamp");
            assert_eq!(stamp.device_id, "pump-001");
            assert_eq!(stamp.sequence, 7);
            assert_eq!(stamp.sim_time_nanos, 1_500_000_000);
            assert_eq!(stamp.intended_send_unix_nanos, 1_700_000_000_000_000_000);
        }
        assert_eq!(decode_stamp(b"not json", PayloadFormat::Json), None);
    }

    #[test]
    fn json_has_the_proto_field_names() {
        let text = String::from_utf8(encode(&sample(), PayloadFormat::Json)).expect("utf-8");
        let value: serde_json::Value = serde_json::from_str(&text).expect("json");
        assert_eq!(value["stamp"]["sequence"], 7);
        assert_eq!(value["sensors"][0]["channels"][0]["values"][1], 21.25);
    }

    const TWO_SENSORS: &str = r#"
seed = 1
[meta]
name = "two-sensors"
description = "Two devices with a 1-channel and a vibration sensor."
[clock]
mode = "virtual"
duration = "10s"
tick = "250ms"
[[fleet]]
name = "m"
count = 2
id = "m-{index:02}"
upload = { mode = "raw" }
[[fleet.sensors]]
name = "temperature"
unit = "C"
rate_hz = 4
ornstein_uhlenbeck = { mean = 21.0, reversion = 0.1, volatility = 0.2 }
[[fleet.sensors]]
name = "accel"
unit = "m/s^2"
rate_hz = 100
vibration = { shaft_hz = 25.0, harmonics = [0.5] }
"#;

    fn reading(sensor: u16, dims: u8, timestamp_nanos: i64, base: f64) -> Reading {
        Reading {
            sensor,
            dims,
            timestamp_nanos,
            values: [base, base + 0.125, -base],
        }
    }

    #[test]
    fn written_payloads_are_the_bytes_of_the_encoded_batch() {
        let scenario = Scenario::from_toml("two-sensors", TWO_SENSORS, &twin_core::NoFiles, Default::default())
            .expect("valid scenario");
        let fleet = crate::fleet::Fleet::new(std::sync::Arc::new(scenario));
        // The scenario's device, and the same with an id JSON must escape (its start is
        // written once per device, ahead of the messages).
        let mut escaped = fleet.devices[1].clone();
        escaped.id = "m\"01\\ü\u{1}".into();
        escaped.json_prefix = json_prefix(&escaped.id);
        let messages = [
            Vec::new(),
            vec![reading(0, 1, 250_000_000, 21.5)],
            // Two sensors, three channels, and a clock skew that starts a new series.
            vec![
                reading(0, 1, 250_000_000, 21.5),
                reading(0, 1, 500_000_000, 21.25),
                reading(0, 1, 400_000_000, 1e-9),
                reading(1, 3, 100_000_000, -3.75),
                reading(1, 3, 200_000_000, 1e300),
            ],
        ];
        let mut buffer = BytesMut::new();
        for ((n, readings), device) in messages
            .into_iter()
            .enumerate()
            .flat_map(|m| [(m.clone(), &fleet.devices[1]), (m, &escaped)])
        {
            let message = Outgoing {
                device: device.index,
                sequence: 41 + n as u64,
                sim_time_nanos: 1_000_000_000 * n as i64,
                intended_unix_nanos: 1_700_000_000_000_000_000 + n as i64,
                readings,
            };
            for format in [PayloadFormat::Json, PayloadFormat::Protobuf] {
                let expected = encode(&batch(&fleet.scenario, device, &message, 1_000, 2_000), format);
                write_payload(&mut buffer, &fleet.scenario, device, &message, 1_000, 2_000, format);
                let written = buffer.split();
                assert_eq!(&written[..], &expected[..], "message {n}, {format:?}");
            }
        }
    }

    #[test]
    fn the_stamp_prefix_reader_agrees_with_serde_json() {
        let mut payload = encode(&sample(), PayloadFormat::Json);
        let fast = json_stamp_prefix(&payload).expect("device-sim's own layout");
        assert!(matches!(fast.device_id, Cow::Borrowed("pump-001")));
        let full = serde_json::from_slice::<JsonStampOnly>(&payload).expect("json").stamp;
        assert_eq!(fast.into_owned(), full);
        // Another layout (whitespace, other order, escapes) is read in full instead.
        let spaced = br#"{ "stamp": {"sequence": 3, "device_id": "a\"b", "sim_time_nanos": -1,
            "intended_send_unix_nanos": 5, "sent_unix_nanos": 6}, "sensors": []}"#;
        assert_eq!(json_stamp_prefix(spaced), None);
        let stamp = read_stamp(spaced, PayloadFormat::Json).expect("valid json");
        assert_eq!(
            (stamp.device_id.as_ref(), stamp.sequence, stamp.sim_time_nanos),
            ("a\"b", 3, -1)
        );
        // Numbers at and beyond the limits of their types.
        for (sequence, expected) in [
            ("18446744073709551615", Some(u64::MAX)),
            ("18446744073709551616", None),
            ("-1", None),
            ("99999999999999999999999", None),
        ] {
            let text = format!(
                r#"{{"stamp":{{"device_id":"d","sequence":{sequence},"sim_time_nanos":-9223372036854775808,"intended_send_unix_nanos":0,"sent_unix_nanos":0}},"sensors":[]}}"#
            );
            let fast = json_stamp_prefix(text.as_bytes());
            assert_eq!(fast.as_ref().map(|s| s.sequence), expected, "{sequence}");
            assert_eq!(fast.map(|s| s.sim_time_nanos).unwrap_or(i64::MIN), i64::MIN);
            // Where the prefix reader gives up, serde_json agrees that it is no stamp.
            if expected.is_none() {
                assert_eq!(read_stamp(text.as_bytes(), PayloadFormat::Json), None, "{sequence}");
            }
        }
        // A cut payload is not a stamp.
        payload.truncate(40);
        assert_eq!(read_stamp(&payload, PayloadFormat::Json), None);
    }
}
