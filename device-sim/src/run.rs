//! One whole run: connect (checker first), start the simulation thread, the scheduler and the
//! devices, send until the end (duration, end of the scenario, or Ctrl-C), let the devices
//! flush and the checker drain (bounded by the drain timeout), then build the report.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use twin_core::Scenario;
use twin_core::load::Arrivals;
use twin_core::time::ClockMode;

use crate::checker::Ledger;
use crate::clock::Pace;
use crate::cpu::process_cpu_seconds;
use crate::device::ModelSource;
use crate::fleet::Fleet;
use crate::measure::{Counters, Latencies};
use crate::message::{Outgoing, PayloadFormat};
use crate::report::{Connections, Cost, LoadReport, MessageCounts, RunDescription};
use crate::schedule::{DeviceCommand, ScheduleSettings, Scheduler};
use crate::shared::{Shared, TransportSettings};
use crate::target::Target;
use crate::{RunError, generator, grpc, mqtt, nats, progress};

/// Everything a run is asked to do beyond the scenario.
#[derive(Clone, Debug)]
pub struct RunSettings {
    /// Transports.
    pub transport: TransportSettings,
    /// Wall-clock length (default: `[load] duration`, else the scenario's length at the pace).
    pub duration: Option<Duration>,
    /// Pacing (default: the scenario's; `virtual` runs in real time).
    pub clock: Option<ClockMode>,
    /// Overall rate (default: `[load] rate`, else the scenario's cadence).
    pub rate: Option<f64>,
    /// Cap (default: `[load] max_rate`).
    pub max_rate: Option<f64>,
    /// Arrival process (default: `[load] arrivals`, else constant).
    pub arrivals: Option<Arrivals>,
    /// Show the live progress line (on a terminal).
    pub progress: bool,
    /// Where devices find model versions they are told to run.
    pub models: ModelSource,
}

/// Default topic template for a target.
pub fn default_topic(target: &Target) -> &'static str {
    match target {
        Target::Nats { .. } => "devices.{id}.telemetry",
        _ => "devices/{id}/telemetry",
    }
}

enum Prepared {
    Grpc(grpc::Prepared),
    Mqtt(Box<mqtt::Prepared>),
    Nats(nats::Prepared),
}

/// Runs the fleet of `scenario` against the target until the end or `interrupt`.
///
/// # Errors
/// The target cannot be reached within the connect timeout, or the run cannot start.
pub async fn run(
    scenario: Scenario,
    mut settings: RunSettings,
    interrupt: CancellationToken,
) -> Result<LoadReport, RunError> {
    let load = scenario.load.clone().unwrap_or_default();
    let factor = settings.clock.unwrap_or(scenario.clock.mode).pace().unwrap_or(1.0);
    let scenario_wall = Duration::from_secs_f64(scenario.clock.duration.as_secs_f64() / factor);
    let planned = settings
        .duration
        .or(load.duration.map(|d| Duration::from_nanos(d.0)))
        .unwrap_or(scenario_wall)
        .min(scenario_wall);
    let rate = settings.rate.or(load.rate);
    let max_rate = settings.max_rate.or(load.max_rate);
    let arrivals = settings.arrivals.unwrap_or(load.arrivals);
    settings.transport.connect_rate = settings.transport.connect_rate.or(load.connect_rate);
    let criteria = load.criteria.clone();

    let transport = settings.transport.clone();
    let prepared = match &transport.target {
        Target::Grpc { .. } => Prepared::Grpc(grpc::prepare(&transport).await?),
        Target::Mqtt { .. } => Prepared::Mqtt(Box::new(mqtt::prepare(&transport).await?)),
        Target::Nats { .. } => Prepared::Nats(nats::prepare(&transport).await?),
    };
    let checker_name = match &prepared {
        Prepared::Grpc(p) => p.checker.clone(),
        Prepared::Mqtt(p) => p.checker.clone(),
        Prepared::Nats(p) => p.checker.clone(),
    };

    let fleet = Arc::new(Fleet::new(Arc::new(scenario)));
    let devices = fleet.devices.len();
    let cpu_before = process_cpu_seconds();
    let pace = Pace::starting_now(factor);
    let shared = Arc::new(Shared {
        fleet: fleet.clone(),
        pace,
        settings: transport.clone(),
        counters: Arc::new(Counters::default()),
        latencies: Latencies::default(),
        commands: Arc::new((0..devices).map(|_| DeviceCommand::default()).collect()),
        flushed: CancellationToken::new(),
        hard_stop: CancellationToken::new(),
    });
    let tracker = TaskTracker::new();
    let (outboxes, checker): (Vec<mpsc::Sender<Outgoing>>, Option<JoinHandle<Ledger>>) = match prepared {
        Prepared::Grpc(p) => grpc::start(p, &shared, &settings.models, &tracker)?,
        Prepared::Mqtt(p) => mqtt::start(*p, &shared, &settings.models, &tracker),
        Prepared::Nats(p) => {
            let (outboxes, checker) = nats::start(p, &shared, &tracker);
            (outboxes, Some(checker))
        }
    };
    tracker.close();

    let end = pace.start + planned;
    let sim_end = ((planned.as_secs_f64() * factor * 1e9) as u64).min(fleet.scenario.clock.duration.0);
    let (steps_tx, steps_rx) = mpsc::channel(4);
    let generator_stop = CancellationToken::new();
    let generator = generator::spawn(fleet.clone(), pace, sim_end, steps_tx, generator_stop.clone())
        .map_err(|err| RunError::Internal(format!("cannot start the simulation thread: {err}")))?;
    let progress_done = CancellationToken::new();
    let progress = progress::start(shared.clone(), settings.progress, progress_done.clone());
    let scheduler = Scheduler::new(
        fleet.clone(),
        pace,
        ScheduleSettings {
            rate,
            arrivals,
            max_rate,
            end,
            sim_end,
        },
        outboxes,
        shared.commands.clone(),
        shared.counters.clone(),
    );
    scheduler.run(steps_rx, interrupt.clone()).await;
    let send_seconds = pace.start.elapsed().as_secs_f64();
    generator_stop.cancel();

    // The outboxes are closed: devices send what they hold, then wait for acknowledgements.
    let drain = transport.drain_timeout;
    if tokio::time::timeout(drain, tracker.wait()).await.is_err() {
        tracing::warn!(
            seconds = drain.as_secs_f64(),
            "devices still flushing after the drain timeout; closing them"
        );
        shared.hard_stop.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(2), tracker.wait()).await;
    }
    shared.flushed.cancel();
    let mut ledger = match checker {
        Some(checker) => {
            let mut checker = checker;
            match tokio::time::timeout(drain + Duration::from_secs(1), &mut checker).await {
                Ok(result) => result.ok(),
                Err(_) => {
                    shared.hard_stop.cancel();
                    tokio::time::timeout(Duration::from_secs(2), checker)
                        .await
                        .ok()
                        .and_then(Result::ok)
                }
            }
        }
        None => None,
    };
    if let Some(ledger) = &mut ledger {
        ledger.flush(&shared);
    }
    shared.hard_stop.cancel();
    progress_done.cancel();
    if let Some(progress) = progress {
        let _ = progress.await;
    }
    let _ = tokio::task::spawn_blocking(move || generator.join()).await;
    if transport.delete_stream
        && let Err(err) = nats::delete_stream(&transport).await
    {
        tracing::warn!(error = %err, "cannot delete the stream");
    }
    let wall_seconds = pace.start.elapsed().as_secs_f64();
    let cpu_seconds = match (cpu_before, process_cpu_seconds()) {
        (Some(before), Some(after)) => Some(after - before),
        _ => None,
    };

    let counters = &shared.counters;
    let sent = Counters::get(&counters.sent);
    let received = ledger.as_ref().map(|l| l.distinct);
    let lost = received.map(|r| sent.saturating_sub(r));
    let first_connects = Counters::get(&counters.first_connects);
    let last_first = Counters::get(&counters.last_first_connect_nanos) as f64 / 1e9;
    let mut report = LoadReport {
        run: RunDescription {
            scenario: fleet.scenario.name.clone(),
            target: transport.target.to_string(),
            seed: fleet.scenario.seed,
            devices: devices as u32,
            clock_factor: factor,
            schedule: match rate {
                None => "cadence".into(),
                Some(rate) => format!("{} {rate}/s", arrivals.name()),
            },
            rate,
            max_rate,
            qos: transport.qos,
            payload: match transport.payload {
                PayloadFormat::Json => "json".into(),
                PayloadFormat::Protobuf => "protobuf".into(),
            },
            topic: transport.topic.clone(),
            stream: transport.stream.clone(),
            checker: checker_name,
            planned_seconds: planned.as_secs_f64(),
        },
        wall_seconds,
        send_seconds,
        interrupted: interrupt.is_cancelled(),
        msgs_per_s: if send_seconds > 0.0 {
            sent as f64 / send_seconds
        } else {
            0.0
        },
        messages: MessageCounts {
            sent,
            samples_sent: Counters::get(&counters.samples_sent),
            published: Counters::get(&counters.published),
            received,
            lost,
            loss: lost.map(|l| if sent == 0 { 0.0 } else { l as f64 / sent as f64 }),
            duplicates: ledger.as_ref().map(|l| l.duplicates),
            reordered: ledger.as_ref().map(|l| l.reordered),
            foreign: ledger.as_ref().map(|l| l.foreign),
            unsent: Counters::get(&counters.unsent),
            capped: Counters::get(&counters.capped),
            errors: Counters::get(&counters.errors),
            overflows: Counters::get(&counters.overflows),
            acks: Counters::get(&counters.acks),
            inferences: Counters::get(&counters.inferences),
            converged: Counters::get(&counters.converged),
            partition_buffered: Counters::get(&counters.partition_buffered),
            partition_lost: Counters::get(&counters.partition_lost),
            partition_delivered: Counters::get(&counters.partition_delivered),
            partition_remaining: Counters::get(&counters.partition_remaining),
        },
        e2e: shared.latencies.e2e.snapshot().summary(),
        ack: shared.latencies.ack.snapshot().summary(),
        connections: Connections {
            connects: Counters::get(&counters.connects),
            failures: Counters::get(&counters.connect_failures),
            reconnects: Counters::get(&counters.reconnects),
            rate_per_s: (first_connects > 1 && last_first > 0.0).then(|| first_connects as f64 / last_first),
            latency: shared.latencies.connect.snapshot().summary(),
        },
        convergence: shared.latencies.convergence.snapshot().summary(),
        cost: Cost {
            cpu_seconds,
            msgs_per_core_s: cpu_seconds.filter(|&s| s > 0.0).map(|s| sent as f64 / s),
        },
        metrics: Default::default(),
        criteria: Vec::new(),
        passed: true,
    };
    report.finish(&criteria);
    Ok(report)
}
