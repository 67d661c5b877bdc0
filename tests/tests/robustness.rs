//! No input makes loading panic: every shipped and invalid scenario, cut and corrupted in
//! thousands of seeded ways, is either accepted or refused with located problems. Replay files
//! likewise. The mutation seed is printed on failure.

mod common;

use std::panic::{AssertUnwindSafe, catch_unwind};

use common::{MemoryFiles, workspace};
use twin_core::{LoadOptions, Scenario};

/// A tiny deterministic generator for mutation positions (SplitMix64).
struct Mutations(u64);

impl Mutations {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

const FRAGMENTS: [&str; 14] = [
    "=",
    "[",
    "]]",
    "\"",
    "nan",
    "-1",
    "1e400",
    "{}",
    "[[fleet]]",
    "\n",
    "count = 0",
    "0x",
    "\u{7f}",
    "for = \"-1s\"",
];

fn mutate(text: &str, rng: &mut Mutations) -> String {
    let mut bytes = text.as_bytes().to_vec();
    match rng.below(4) {
        0 => bytes.truncate(rng.below(bytes.len() + 1)),
        1 => {
            let at = rng.below(bytes.len() + 1);
            let fragment = FRAGMENTS[rng.below(FRAGMENTS.len())];
            bytes.splice(at..at, fragment.bytes());
        }
        2 => {
            let lines: Vec<&str> = text.lines().collect();
            let skip = rng.below(lines.len());
            bytes = lines
                .iter()
                .enumerate()
                .filter(|(i, _)| *i != skip)
                .map(|(_, l)| *l)
                .collect::<Vec<_>>()
                .join("\n")
                .into_bytes();
        }
        _ => {
            let at = rng.below(bytes.len());
            if let Some(byte) = bytes.get_mut(at) {
                *byte = byte.wrapping_add(1 + rng.below(20) as u8);
            }
        }
    }
    String::from_utf8_lossy(&bytes).into_owned()
}

#[test]
fn mutated_scenarios_never_panic() {
    let mut sources = Vec::new();
    for dir in ["scenarios", "tests/invalid"] {
        for entry in std::fs::read_dir(workspace().join(dir)).expect("dir") {
            let path = entry.expect("entry").path();
            if path.extension().is_some_and(|e| e == "toml") {
                sources.push(std::fs::read_to_string(&path).expect("readable"));
            }
        }
    }
    let files = MemoryFiles(
        [
            (
                "data/compressors.jsonl".to_owned(),
                std::fs::read_to_string(workspace().join("scenarios/data/compressors.jsonl")).expect("recording"),
            ),
            ("data/malformed.csv".to_owned(), "timestamp,value\n0,1\n".to_owned()),
        ]
        .into(),
    );
    let seed = 0x5eed_u64;
    let mut rng = Mutations(seed);
    let mut refused = 0;
    let options = LoadOptions {
        max_memory_bytes: 256 << 20,
        seed: None,
    };
    for round in 0..3000 {
        let source = &sources[round % sources.len()];
        let mutated = mutate(source, &mut rng);
        let outcome = catch_unwind(AssertUnwindSafe(|| {
            Scenario::from_toml("mutated.toml", &mutated, &files, options)
        }));
        match outcome {
            Err(_) => panic!("loading panicked (seed {seed:#x}, round {round}) on:\n{mutated}"),
            Ok(Err(err)) => {
                refused += 1;
                assert!(!err.problems.is_empty());
                for problem in &err.problems {
                    assert!(
                        problem.line >= 1 && problem.column >= 1 && !problem.message.is_empty(),
                        "{err}"
                    );
                }
            }
            Ok(Ok(_)) => {}
        }
    }
    assert!(
        refused > 1000,
        "only {refused} of 3000 mutations were refused: the mutations are too gentle"
    );
}

#[test]
fn mutated_replay_files_never_panic() {
    let recording = std::fs::read_to_string(workspace().join("scenarios/data/compressors.jsonl")).expect("recording");
    let recording: String = recording.lines().take(40).map(|l| format!("{l}\n")).collect();
    let csv = "timestamp,device,value\n0,a,1.5\n1,a,2.5\n2,a,3.5\n";
    let scenario = |file: &str| {
        format!(
            "[meta]\nname = \"r\"\n[clock]\nduration = \"1m\"\n[[fleet]]\nname = \"g\"\ncount = 1\nid = \"comp-00\"\n[[fleet.sensors]]\nname = \"discharge_temp\"\nreplay = {{ file = \"{file}\", filter = {{ device = \"{{id}}\" }} }}\n"
        )
    };
    let mut rng = Mutations(0xfeed);
    for round in 0..1500 {
        let (name, text) = if round % 2 == 0 {
            ("r.jsonl", recording.as_str())
        } else {
            ("r.csv", csv)
        };
        let mutated = mutate(text, &mut rng);
        let files = MemoryFiles([(name.to_owned(), mutated.clone())].into());
        let outcome = catch_unwind(AssertUnwindSafe(|| {
            Scenario::from_toml("replay.toml", &scenario(name), &files, LoadOptions::default())
                .map(|s| common::run(s, false))
        }));
        assert!(outcome.is_ok(), "replay panicked (round {round}) on:\n{mutated}");
    }
}
