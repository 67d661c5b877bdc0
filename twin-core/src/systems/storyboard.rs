//! `apply_due_events`: starts and ends storyboard events exactly at their times (the engine cuts
//! steps at every event boundary, so an event never lands inside a step).

use bevy_ecs::resource::Resource;
use bevy_ecs::world::World;
use smallvec::SmallVec;

use crate::components::{ClockSkew, DeviceState, EdgeBuffer, ScenarioSpec, SensorFaults, Sensors, Topology};
use crate::fault::{ActiveFault, SensorFault};
use crate::metrics::{EventLog, Metrics};
use crate::rng::Stream;
use crate::scenario::{Action, EventSpec, Scenario, Target};
use crate::signal::MAX_DIMS;
use crate::systems::uplink::UplinkState;
use crate::time::{SimClock, secs};

/// One edge of an event: its start or its end.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Edge {
    /// The effect ends (ordered first, so back-to-back events hand over cleanly).
    End,
    /// The effect starts.
    Start,
}

/// Event edges in time order, and how many have been applied.
#[derive(Resource, Clone, Debug, Default)]
pub struct Storyboard {
    /// `(time ns, edge, event position)`, sorted.
    pub edges: Vec<(u64, Edge, usize)>,
    /// Edges applied so far.
    pub applied: usize,
}

impl Storyboard {
    /// The storyboard of a scenario.
    pub fn new(scenario: &Scenario) -> Self {
        let mut edges = Vec::new();
        for (position, event) in scenario.events.iter().enumerate() {
            edges.push((event.at.0, Edge::Start, position));
            if let Some(until) = event.until
                && until < scenario.clock.duration
            {
                edges.push((until.0, Edge::End, position));
            }
        }
        edges.sort_unstable();
        Self { edges, applied: 0 }
    }

    /// The time of the next edge not yet applied.
    pub fn next_time(&self) -> Option<u64> {
        self.edges.get(self.applied).map(|e| e.0)
    }
}

/// Applies every event edge due at the start of the current step.
pub fn apply_due_events(world: &mut World) {
    let now = world.resource::<SimClock>().now;
    let Some(topology) = world.remove_resource::<Topology>() else {
        return;
    };
    loop {
        let due = {
            let storyboard = world.resource::<Storyboard>();
            match storyboard.edges.get(storyboard.applied) {
                Some(&(time, edge, position)) if time <= now => Some((edge, position)),
                _ => None,
            }
        };
        let Some((edge, position)) = due else { break };
        world.resource_mut::<Storyboard>().applied += 1;
        let scenario = world.resource::<ScenarioSpec>().0.clone();
        let event = &scenario.events[position];
        match edge {
            Edge::Start => {
                let affected = start(world, &topology, &scenario, event, now);
                let mut metrics = world.resource_mut::<Metrics>();
                *metrics.fault_activations.entry(event.action.kind()).or_default() += affected;
                metrics.events.push(EventLog {
                    index: event.index,
                    affected,
                });
            }
            Edge::End => end(world, &topology, &scenario, event),
        }
    }
    world.insert_resource(topology);
}

fn devices_of(event: &EventSpec) -> &[u32] {
    match &event.target {
        Target::Devices(devices) => devices,
        Target::Gateway(_) => &[],
    }
}

/// Applies `change` to the state of every targeted device; counts them per group.
fn for_each_device(
    world: &mut World,
    topology: &Topology,
    scenario: &Scenario,
    event: &EventSpec,
    mut change: impl FnMut(&mut DeviceState, &mut Metrics, usize),
) -> u64 {
    let mut metrics = world.remove_resource::<Metrics>().unwrap_or_default();
    let mut affected = 0;
    for &device in devices_of(event) {
        let group = scenario.group_of(device);
        if let Some(mut state) = world.get_mut::<DeviceState>(topology.devices[device as usize]) {
            change(&mut state, &mut metrics, group);
            affected += 1;
        }
    }
    world.insert_resource(metrics);
    affected
}

fn start(world: &mut World, topology: &Topology, scenario: &Scenario, event: &EventSpec, now: u64) -> u64 {
    let now_s = secs(now);
    match &event.action {
        Action::SensorFault { sensor, fault } => {
            start_sensor_fault(world, topology, scenario, event, sensor.as_deref(), fault, now_s)
        }
        Action::Crash => for_each_device(world, topology, scenario, event, |state, metrics, group| {
            let group_metrics = &mut metrics.groups[group];
            group_metrics.fault_activations += 1;
            if state.online {
                state.online = false;
                group_metrics.offline_devices += 1;
            }
        }),
        Action::ClockSkew { offset_s, ppm } => {
            for_each_device(world, topology, scenario, event, |state, metrics, group| {
                state.skew = ClockSkew {
                    offset_s: *offset_s,
                    ppm: *ppm,
                    since_s: now_s,
                };
                metrics.groups[group].fault_activations += 1;
            })
        }
        Action::Upload(spec) => for_each_device(world, topology, scenario, event, |state, _, _| state.uplink = *spec),
        Action::Rollout(spec) => crate::systems::rollout::start_rollout(world, topology, spec, now),
        Action::Partition => {
            let Target::Gateway(g) = event.target else { return 0 };
            if let Some(mut buffer) = world.get_mut::<EdgeBuffer>(topology.gateways[usize::from(g)]) {
                buffer.partitioned = true;
            }
            world.resource_mut::<Metrics>().gateways[usize::from(g)].partitions += 1;
            1
        }
    }
}

fn start_sensor_fault(
    world: &mut World,
    topology: &Topology,
    scenario: &Scenario,
    event: &EventSpec,
    sensor: Option<&str>,
    fault: &SensorFault,
    now_s: f64,
) -> u64 {
    let mut affected = 0;
    for &device in devices_of(event) {
        let group_index = scenario.group_of(device);
        let group = &scenario.groups[group_index];
        let device_id = group.device_id(device - group.first_device);
        let entity = topology.devices[device as usize];
        let mut new_faults: SmallVec<[(usize, ActiveFault); 2]> = SmallVec::new();
        let Some(sensors) = world.get::<Sensors>(entity) else {
            continue;
        };
        for (slot_index, slot) in sensors.0.iter().enumerate() {
            let spec = &scenario.sensors[slot.spec as usize];
            if sensor.is_some_and(|name| name != spec.name) {
                continue;
            }
            let mut stuck = [spec.shift; MAX_DIMS];
            if let SensorFault::Stuck { value } = fault {
                for (channel, held) in stuck.iter_mut().enumerate() {
                    let last = slot
                        .channels
                        .as_slice()
                        .get(channel)
                        .map_or(f64::NAN, |c| c.window.last);
                    *held = value.unwrap_or(if last.is_finite() { last } else { spec.shift });
                }
            }
            let stream = Stream::derive(
                scenario.seed,
                &[&device_id, &spec.name, "fault", &event.index.to_string()],
            );
            new_faults.push((
                slot_index,
                ActiveFault {
                    event: event.index,
                    fault: fault.clone(),
                    since: now_s,
                    stuck,
                    stream,
                },
            ));
        }
        let slots = sensors.0.len();
        affected += new_faults.len() as u64;
        let mut entity_mut = world.entity_mut(entity);
        if entity_mut.get::<SensorFaults>().is_none() {
            entity_mut.insert(SensorFaults((0..slots).map(|_| Vec::new()).collect()));
        }
        if let Some(mut faults) = entity_mut.get_mut::<SensorFaults>() {
            for (slot_index, active) in new_faults {
                faults.0[slot_index].push(active);
            }
        }
        world.resource_mut::<Metrics>().groups[group_index].fault_activations += 1;
    }
    affected
}

fn end(world: &mut World, topology: &Topology, scenario: &Scenario, event: &EventSpec) {
    match &event.action {
        Action::SensorFault { .. } => {
            for &device in devices_of(event) {
                let mut entity_mut = world.entity_mut(topology.devices[device as usize]);
                let now_empty = match entity_mut.get_mut::<SensorFaults>() {
                    Some(mut faults) => {
                        for list in &mut faults.0 {
                            list.retain(|f| f.event != event.index);
                        }
                        faults.is_empty()
                    }
                    None => false,
                };
                if now_empty {
                    entity_mut.remove::<SensorFaults>();
                }
            }
        }
        Action::Crash => {
            for_each_device(world, topology, scenario, event, |state, metrics, group| {
                if !state.online {
                    state.online = true;
                    metrics.groups[group].offline_devices -= 1;
                }
            });
        }
        Action::ClockSkew { .. } => {
            for_each_device(world, topology, scenario, event, |state, _, _| {
                state.skew = ClockSkew::default()
            });
        }
        Action::Upload(_) => {
            for_each_device(world, topology, scenario, event, |state, _, group| {
                state.uplink = scenario.groups[group].upload
            });
        }
        Action::Partition => {
            if let Target::Gateway(g) = event.target {
                heal(world, topology, scenario, g);
            }
        }
        Action::Rollout(_) => {}
    }
}

/// Ends a partition: the backlog is delivered, and the cloud catches up with what it held.
fn heal(world: &mut World, topology: &Topology, scenario: &Scenario, gateway: u16) {
    let Some(mut buffer) = world.get_mut::<EdgeBuffer>(topology.gateways[usize::from(gateway)]) else {
        return;
    };
    buffer.partitioned = false;
    let delivered = (
        std::mem::take(&mut buffer.backlog_messages),
        std::mem::take(&mut buffer.backlog_bytes),
    );
    world.resource_mut::<Metrics>().gateways[usize::from(gateway)]
        .backlog_delivered
        .add(delivered.0, delivered.1);
    let mut uplink = world.resource_mut::<UplinkState>();
    for group in scenario.groups.iter().filter(|g| g.gateway == Some(gateway)) {
        for d in group.first_device as usize..(group.first_device + group.count) as usize {
            let buffered = std::mem::replace(&mut uplink.buffered_newest[d], f64::NEG_INFINITY);
            if buffered > uplink.cloud_latest[d] {
                uplink.cloud_latest[d] = buffered;
            }
        }
    }
}
