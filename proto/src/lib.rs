//! The twin.v1 gRPC API: messages, tonic clients and servers generated from `twin/v1/*.proto`,
//! and the encoded descriptor set for gRPC reflection.

/// Package `twin.v1`: the generated messages, and the `*_client` and `*_server` modules of the
/// services `Twins`, `DeviceSync`, `Telemetry`, `Models` and `Simulation`.
#[expect(unused_qualifications, reason = "tonic's generated code spells out full paths")]
pub mod v1 {
    include!(concat!(env!("OUT_DIR"), "/twin.v1.rs"));
}

/// The encoded `google.protobuf.FileDescriptorSet` of `twin/v1/*.proto` and their imports,
/// with source info (comments), for `tonic_reflection`'s
/// `register_encoded_file_descriptor_set`.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/twin_v1_descriptor.bin"));
