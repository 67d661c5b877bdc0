//! Compiles `twin/v1/*.proto` with protox (a protobuf compiler in Rust: no `protoc` is run or
//! needed), generates the prost messages and tonic clients and servers from the descriptor
//! set, and writes the encoded descriptor set that the crate exports for gRPC reflection.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// Directory of the `.proto` files, relative to the crate root; also the import root, so
/// files import each other as `twin/v1/common.proto`.
const PROTO_ROOT: &str = ".";
const PROTO_DIR: &str = "twin/v1";
/// Name of the encoded `FileDescriptorSet` in `OUT_DIR`, included by `src/lib.rs`.
const DESCRIPTOR_FILE: &str = "twin_v1_descriptor.bin";

fn main() -> ExitCode {
    match build() {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("error: twin-proto build: {message}");
            ExitCode::FAILURE
        }
    }
}

fn build() -> Result<(), String> {
    let out_dir = std::env::var_os("OUT_DIR").ok_or("OUT_DIR is not set (run through cargo)")?;
    let out_dir = PathBuf::from(out_dir);

    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed={PROTO_DIR}");
    let proto_files = proto_files(Path::new(PROTO_DIR))?;
    for file in &proto_files {
        println!("cargo:rerun-if-changed={}", file.display());
    }

    let mut compiler = protox::Compiler::new([PROTO_ROOT]).map_err(|err| format!("{PROTO_ROOT}: {err}"))?;
    // Source info carries the comments into the generated docs and into reflection; imports
    // (google/protobuf/timestamp.proto) make the descriptor set self-contained for reflection
    // clients.
    compiler.include_source_info(true).include_imports(true);
    compiler.open_files(&proto_files).map_err(|err| format!("{err:?}"))?;

    let descriptor_path = out_dir.join(DESCRIPTOR_FILE);
    fs::write(&descriptor_path, compiler.encode_file_descriptor_set())
        .map_err(|err| format!("{}: {err}", descriptor_path.display()))?;

    // `compile_fds` generates from the descriptor set in memory; prost-build runs protoc only
    // in `compile_protos`, which is not used.
    tonic_prost_build::configure()
        .out_dir(&out_dir)
        .build_client(true)
        .build_server(true)
        // A ChangeEvent (with its optional Twin) is much larger than the other Watch events.
        .boxed(".twin.v1.WatchResponse.event.change")
        .compile_fds(compiler.file_descriptor_set())
        .map_err(|err| format!("code generation: {err}"))?;
    Ok(())
}

/// The `.proto` files of `dir`, sorted so the output does not depend on directory order.
fn proto_files(dir: &Path) -> Result<Vec<PathBuf>, String> {
    let entries = fs::read_dir(dir).map_err(|err| format!("{}: {err}", dir.display()))?;
    let mut files = Vec::new();
    for entry in entries {
        let path = entry.map_err(|err| format!("{}: {err}", dir.display()))?.path();
        if path.extension().is_some_and(|extension| extension == "proto") {
            files.push(path);
        }
    }
    if files.is_empty() {
        return Err(format!("{}: no .proto files", dir.display()));
    }
    files.sort();
    Ok(files)
}
