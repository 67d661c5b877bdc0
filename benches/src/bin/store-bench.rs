//! `store-bench`: durable twin updates per second through the redb store, from K concurrent
//! writers with group commit, against the same updates committed one by one (one write
//! transaction with immediate durability each), medians of a few runs.
//!
//! ```text
//! cargo run --release -p twin-benches --bin store-bench -- --writers 8 --in-flight 64
//! cargo run --release -p twin-benches --bin store-bench -- --writers 64 --in-flight 1
//! ```
//!
//! Each writer owns its twins (its own `Twins`), merges a reported patch into one of them, and
//! waits until the store acknowledges the twin's new state as committed, like a gRPC handler
//! would (with `--in-flight N`, a writer keeps N writes submitted and waits for the oldest, like
//! a connection carrying N concurrent requests). The one-by-one run uses the same writers with
//! `max_batch = 1`: one write transaction, one fsync, per update.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::Instant;

use anyhow::{Context, Result, anyhow};
use clap::Parser;
use serde_json::{Map, json};
use twin_server::store::{PendingWrite, Store, StoreOptions, WriteBatch};
use twin_server::twins::{Limits, NewTwin, SectionPatch, Timestamp, Twins};

/// Durable twin updates: group commit vs one commit per update.
#[derive(Parser, Debug)]
struct Args {
    /// Updates per group-commit run.
    #[arg(long, default_value_t = 100_000)]
    updates: u64,
    /// Updates per one-by-one run (slower, so fewer).
    #[arg(long, default_value_t = 5_000)]
    one_by_one_updates: u64,
    /// Concurrent writer threads.
    #[arg(long, default_value_t = 8)]
    writers: u64,
    /// Writes each writer keeps in flight (submitted, not yet acknowledged); 1 is a writer that
    /// waits for each acknowledgement before its next update.
    #[arg(long, default_value_t = 64)]
    in_flight: usize,
    /// Twins per writer.
    #[arg(long, default_value_t = 16)]
    twins_per_writer: u64,
    /// Runs of each mode; the median is reported.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Folder for the database files (default: the system temp folder).
    #[arg(long)]
    dir: Option<PathBuf>,
}

struct RunResult {
    updates_per_second: f64,
    commits: u64,
    largest_commit: u64,
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(f64::NAN)
}

/// One run: a fresh database, `writers` threads each doing `updates / writers` durable updates.
fn run(args: &Args, path: &Path, updates: u64, max_batch: usize) -> Result<RunResult> {
    if path.exists() {
        std::fs::remove_file(path).with_context(|| format!("{}", path.display()))?;
    }
    let options = StoreOptions {
        max_batch,
        ..StoreOptions::default()
    };
    let (store, _restored) = Store::open(path, options, Limits::default())?;
    let per_writer = updates / args.writers;
    let mut fleets = Vec::new();
    for writer in 0..args.writers {
        let mut twins = Twins::new(Limits::default());
        let mut batch = WriteBatch::new();
        for index in 0..args.twins_per_writer {
            let new = NewTwin {
                id: format!("dev-{writer}-{index}"),
                group: Some(format!("line-{}", writer % 4)),
                tags: Map::new(),
                desired: serde_json::from_value(json!({"rate_hz": 10, "mode": "eco"}))?,
            };
            batch.put_twin(twins.create(new, Timestamp::from_unix_millis(1))?)?;
        }
        store.write_blocking(batch)?;
        fleets.push(twins);
    }
    let before = store.stats();
    let start = Instant::now();
    let handles: Vec<_> = fleets
        .into_iter()
        .enumerate()
        .map(|(writer, mut twins)| {
            let store = store.clone();
            let twins_per_writer = args.twins_per_writer;
            let in_flight = args.in_flight.max(1);
            thread::spawn(move || -> Result<()> {
                let mut pending = VecDeque::with_capacity(in_flight);
                for update in 0..per_writer {
                    let id = format!("dev-{writer}-{}", update % twins_per_writer);
                    let patch = SectionPatch::Merge(serde_json::from_value(
                        json!({"temp_c": 20.0 + (update % 100) as f64 / 10.0, "seq": update, "mode": "eco"}),
                    )?);
                    let now = Timestamp::from_unix_millis(2 + update);
                    twins.update_reported(&id, &patch, None, now, Some(now))?;
                    let twin = twins.get(&id).ok_or_else(|| anyhow!("{id} missing"))?;
                    if pending.len() == in_flight
                        && let Some(oldest) = pending.pop_front()
                    {
                        PendingWrite::wait_blocking(oldest)?;
                    }
                    pending.push_back(store.submit_blocking(WriteBatch::put(twin)?)?);
                }
                for write in pending {
                    write.wait_blocking()?;
                }
                Ok(())
            })
        })
        .collect();
    for handle in handles {
        handle.join().map_err(|_| anyhow!("a writer panicked"))??;
    }
    let seconds = start.elapsed().as_secs_f64();
    let after = store.stats();
    store.close();
    Ok(RunResult {
        updates_per_second: (per_writer * args.writers) as f64 / seconds,
        commits: after.commits - before.commits,
        largest_commit: after.largest_commit,
    })
}

fn main() -> Result<()> {
    let args = Args::parse();
    let dir = args
        .dir
        .clone()
        .unwrap_or_else(|| std::env::temp_dir().join(format!("store-bench-{}", std::process::id())));
    std::fs::create_dir_all(&dir).with_context(|| format!("{}", dir.display()))?;
    let path = dir.join("bench.redb");
    let (mut grouped, mut single) = (Vec::new(), Vec::new());
    for round in 0..args.runs {
        let group = run(&args, &path, args.updates, StoreOptions::default().max_batch)?;
        let one = run(&args, &path, args.one_by_one_updates, 1)?;
        eprintln!(
            "round {round}: group commit {:.0} updates/s ({} commits, largest {} writes), one by one {:.0} updates/s ({} commits)",
            group.updates_per_second, group.commits, group.largest_commit, one.updates_per_second, one.commits
        );
        grouped.push(group.updates_per_second);
        single.push(one.updates_per_second);
    }
    let _removed = std::fs::remove_dir_all(&dir);
    let (grouped, single) = (median(grouped), median(single));
    println!(
        "writers {} x {} in flight | group commit {:.0} updates/s | one by one {:.0} updates/s | ratio {:.1}x (medians of {} runs)",
        args.writers,
        args.in_flight,
        grouped,
        single,
        grouped / single,
        args.runs
    );
    Ok(())
}
