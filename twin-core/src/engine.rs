//! [`Simulation`]: builds the world from a scenario and advances it step by step.
//!
//! A step ends at the next tick, the next storyboard edge or the end of the run, whichever
//! comes first, so events take effect at their exact time whatever the tick. The driver (the
//! `twin` binary, a test, a benchmark) calls [`Simulation::step`] until it returns false,
//! pacing the calls against the wall clock itself when the scenario asks for it.

use std::sync::Arc;

use bevy_ecs::schedule::Schedule;
use bevy_ecs::world::World;
use bevy_tasks::{ComputeTaskPool, TaskPoolBuilder};

use crate::components::{
    Channels, ClockSkew, DeployedModel, Device, DeviceState, EdgeBuffer, Gateway, NONE, PendingRows, Recorder,
    ReplayCursor, ReplayCursors, ScenarioSpec, SensorSlot, Sensors, StepOutput, Topology,
};
use crate::metrics::{ComparisonMetrics, GatewayMetrics, GroupMetrics, Metrics, ModelMetrics};
use crate::replay::series_key;
use crate::report::{Deployments, Report, RunOutcome};
use crate::rng::Stream;
use crate::scenario::{Scenario, fill_filter};
use crate::schedule::step_schedule;
use crate::signal::Signal;
use crate::stats::RunStats;
use crate::systems::rollout::Rollouts;
use crate::systems::storyboard::Storyboard;
use crate::systems::uplink::UplinkState;
use crate::time::{SimClock, SimDuration};

/// Sets the number of worker threads of the sensor pass. Only the first call in a process has
/// an effect (the pool is global); without a call, the pool uses every core.
pub fn init_threads(threads: usize) {
    ComputeTaskPool::get_or_init(|| {
        TaskPoolBuilder::new()
            .num_threads(threads.max(1))
            .thread_name("twin-sample".into())
            .build()
    });
}

/// Whether a device runs its group's shadow: a seeded pick of `fraction` of the group,
/// stable whatever order devices are spawned in.
fn shadow_picked(seed: u64, device_id: &str, fraction: f64) -> bool {
    if fraction >= 1.0 {
        return true;
    }
    let hash = crate::rng::mix(seed, crate::rng::stable_key(&[device_id, "shadow"]));
    ((hash >> 11) as f64 / (1u64 << 53) as f64) < fraction
}

/// Options of a run.
#[derive(Clone, Copy, Debug, Default)]
pub struct RunOptions {
    /// Keep every reading for [`Simulation::drain_recording`].
    pub record: bool,
}

/// One recorded reading.
#[derive(Clone, Debug, PartialEq)]
pub struct RecordedSample<'a> {
    /// The device's timestamp (with its clock error), seconds from the scenario start.
    pub timestamp: f64,
    /// Device id.
    pub device: &'a str,
    /// Sensor name.
    pub sensor: &'a str,
    /// Channel values.
    pub values: &'a [f64],
}

/// A running simulation.
pub struct Simulation {
    world: World,
    schedule: Schedule,
    scenario: Arc<Scenario>,
}

impl Simulation {
    /// Builds the world: gateways, then devices group by group with their sensors.
    pub fn new(scenario: Arc<Scenario>, options: RunOptions) -> Self {
        ComputeTaskPool::get_or_init(Default::default);
        let mut world = World::new();
        let mut topology = Topology::default();
        for (index, gateway) in scenario.gateways.iter().enumerate() {
            let buffer = EdgeBuffer {
                capacity_bytes: gateway.buffer_bytes,
                ..Default::default()
            };
            topology
                .gateways
                .push(world.spawn((Gateway { index: index as u16 }, buffer)).id());
        }
        let devices = scenario.device_count() as usize;
        topology.devices.reserve_exact(devices);
        let mut summary_entry_bytes = Vec::with_capacity(scenario.groups.len());
        for (group_index, group) in scenario.groups.iter().enumerate() {
            let specs = &scenario.sensors[group.sensors.clone()];
            summary_entry_bytes.push(specs.iter().map(|s| u64::from(s.summary_entry_bytes())).sum());
            let replays = specs.iter().any(|s| matches!(s.signal, Signal::Replay(_)));
            for ordinal in 0..group.count {
                let device_id = group.device_id(ordinal);
                let device = Device {
                    index: group.first_device + ordinal,
                    group: group_index as u16,
                    gateway: group.gateway,
                };
                let state = DeviceState {
                    online: true,
                    uplink: group.upload,
                    skew: ClockSkew::default(),
                    step: StepOutput::default(),
                };
                let sensors = Sensors(
                    specs
                        .iter()
                        .enumerate()
                        .map(|(local, spec)| SensorSlot {
                            spec: (group.sensors.start + local) as u32,
                            next_index: 0,
                            level: match &spec.signal {
                                // Each camera starts at its own seeded image.
                                Signal::Camera(images) => {
                                    images.first_image(scenario.seed, &device_id, &spec.name) as f64
                                }
                                _ => spec.signal.initial_level(),
                            },
                            stream: Stream::derive(scenario.seed, &[&device_id, &spec.name, "signal"]),
                            channels: Channels::new(spec.dims),
                        })
                        .collect(),
                );
                let mut entity = world.spawn((device, state, sensors));
                if replays {
                    let cursors = specs.iter().map(|spec| {
                        let Signal::Replay(replay) = &spec.signal else {
                            return None;
                        };
                        let filled: Vec<String> = replay
                            .filter
                            .iter()
                            .map(|(_, t)| fill_filter(t, &device_id, &spec.name, &group.name))
                            .collect();
                        let series = replay
                            .table
                            .series
                            .get(&series_key(filled.iter().map(String::as_str)))
                            .cloned();
                        Some(ReplayCursor {
                            series: series.unwrap_or_default(),
                            row: 0,
                            pass: 0,
                        })
                    });
                    entity.insert(ReplayCursors(cursors.collect()));
                }
                if options.record {
                    entity.insert(Recorder(specs.iter().map(|_| Vec::new()).collect()));
                }
                if let Some(binding) = group.model {
                    let model = group.initial_model(ordinal).unwrap_or(binding.model);
                    let shadow = binding
                        .shadow
                        .filter(|s| shadow_picked(scenario.seed, &device_id, s.fraction))
                        .map_or(NONE, |s| s.model as u16);
                    let deployed = DeployedModel {
                        model: model as u16,
                        slot: binding.slot as u16,
                        threshold: binding.threshold,
                        placement: binding.placement,
                        shadow,
                        comparison: NONE,
                    };
                    entity.insert((deployed, PendingRows::default()));
                }
                topology.devices.push(entity.id());
            }
        }
        world.insert_resource(UplinkState::new(devices, summary_entry_bytes));
        world.insert_resource(topology);
        world.insert_resource(Metrics {
            groups: vec![GroupMetrics::default(); scenario.groups.len()],
            gateways: vec![GatewayMetrics::default(); scenario.gateways.len()],
            models: vec![ModelMetrics::default(); scenario.models.len()],
            comparisons: vec![ComparisonMetrics::default(); scenario.comparisons.len()],
            ..Default::default()
        });
        world.insert_resource(Storyboard::new(&scenario));
        world.insert_resource(Rollouts::default());
        world.insert_resource(SimClock {
            now: 0,
            step_end: 0,
            end: scenario.clock.duration.0,
            tick: scenario.clock.tick.0,
        });
        world.insert_resource(ScenarioSpec(scenario.clone()));
        Self {
            world,
            schedule: step_schedule(),
            scenario,
        }
    }

    /// Simulated time reached.
    pub fn now(&self) -> SimDuration {
        SimDuration(self.world.resource::<SimClock>().now)
    }

    /// Runs one step; returns false (doing nothing) once the run has ended.
    pub fn step(&mut self) -> bool {
        let now = self.world.resource::<SimClock>().now;
        let next_edge = [
            self.world.resource::<Storyboard>().next_time(),
            self.world.resource::<Rollouts>().next_time(now),
        ]
        .into_iter()
        .flatten()
        .min();
        let mut clock = self.world.resource_mut::<SimClock>();
        if clock.now >= clock.end {
            return false;
        }
        let mut step_end = (clock.now + clock.tick).min(clock.end);
        if let Some(edge) = next_edge
            && edge > clock.now
        {
            step_end = step_end.min(edge);
        }
        clock.step_end = step_end;
        self.schedule.run(&mut self.world);
        let mut clock = self.world.resource_mut::<SimClock>();
        clock.now = clock.step_end;
        true
    }

    /// Hands every reading recorded since the last call to `sink`, device by device in index
    /// order, sensor by sensor, in time order.
    pub fn drain_recording(&mut self, sink: &mut dyn FnMut(RecordedSample<'_>)) {
        let scenario = self.scenario.clone();
        let Some(topology) = self.world.remove_resource::<Topology>() else {
            return;
        };
        for group in &scenario.groups {
            for ordinal in 0..group.count {
                let entity = topology.devices[(group.first_device + ordinal) as usize];
                let Some(mut recorder) = self.world.get_mut::<Recorder>(entity) else {
                    continue;
                };
                if recorder.0.iter().all(Vec::is_empty) {
                    continue;
                }
                let rows: Vec<Vec<f64>> = recorder.0.iter_mut().map(std::mem::take).collect();
                let device_id = group.device_id(ordinal);
                for (local, rows) in rows.iter().enumerate() {
                    let spec = &scenario.sensors[group.sensors.start + local];
                    for row in rows.chunks_exact(1 + spec.dims) {
                        sink(RecordedSample {
                            timestamp: row[0],
                            device: &device_id,
                            sensor: &spec.name,
                            values: &row[1..],
                        });
                    }
                }
            }
        }
        self.world.insert_resource(topology);
    }

    /// Closes open windows and builds the report. Criteria are evaluated here.
    pub fn finish(mut self) -> Report {
        let scenario = self.scenario.clone();
        let topology = self.world.remove_resource::<Topology>().unwrap_or_default();
        // Per (sensor spec, channel) totals, merged in device index order.
        let mut totals: Vec<Vec<RunStats>> = scenario
            .sensors
            .iter()
            .map(|s| vec![RunStats::default(); s.dims])
            .collect();
        for &entity in &topology.devices {
            let Some(mut sensors) = self.world.get_mut::<Sensors>(entity) else {
                continue;
            };
            for slot in &mut sensors.0 {
                let spec = slot.spec as usize;
                let shift = scenario.sensors[spec].shift;
                for (channel, stats) in slot.channels.as_mut_slice().iter_mut().enumerate() {
                    stats.total.merge_window(&stats.window, shift);
                    stats.window.reset();
                    totals[spec][channel].merge(&stats.total);
                }
            }
        }
        let buffers: Vec<EdgeBuffer> = topology
            .gateways
            .iter()
            .map(|&e| self.world.get::<EdgeBuffer>(e).copied().unwrap_or_default())
            .collect();
        let mut deployments = Deployments::new(&scenario);
        for &entity in &topology.devices {
            let Some(deployed) = self.world.get::<DeployedModel>(entity) else {
                continue;
            };
            let group = self.world.get::<Device>(entity).map_or(0, |d| usize::from(d.group));
            deployments.count(&scenario, group, deployed.model.into(), deployed.placement);
        }
        let rollouts = self.world.remove_resource::<Rollouts>().unwrap_or_default();
        let metrics = self.world.resource::<Metrics>();
        let simulated = SimDuration(self.world.resource::<SimClock>().now);
        let run = RunOutcome {
            sensor_totals: &totals,
            buffers: &buffers,
            deployments: &deployments,
            rollouts: &rollouts.runs,
        };
        Report::build(&scenario, simulated, metrics, &run)
    }
}
