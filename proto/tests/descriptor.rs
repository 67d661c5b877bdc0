//! The exported descriptor set holds every service and RPC of twin.v1, documents every
//! element, is accepted by tonic's reflection service, and one message of each service survives
//! an encode/decode round trip.

use std::collections::{BTreeMap, BTreeSet};

use prost::Message;
use prost_types::{FileDescriptorProto, FileDescriptorSet};
use twin_proto::FILE_DESCRIPTOR_SET;
use twin_proto::v1;

/// The services of twin.v1 and the RPCs each must have.
const EXPECTED: &[(&str, &[&str])] = &[
    (
        "twin.v1.Twins",
        &[
            "GetTwin",
            "ListTwins",
            "CreateTwin",
            "UpdateDesired",
            "UpdateDesiredBatch",
            "UpdateTags",
            "DeleteTwin",
            "Watch",
        ],
    ),
    ("twin.v1.DeviceSync", &["Sync"]),
    ("twin.v1.Telemetry", &["Ingest", "IngestBatch", "Read"]),
    ("twin.v1.Models", &["ListModels", "DeployModel"]),
    (
        "twin.v1.Simulation",
        &["StartSimulation", "GetSimulation", "WatchSimulation", "GetReport"],
    ),
];

fn descriptor_set() -> FileDescriptorSet {
    match FileDescriptorSet::decode(FILE_DESCRIPTOR_SET) {
        Ok(set) => set,
        Err(err) => panic!("the exported descriptor set does not decode: {err}"),
    }
}

fn twin_files(set: &FileDescriptorSet) -> Vec<&FileDescriptorProto> {
    set.file.iter().filter(|file| file.package() == "twin.v1").collect()
}

#[test]
fn every_service_and_rpc_is_in_the_descriptor_set() {
    let set = descriptor_set();
    let mut services: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in twin_files(&set) {
        for service in &file.service {
            let methods = service.method.iter().map(|method| method.name().to_owned()).collect();
            services.insert(format!("twin.v1.{}", service.name()), methods);
        }
    }
    let expected_names: BTreeSet<&str> = EXPECTED.iter().map(|(name, _)| *name).collect();
    let found_names: BTreeSet<&str> = services.keys().map(String::as_str).collect();
    assert_eq!(found_names, expected_names, "services of twin.v1");
    for (service, methods) in EXPECTED {
        let expected_methods: BTreeSet<String> = methods.iter().map(|method| (*method).to_owned()).collect();
        assert_eq!(services[*service], expected_methods, "rpcs of {service}");
    }
}

#[test]
fn streaming_shapes_are_as_documented() {
    let set = descriptor_set();
    let mut shapes = BTreeMap::new();
    for file in twin_files(&set) {
        for service in &file.service {
            for method in &service.method {
                let key = format!("{}.{}", service.name(), method.name());
                shapes.insert(key, (method.client_streaming(), method.server_streaming()));
            }
        }
    }
    assert_eq!(shapes["Twins.Watch"], (false, true));
    assert_eq!(shapes["DeviceSync.Sync"], (true, true));
    assert_eq!(shapes["Telemetry.Ingest"], (true, false));
    assert_eq!(shapes["Telemetry.IngestBatch"], (false, false));
    assert_eq!(shapes["Telemetry.Read"], (false, false));
    assert_eq!(shapes["Simulation.WatchSimulation"], (false, true));
    assert_eq!(shapes["Twins.UpdateDesired"], (false, false));
    assert_eq!(shapes["Twins.UpdateDesiredBatch"], (false, false));
}

#[test]
fn imports_are_included_for_reflection_clients() {
    let set = descriptor_set();
    let names: BTreeSet<&str> = set.file.iter().map(|file| file.name()).collect();
    for file in &set.file {
        for dependency in &file.dependency {
            assert!(
                names.contains(dependency.as_str()),
                "{} imports {dependency}, which the set lacks",
                file.name()
            );
        }
    }
}

#[test]
fn reflection_accepts_the_descriptor_set() {
    let built = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
        .build_v1();
    if let Err(err) = built {
        panic!("tonic-reflection refuses the descriptor set: {err}");
    }
}

/// Source-info paths (descriptor.proto field numbers) of every element that needs a comment.
fn documented_elements(file: &FileDescriptorProto) -> Vec<(Vec<i32>, String)> {
    const MESSAGE: i32 = 4;
    const ENUM: i32 = 5;
    const SERVICE: i32 = 6;
    const MESSAGE_FIELD: i32 = 2;
    const MESSAGE_NESTED: i32 = 3;
    const MESSAGE_ENUM: i32 = 4;
    const MESSAGE_ONEOF: i32 = 8;
    const ENUM_VALUE: i32 = 2;
    const SERVICE_METHOD: i32 = 2;

    fn message(
        path: Vec<i32>,
        descriptor: &prost_types::DescriptorProto,
        prefix: &str,
        out: &mut Vec<(Vec<i32>, String)>,
    ) {
        // Map entries are synthesized by the compiler and have no source.
        if descriptor.options.as_ref().is_some_and(|options| options.map_entry()) {
            return;
        }
        let name = format!("{prefix}{}", descriptor.name());
        out.push((path.clone(), name.clone()));
        for (index, field) in descriptor.field.iter().enumerate() {
            out.push((
                [path.as_slice(), &[MESSAGE_FIELD, index as i32]].concat(),
                format!("{name}.{}", field.name()),
            ));
        }
        for (index, oneof) in descriptor.oneof_decl.iter().enumerate() {
            // proto3 `optional` creates a synthetic oneof named after its field.
            let synthetic = descriptor
                .field
                .iter()
                .any(|field| field.proto3_optional() && field.oneof_index == Some(index as i32));
            if !synthetic {
                out.push((
                    [path.as_slice(), &[MESSAGE_ONEOF, index as i32]].concat(),
                    format!("{name}.{}", oneof.name()),
                ));
            }
        }
        for (index, nested) in descriptor.nested_type.iter().enumerate() {
            let nested_path = [path.as_slice(), &[MESSAGE_NESTED, index as i32]].concat();
            message(nested_path, nested, &format!("{name}."), out);
        }
        for (index, nested) in descriptor.enum_type.iter().enumerate() {
            let nested_path = [path.as_slice(), &[MESSAGE_ENUM, index as i32]].concat();
            enumeration(nested_path, nested, &format!("{name}."), out);
        }
    }

    fn enumeration(
        path: Vec<i32>,
        descriptor: &prost_types::EnumDescriptorProto,
        prefix: &str,
        out: &mut Vec<(Vec<i32>, String)>,
    ) {
        let name = format!("{prefix}{}", descriptor.name());
        out.push((path.clone(), name.clone()));
        for (index, value) in descriptor.value.iter().enumerate() {
            out.push((
                [path.as_slice(), &[ENUM_VALUE, index as i32]].concat(),
                format!("{name}.{}", value.name()),
            ));
        }
    }

    let mut out = Vec::new();
    for (index, descriptor) in file.message_type.iter().enumerate() {
        message(vec![MESSAGE, index as i32], descriptor, "", &mut out);
    }
    for (index, descriptor) in file.enum_type.iter().enumerate() {
        enumeration(vec![ENUM, index as i32], descriptor, "", &mut out);
    }
    for (index, service) in file.service.iter().enumerate() {
        let path = vec![SERVICE, index as i32];
        out.push((path.clone(), service.name().to_owned()));
        for (method_index, method) in service.method.iter().enumerate() {
            out.push((
                [path.as_slice(), &[SERVICE_METHOD, method_index as i32]].concat(),
                format!("{}.{}", service.name(), method.name()),
            ));
        }
    }
    out
}

#[test]
fn every_message_field_enum_value_service_and_rpc_has_a_comment() {
    let set = descriptor_set();
    let mut undocumented = Vec::new();
    let mut checked = 0;
    for file in twin_files(&set) {
        let Some(source) = &file.source_code_info else {
            panic!("{} has no source info: comments were not kept", file.name());
        };
        let commented: BTreeSet<&[i32]> = source
            .location
            .iter()
            .filter(|location| location.leading_comments().trim().len() > 1)
            .map(|location| location.path.as_slice())
            .collect();
        for (path, name) in documented_elements(file) {
            checked += 1;
            if !commented.contains(path.as_slice()) {
                undocumented.push(format!("{}: {name}", file.name()));
            }
        }
    }
    assert!(checked > 200, "only {checked} elements checked: the walk is broken");
    assert!(undocumented.is_empty(), "undocumented:\n{}", undocumented.join("\n"));
}

fn round_trip<M: Message + Default + PartialEq + std::fmt::Debug>(message: &M) {
    let bytes = message.encode_to_vec();
    match M::decode(bytes.as_slice()) {
        Ok(decoded) => assert_eq!(&decoded, message),
        Err(err) => panic!("{message:?} does not decode after encoding: {err}"),
    }
}

fn stamp(sequence: u64) -> v1::BatchStamp {
    v1::BatchStamp {
        device_id: "pump-0007".to_owned(),
        sequence,
        sim_time_nanos: 12_000_000_000,
        intended_send_unix_nanos: 1_795_000_000_000_000_000,
        sent_unix_nanos: 1_795_000_000_000_150_000,
        gateway_id: "gw-1".to_owned(),
    }
}

fn telemetry_batch() -> v1::TelemetryBatch {
    v1::TelemetryBatch {
        stamp: Some(stamp(42)),
        sensors: vec![v1::SensorSeries {
            sensor: "vibration".to_owned(),
            start_unix_nanos: 1_795_000_000_000_000_000,
            offsets_nanos: vec![0, 10_000_000, 20_000_000],
            channels: vec![
                v1::ChannelValues {
                    channel: "x".to_owned(),
                    values: vec![0.1, -0.25, 1e-300],
                },
                v1::ChannelValues {
                    channel: "y".to_owned(),
                    values: vec![f64::MAX, 0.0, -0.0],
                },
            ],
        }],
    }
}

#[test]
fn twins_messages_round_trip() {
    round_trip(&v1::UpdateDesiredRequest {
        device_id: "pump-0007".to_owned(),
        patch_json: r#"{"sampling":{"rate_hz":100},"upload":null}"#.to_owned(),
        expected_version: Some(17),
    });
    round_trip(&v1::WatchResponse {
        event: Some(v1::watch_response::Event::Change(Box::new(v1::ChangeEvent {
            revision: 9_000_000_001,
            device_id: "pump-0007".to_owned(),
            version: 18,
            kind: v1::ChangeKind::Acknowledged.into(),
            acks: vec![v1::DesiredAck {
                key: "sampling".to_owned(),
                status_code: 200,
                acknowledged_version: 18,
                description: "applied".to_owned(),
            }],
            reconciliation: vec![v1::KeyReconciliation {
                key: "sampling".to_owned(),
                state: v1::ReconciliationState::Succeeded.into(),
                desired_version: 18,
                last_ack: None,
                pending_since: Some(prost_types::Timestamp {
                    seconds: 1_795_000_000,
                    nanos: 5,
                }),
                resolved_at: Some(prost_types::Timestamp {
                    seconds: 1_795_000_001,
                    nanos: 0,
                }),
            }],
            ..Default::default()
        }))),
    });
}

#[test]
fn device_sync_messages_round_trip() {
    round_trip(&v1::DeviceMessage {
        sequence: 1,
        body: Some(v1::device_message::Body::Hello(v1::Hello {
            device_id: "pump-0007".to_owned(),
            last_desired_version: 16,
            model: Some(v1::ModelRef {
                name: "vibration-anomaly".to_owned(),
                version: 2,
                sha256: "edfb1d5aa16db237b01b76e7d6c056967fe26347101379cf579260e20558f0d3".to_owned(),
            }),
            group: "compressors".to_owned(),
            firmware: "1.4.2".to_owned(),
        })),
    });
    round_trip(&v1::DeviceMessage {
        sequence: 2,
        body: Some(v1::device_message::Body::Telemetry(telemetry_batch())),
    });
    round_trip(&v1::DeviceMessage {
        sequence: 3,
        body: Some(v1::device_message::Body::Inference(v1::InferenceReport {
            model: None,
            sensor: "vibration".to_owned(),
            window_start_unix_nanos: 1,
            window_end_unix_nanos: 10_000_000_001,
            features: vec![0.5; 9],
            outputs: vec![0.93],
            sim_time_nanos: 10_000_000_000,
        })),
    });
    round_trip(&v1::ServerMessage {
        body: Some(v1::server_message::Body::Delta(v1::DesiredDelta {
            version: 18,
            delta_json: r#"{"sampling":{"rate_hz":100}}"#.to_owned(),
            reason: v1::DeltaReason::Connected.into(),
            desired_changed_unix_nanos: 1_795_000_000_000_000_000,
        })),
    });
}

#[test]
fn telemetry_messages_round_trip() {
    round_trip(&telemetry_batch());
    round_trip(&v1::IngestSummary {
        batches_accepted: 10_000,
        samples_accepted: 1_000_000,
        batches_rejected: 1,
        rejected: vec![v1::RejectedBatch {
            index: 7,
            device_id: "ghost".to_owned(),
            sequence: 1,
            code: 5,
            message: "unknown device `ghost`".to_owned(),
        }],
    });
}

#[test]
fn models_messages_round_trip() {
    round_trip(&v1::DeployModelRequest {
        model: "vibration-anomaly@champion".to_owned(),
        selector: Some(v1::TwinFilter {
            groups: vec!["compressors".to_owned()],
            tags: vec![v1::TagMatch {
                path: "/site".to_owned(),
                value_json: Some(r#""plant-a""#.to_owned()),
            }],
            model_version: Some(1),
            ..Default::default()
        }),
        dry_run: true,
    });
    round_trip(&v1::ListModelsResponse {
        models: vec![v1::Model {
            name: "vibration-anomaly".to_owned(),
            versions: vec![v1::ModelVersion {
                version: 3,
                sha256: "ab".repeat(32),
                description: "v3".to_owned(),
                inputs: vec![v1::TensorSpec {
                    name: "features".to_owned(),
                    shape: vec![-1, 9],
                    element_type: "float32".to_owned(),
                    meaning: "window features".to_owned(),
                }],
                outputs: Vec::new(),
                aliases: vec!["champion".to_owned()],
            }],
            aliases: [("champion".to_owned(), 3)].into_iter().collect(),
        }],
    });
}

#[test]
fn simulation_messages_round_trip() {
    round_trip(&v1::StartSimulationRequest {
        scenario: Some(v1::start_simulation_request::Scenario::ScenarioPath(
            "quickstart.toml".to_owned(),
        )),
        seed: Some(0),
        fork: Some(v1::Fork {
            selector: Some(v1::TwinFilter {
                device_ids: vec!["pump-0007".to_owned()],
                ..Default::default()
            }),
        }),
        label: "what if v3 everywhere".to_owned(),
    });
    round_trip(&v1::SimulationStatus {
        simulation_id: "sim-1".to_owned(),
        state: v1::SimulationState::Finished.into(),
        progress: 1.0,
        criteria_passed: Some(false),
        ..Default::default()
    });
}

#[test]
fn an_unset_optional_differs_from_zero_on_the_wire() {
    let unset = v1::UpdateDesiredRequest {
        expected_version: None,
        ..Default::default()
    };
    let zero = v1::UpdateDesiredRequest {
        expected_version: Some(0),
        ..Default::default()
    };
    assert_ne!(unset.encode_to_vec(), zero.encode_to_vec());
    round_trip(&zero);
}
