//! Twin document rules: lines of JSON patches, deletes, acknowledgements and converge steps
//! applied to one twin, every invariant checked after each (see `checks::document_ops`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| twin_fuzz::checks::document_ops(data));
