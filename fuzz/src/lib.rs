//! The invariants the fuzz targets check, as a library so that each target is one line; see
//! [`checks`] (also compiled into `twin-server/tests/fuzz_invariants.rs`).

pub mod checks;
