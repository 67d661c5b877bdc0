//! `device-sim`: puts a scenario's fleet on a real backend (twin-server gRPC, MQTT, NATS
//! JetStream) and reports latency, loss and convergence. Exit codes: 0 the run completed and
//! every load criterion passed, 1 a load criterion failed, 2 the run could not start.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use device_sim::device::ModelSource;
use device_sim::message::PayloadFormat;
use device_sim::run::{RunSettings, default_topic, run};
use device_sim::shared::TransportSettings;
use device_sim::target::Target;
use device_sim::{EXIT_CRITERIA_FAILED, EXIT_INVALID, EXIT_OK, fleet};
use tokio_util::sync::CancellationToken;
use twin_core::LoadOptions;
use twin_core::load::{Arrivals, LOAD_METRICS};
use twin_core::time::{ClockMode, SimDuration};

/// A scenario's fleet on the wire: real connections to twin-server (gRPC), an MQTT broker or
/// NATS JetStream, with end-to-end latency, loss and convergence figures.
#[derive(Parser, Debug)]
#[command(name = "device-sim", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run a scenario's fleet against a target (exit 0: done and load criteria pass, 1: a load
    /// criterion fails, 2: the run could not start).
    Run(Box<RunArgs>),
    /// List the load metrics a scenario's `[load]` criteria can use.
    Metrics,
}

#[derive(Parser, Debug)]
struct RunArgs {
    /// Scenario file (TOML).
    scenario: PathBuf,
    /// grpc://host:port (twin-server), mqtt://host:port or nats://host:port.
    #[arg(long)]
    target: String,
    /// Number of virtual devices (the scenario's groups rescaled; default: the scenario's).
    #[arg(long)]
    devices: Option<u32>,
    /// Wall-clock length of the run (default: `[load] duration`, else the scenario's length).
    #[arg(long, value_parser = parse_duration)]
    duration: Option<Duration>,
    /// Messages per second over the fleet, open loop (default: the scenario's cadence).
    #[arg(long)]
    rate: Option<f64>,
    /// Cap on messages per second.
    #[arg(long)]
    max_rate: Option<f64>,
    /// Arrival process of --rate.
    #[arg(long, value_enum)]
    arrivals: Option<ArrivalsArg>,
    /// Pacing: realtime or scaled:FACTOR (default: the scenario's; virtual means realtime).
    #[arg(long, value_parser = parse_clock)]
    clock: Option<ClockMode>,
    /// Override the scenario's master seed.
    #[arg(long)]
    seed: Option<u64>,
    /// MQTT QoS: 0 or 1.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=1))]
    qos: u8,
    /// Payload encoding on MQTT and NATS.
    #[arg(long, value_enum, default_value_t = PayloadArg::Json)]
    payload: PayloadArg,
    /// Telemetry topic (MQTT) or subject (NATS) template: {id}, {group}
    /// (default: devices/{id}/telemetry, NATS devices.{id}.telemetry).
    #[arg(long)]
    topic: Option<String>,
    /// MQTT command topic template, subscribed by each device.
    #[arg(long, default_value = "devices/{id}/desired")]
    command_topic: String,
    /// MQTT client id template ({id}, {group}); the device id by default.
    #[arg(long, default_value = "{id}")]
    client_id: String,
    /// NATS: publish to this JetStream stream with acknowledgements (without it: core publish).
    #[arg(long)]
    stream: Option<String>,
    /// NATS: create the stream (subjects: the topic template with wildcards).
    #[arg(long)]
    create_stream: bool,
    /// NATS: delete the stream when the run ends.
    #[arg(long)]
    delete_stream: bool,
    /// Connections opened per second (default: `[load] connect_rate`, else all at once).
    #[arg(long)]
    connect_rate: Option<f64>,
    /// Longest wait for the target to answer.
    #[arg(long, value_parser = parse_duration, default_value = "5s")]
    connect_timeout: Duration,
    /// Longest wait after the last message for acknowledgements and the checker.
    #[arg(long, value_parser = parse_duration, default_value = "5s")]
    drain_timeout: Duration,
    /// MQTT keep-alive.
    #[arg(long, value_parser = parse_duration, default_value = "30s")]
    keep_alive: Duration,
    /// NATS JetStream: most publishes waiting for their acknowledgement per lane.
    #[arg(long, default_value_t = 1024)]
    max_in_flight: usize,
    /// MQTT: no checker subscription, so nothing is received and neither loss nor end-to-end
    /// latency is measured (for comparing the publishing side alone with a bare publisher).
    #[arg(long)]
    no_checker: bool,
    /// Write the report as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// No live progress line.
    #[arg(long)]
    no_progress: bool,
    /// Largest estimated fleet memory accepted, in MiB.
    #[arg(long, default_value_t = 8192)]
    max_memory: u64,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum ArrivalsArg {
    Constant,
    Poisson,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum PayloadArg {
    Json,
    Protobuf,
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    SimDuration::parse(text).map(|d| Duration::from_nanos(d.0))
}

fn parse_clock(text: &str) -> Result<ClockMode, String> {
    match text {
        "virtual" | "realtime" => Ok(ClockMode::Realtime),
        _ => match text.strip_prefix("scaled:").map(str::parse::<f64>) {
            Some(Ok(factor)) if factor > 0.0 && factor.is_finite() => Ok(ClockMode::Scaled { factor }),
            _ => Err(format!("`{text}` is not realtime or scaled:FACTOR (FACTOR > 0)")),
        },
    }
}

fn invalid(message: impl std::fmt::Display) -> ExitCode {
    eprintln!("error: {message}");
    ExitCode::from(EXIT_INVALID)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let args = match cli.command {
        Command::Metrics => {
            for (name, meaning) in LOAD_METRICS {
                println!("{name:<20} {meaning}");
            }
            return ExitCode::from(EXIT_OK);
        }
        Command::Run(args) => args,
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();

    let target = match Target::parse(&args.target) {
        Ok(target) => target,
        Err(err) => return invalid(err),
    };
    for (flag, value) in [
        ("--rate", args.rate),
        ("--max-rate", args.max_rate),
        ("--connect-rate", args.connect_rate),
    ] {
        if let Some(value) = value
            && !(value.is_finite() && value > 0.0)
        {
            return invalid(format!("{flag}: must be a number greater than 0, got {value}"));
        }
    }
    if args.duration.is_some_and(|d| d.is_zero()) {
        return invalid("--duration: must be longer than 0s");
    }
    let is_nats = matches!(target, Target::Nats { .. });
    if (args.stream.is_some() || args.create_stream || args.delete_stream) && !is_nats {
        return invalid(format!(
            "--stream, --create-stream and --delete-stream are for nats:// targets, not {target}"
        ));
    }
    if args.no_checker && !matches!(target, Target::Mqtt { .. }) {
        return invalid(format!("--no-checker is for mqtt:// targets, not {target}"));
    }
    if (args.create_stream || args.delete_stream) && args.stream.is_none() {
        return invalid("--create-stream and --delete-stream need --stream NAME");
    }
    let options = LoadOptions {
        max_memory_bytes: args.max_memory.saturating_mul(1 << 20),
        seed: args.seed,
    };
    let scenario = match fleet::load(&args.scenario, options, args.devices) {
        Ok(scenario) => scenario,
        Err(err) => {
            eprintln!("{err}");
            return ExitCode::from(EXIT_INVALID);
        }
    };
    let topic = args.topic.clone().unwrap_or_else(|| default_topic(&target).to_owned());
    let settings = RunSettings {
        transport: TransportSettings {
            target,
            qos: args.qos,
            payload: match args.payload {
                PayloadArg::Json => PayloadFormat::Json,
                PayloadArg::Protobuf => PayloadFormat::Protobuf,
            },
            topic,
            command_topic: args.command_topic.clone(),
            client_id: args.client_id.clone(),
            stream: args.stream.clone(),
            create_stream: args.create_stream,
            delete_stream: args.delete_stream,
            connect_rate: args.connect_rate,
            connect_timeout: args.connect_timeout,
            keep_alive: args.keep_alive,
            drain_timeout: args.drain_timeout,
            max_in_flight: args.max_in_flight,
            checker: !args.no_checker,
        },
        duration: args.duration,
        clock: args.clock,
        rate: args.rate,
        max_rate: args.max_rate,
        arrivals: args.arrivals.map(|a| match a {
            ArrivalsArg::Constant => Arrivals::Constant,
            ArrivalsArg::Poisson => Arrivals::Poisson,
        }),
        progress: !args.no_progress,
        models: ModelSource::beside(&args.scenario),
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(err) => return invalid(format!("cannot start the async runtime: {err}")),
    };
    let result = runtime.block_on(async {
        let interrupt = CancellationToken::new();
        let on_signal = interrupt.clone();
        tokio::spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                eprintln!("interrupted: stopping, draining and reporting (Ctrl-C again to quit at once)");
                on_signal.cancel();
                if tokio::signal::ctrl_c().await.is_ok() {
                    std::process::exit(130);
                }
            }
        });
        run(scenario, settings, interrupt).await
    });
    runtime.shutdown_timeout(Duration::from_secs(1));
    let report = match result {
        Ok(report) => report,
        Err(err) => return invalid(err),
    };
    print!("{}", report.summary());
    if let Some(path) = &args.json
        && let Err(err) = std::fs::write(path, report.to_json())
    {
        return invalid(format!("cannot write {}: {err}", path.display()));
    }
    if report.passed {
        ExitCode::from(EXIT_OK)
    } else {
        ExitCode::from(EXIT_CRITERIA_FAILED)
    }
}
