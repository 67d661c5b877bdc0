//! What a virtual device sends: a batch of its readings with the measurement stamp (device id,
//! sequence number, simulated time, intended send time), as protobuf (`twin.v1.TelemetryBatch`,
//! the same message DeviceSync carries) or as the equivalent JSON; and how a checker reads the
//! stamp back from either.

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
    let mut sensors: Vec<pb::SensorSeries> = Vec::new();
    let mut current: Option<(u16, i64)> = None;
    for reading in &message.readings {
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
    pb::TelemetryBatch {
        stamp: Some(pb::BatchStamp {
            device_id: device.id.clone(),
            sequence: message.sequence,
            sim_time_nanos: message.sim_time_nanos,
            intended_send_unix_nanos: message.intended_unix_nanos,
            sent_unix_nanos,
            gateway_id: String::new(),
        }),
        sensors,
    }
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
            let stamp = batch.stamp.clone().unwrap_or_default();
            let json = JsonBatch {
                stamp: JsonStamp {
                    device_id: &stamp.device_id,
                    sequence: stamp.sequence,
                    sim_time_nanos: stamp.sim_time_nanos,
                    intended_send_unix_nanos: stamp.intended_send_unix_nanos,
                    sent_unix_nanos: stamp.sent_unix_nanos,
                },
                sensors: batch
                    .sensors
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
                    .collect(),
            };
            serde_json::to_vec(&json).unwrap_or_default()
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

/// Reads the stamp of a payload, if it is one of device-sim's.
pub fn decode_stamp(payload: &[u8], format: PayloadFormat) -> Option<Stamp> {
    match format {
        PayloadFormat::Json => serde_json::from_slice::<JsonStampOnly>(payload).ok().map(|s| s.stamp),
        PayloadFormat::Protobuf => {
            let stamp = StampOnly::decode(payload).ok()?.stamp?;
            Some(Stamp {
                device_id: stamp.device_id,
                sequence: stamp.sequence,
                sim_time_nanos: stamp.sim_time_nanos,
                intended_send_unix_nanos: stamp.intended_send_unix_nanos,
                sent_unix_nanos: stamp.sent_unix_nanos,
            })
        }
    }
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
}
