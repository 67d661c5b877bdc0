//! Protobuf requests decoded from arbitrary bytes, converted to the domain and applied as the
//! handlers and the engine do, every invariant checked after each (see `checks::convert_ops`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| twin_fuzz::checks::convert_ops(data));
