//! The fuzz targets' invariants without a fuzzer: `fuzz/src/checks.rs` (the code the cargo-fuzz
//! targets run) over the checked-in corpus in `fuzz/corpus/`, over the built-in protobuf seeds,
//! and over seeded random documents. A failure names the corpus file or the seed.

use std::path::{Path, PathBuf};

#[path = "../../fuzz/src/checks.rs"]
mod checks;

fn corpus(target: &str) -> Vec<PathBuf> {
    let folder = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&folder)
        .unwrap_or_else(|error| panic!("{}: {error}", folder.display()))
        .filter_map(|entry| entry.ok().map(|entry| entry.path()))
        .filter(|path| path.is_file())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no corpus in {}", folder.display());
    files
}

/// Runs `check` on every file, reporting the file that fails.
fn run_corpus(target: &str, check: fn(&[u8])) {
    for file in corpus(target) {
        let bytes = std::fs::read(&file).unwrap_or_else(|error| panic!("{}: {error}", file.display()));
        if let Err(panic) = std::panic::catch_unwind(|| check(&bytes)) {
            let message = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|text| (*text).to_owned()))
                .unwrap_or_default();
            let name = file.file_name().unwrap_or_default().to_string_lossy();
            panic!("fuzz/corpus/{target}/{name}: {message}");
        }
    }
}

#[test]
fn the_document_corpus_keeps_every_invariant() {
    run_corpus("document", checks::document_ops);
}

#[test]
fn the_convert_corpus_keeps_every_invariant() {
    run_corpus("convert", checks::convert_ops);
    for (name, seed) in checks::convert_seeds() {
        if let Err(panic) = std::panic::catch_unwind(|| checks::convert_ops(&seed)) {
            let message = panic.downcast_ref::<String>().cloned().unwrap_or_default();
            panic!("convert seed {name}: {message}");
        }
    }
}

#[test]
fn seeded_random_documents_keep_every_invariant() {
    // TWIN_FUZZ_SEED=<n> reproduces or varies a run; the seed is printed either way.
    let first: u64 = std::env::var("TWIN_FUZZ_SEED")
        .ok()
        .and_then(|text| text.parse().ok())
        .unwrap_or(20_261_127);
    println!("seeds {first}..{}", first + 400);
    for seed in first..first + 400 {
        let input = checks::random_document_input(seed);
        if let Err(panic) = std::panic::catch_unwind(|| checks::document_ops(input.as_bytes())) {
            let message = panic.downcast_ref::<String>().cloned().unwrap_or_default();
            panic!("seed {seed} (TWIN_FUZZ_SEED={seed}):\n{input}\n{message}");
        }
    }
}

#[test]
fn timestamps_round_trip_or_are_refused() {
    for (seconds, nanos) in [
        (0, 0),
        (-1, 0),
        (1, -1),
        (1, 999_999_999),
        (1, 1_000_000_000),
        (i64::MAX, 0),
        (i64::MIN, i32::MIN),
        (18_446_744_073, 709_551_615),
        (18_446_744_073, 709_551_616),
    ] {
        checks::check_timestamp(seconds, nanos);
    }
}

/// Writes the protobuf seeds into fuzz/corpus/convert/ (run when the seeds change:
/// `cargo test -p twin-server --test fuzz_invariants -- --ignored`).
#[test]
#[ignore = "writes the checked-in corpus"]
fn write_the_convert_seeds() {
    let folder = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/convert");
    std::fs::create_dir_all(&folder).expect("corpus folder");
    for (name, seed) in checks::convert_seeds() {
        std::fs::write(folder.join(format!("seed-{name}.bin")), seed).expect("write a seed");
    }
}
