//! `telemetry-bench`: telemetry samples per second into the `Telemetry` service over loopback,
//! batched on one client stream against one-sample unary calls, medians of a few runs.
//!
//! ```text
//! cargo build --release -p twin-benches --bin telemetry-bench
//! target/release/telemetry-bench --samples 10000000 --batch-samples 1000 --unary-samples 50000
//! ```
//!
//! The server runs in-process (the real `twin serve` code, with a fresh database in a temp
//! folder) on 127.0.0.1:0; the client shares the machine and the process's tokio runtime. The
//! batched run sends `--samples` samples as `Ingest` batches of `--batch-samples` samples each
//! (one sensor, `--channels` channels), built as they are sent; the unary run sends
//! `--unary-samples` `IngestBatch` calls of one sample each, from `--unary-in-flight` concurrent
//! callers on one connection. Each run checks that the server accepted every sample. Accepted
//! batches are stored durably before each call answers (the server's default
//! `store.telemetry_retention_s`); `--telemetry-retention-s 0` measures checking and counting
//! without storing, for comparison.

use std::time::Instant;

use anyhow::{Context, Result, anyhow, bail};
use clap::Parser;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tonic::transport::Channel;
use twin_proto::v1 as pb;
use twin_proto::v1::telemetry_client::TelemetryClient;
use twin_proto::v1::twins_client::TwinsClient;
use twin_server::serve::{ServeConfig, serve};

/// Telemetry ingest over loopback: batched client stream vs one-sample unary calls.
#[derive(Parser, Debug)]
struct Args {
    /// Samples per batched run.
    #[arg(long, default_value_t = 10_000_000)]
    samples: u64,
    /// Samples per batch (timestamps times channels).
    #[arg(long, default_value_t = 1000)]
    batch_samples: u64,
    /// Channels per batch (for example 3 for x, y, z); must divide `--batch-samples`.
    #[arg(long, default_value_t = 1)]
    channels: u64,
    /// Samples (one per call) per unary run.
    #[arg(long, default_value_t = 50_000)]
    unary_samples: u64,
    /// Concurrent unary callers on the one connection.
    #[arg(long, default_value_t = 16)]
    unary_in_flight: u64,
    /// Devices the batches are spread over (twins created before the runs).
    #[arg(long, default_value_t = 16)]
    devices: u64,
    /// Runs of each mode; the median is reported.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Tokio worker threads (server and client share them).
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// The server's `store.telemetry_retention_s`: 0 stores nothing (checks and counts only).
    #[arg(long, default_value_t = 86_400)]
    telemetry_retention_s: u64,
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(f64::NAN)
}

fn device_id(index: u64) -> String {
    format!("bench-dev-{index}")
}

/// A batch of one sensor: `rows` timestamps, `channels` channels.
fn batch(device_id: String, sequence: u64, rows: u64, channels: u64) -> pb::TelemetryBatch {
    let mut offsets_nanos = Vec::with_capacity(usize::try_from(rows).unwrap_or(0));
    let mut values = Vec::with_capacity(offsets_nanos.capacity());
    for row in 0..rows {
        offsets_nanos.push(row * 1_000_000);
        values.push((row as f64 * 0.01).sin());
    }
    pb::TelemetryBatch {
        stamp: Some(pb::BatchStamp {
            device_id,
            sequence,
            ..pb::BatchStamp::default()
        }),
        sensors: vec![pb::SensorSeries {
            sensor: "vibration".to_owned(),
            start_unix_nanos: 1_700_000_000_000_000_000,
            offsets_nanos,
            channels: (0..channels)
                .map(|channel| pb::ChannelValues {
                    channel: format!("c{channel}"),
                    values: values.clone(),
                })
                .collect(),
        }],
    }
}

/// One batched run: samples per second.
async fn batched_run(client: &mut TelemetryClient<Channel>, args: &Args) -> Result<f64> {
    let rows = args.batch_samples / args.channels;
    let batches = args.samples / args.batch_samples;
    let (devices, channels) = (args.devices, args.channels);
    let stream = tokio_stream::iter(
        (0..batches).map(move |index| batch(device_id(index % devices), index / devices + 1, rows, channels)),
    );
    let started = Instant::now();
    let summary = client.ingest(stream).await.context("ingest")?.into_inner();
    let seconds = started.elapsed().as_secs_f64();
    let expected = batches * rows * channels;
    if summary.samples_accepted != expected || summary.batches_rejected != 0 {
        bail!(
            "the server accepted {} of {expected} samples ({} batches rejected)",
            summary.samples_accepted,
            summary.batches_rejected
        );
    }
    Ok(expected as f64 / seconds)
}

/// One unary run: samples (= calls) per second.
async fn unary_run(client: &TelemetryClient<Channel>, args: &Args) -> Result<f64> {
    let callers = args.unary_in_flight.max(1);
    let per_caller = args.unary_samples / callers;
    let devices = args.devices;
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for caller in 0..callers {
        let mut client = client.clone();
        tasks.spawn(async move {
            let mut accepted = 0u64;
            for call in 0..per_caller {
                let index = caller * per_caller + call;
                let one = batch(device_id(index % devices), index / devices + 1, 1, 1);
                accepted += client.ingest_batch(one).await?.into_inner().samples_accepted;
            }
            Ok::<u64, tonic::Status>(accepted)
        });
    }
    let mut accepted = 0u64;
    while let Some(joined) = tasks.join_next().await {
        accepted += joined.context("unary caller")?.context("ingest_batch")?;
    }
    let seconds = started.elapsed().as_secs_f64();
    let expected = callers * per_caller;
    if accepted != expected {
        bail!("the server accepted {accepted} of {expected} unary samples");
    }
    Ok(expected as f64 / seconds)
}

async fn bench(args: Args) -> Result<()> {
    if args.channels == 0 || !args.batch_samples.is_multiple_of(args.channels) || args.batch_samples == 0 {
        bail!(
            "--batch-samples {} must be a positive multiple of --channels {}",
            args.batch_samples,
            args.channels
        );
    }
    let data = tempfile::tempdir().context("temp folder")?;
    let listener = TcpListener::bind("127.0.0.1:0").await.context("bind 127.0.0.1:0")?;
    let address = listener.local_addr().context("local address")?;
    let mut config = ServeConfig {
        listen: address,
        data_dir: data.path().to_owned(),
        ..ServeConfig::default()
    };
    config.store.telemetry_retention_s = args.telemetry_retention_s;
    let (stop, stopped) = oneshot::channel::<()>();
    let server = tokio::spawn(serve(listener, config, async {
        let _stopped = stopped.await;
    }));

    let channel = tonic::transport::Endpoint::from_shared(format!("http://{address}"))
        .context("endpoint")?
        .tcp_nodelay(true)
        .connect()
        .await
        .context("connect")?;
    let mut twins = TwinsClient::new(channel.clone());
    for index in 0..args.devices {
        twins
            .create_twin(pb::CreateTwinRequest {
                device_id: device_id(index),
                ..pb::CreateTwinRequest::default()
            })
            .await
            .context("create twin")?;
    }
    let mut client = TelemetryClient::new(channel);
    let (mut batched, mut unary) = (Vec::new(), Vec::new());
    for round in 0..args.runs {
        let batched_rate = batched_run(&mut client, &args).await?;
        let unary_rate = unary_run(&client, &args).await?;
        eprintln!("round {round}: batched {batched_rate:.0} samples/s, unary {unary_rate:.0} samples/s");
        batched.push(batched_rate);
        unary.push(unary_rate);
    }
    let (batched, unary) = (median(batched), median(unary));
    println!(
        "batches of {} samples ({} channels), {} samples, {} | batched {:.0} samples/s | unary ({} in flight) {:.0} samples/s | ratio {:.1}x (medians of {} runs)",
        args.batch_samples,
        args.channels,
        args.samples,
        if args.telemetry_retention_s == 0 {
            "not stored"
        } else {
            "stored durably"
        },
        batched,
        args.unary_in_flight,
        unary,
        batched / unary,
        args.runs
    );
    drop(client);
    drop(twins);
    let _sent = stop.send(());
    server
        .await
        .map_err(|error| anyhow!("server task: {error}"))?
        .context("server")?;
    Ok(())
}

fn main() -> Result<()> {
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads.max(1))
        .enable_all()
        .build()
        .context("tokio runtime")?;
    runtime.block_on(bench(args))
}
