//! `apply_due_events`: starts and ends storyboard events exactly at their times (the engine cuts
//! steps at every event boundary, so an event never lands inside a step).

use bevy_ecs::resource::Resource;
use bevy_ecs::world::World;

use crate::components::{ClockSkew, EdgeBuffer, Power, ScenarioSpec, SensorFaults, SensorStats, Topology, Uplink};
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
            if let Some(until) = event.until {
                if until < scenario.clock.duration {
                    edges.push((until.0, Edge::End, position));
                }
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
        let affected = match edge {
            Edge::Start => start(world, &scenario, event, now),
            Edge::End => {
                end(world, &scenario, event);
                continue;
            }
        };
        let mut metrics = world.resource_mut::<Metrics>();
        *metrics.fault_activations.entry(event.action.kind()).or_default() += affected;
        metrics.events.push(EventLog {
            index: event.index,
            affected,
        });
    }
}

fn devices_of(event: &EventSpec) -> &[u32] {
    match &event.target {
        Target::Devices(devices) => devices,
        Target::Gateway(_) => &[],
    }
}

fn start(world: &mut World, scenario: &Scenario, event: &EventSpec, now: u64) -> u64 {
    let now_s = secs(now);
    let topology = world.resource::<Topology>().clone();
    let mut affected = 0;
    match &event.action {
        Action::SensorFault { sensor, fault } => {
            for &device in devices_of(event) {
                let group_index = scenario.group_of(device);
                let group = &scenario.groups[group_index];
                let device_id = group.device_id(device - group.first_device);
                for (local, &entity) in topology.sensors_of(device).iter().enumerate() {
                    let spec = &scenario.sensors[group.sensors.start + local];
                    if sensor.as_ref().is_some_and(|name| name != &spec.name) {
                        continue;
                    }
                    let mut stuck = [spec.shift; MAX_DIMS];
                    if let SensorFault::Stuck { value } = fault {
                        let stats = world.get::<SensorStats>(entity);
                        for (channel, slot) in stuck.iter_mut().enumerate() {
                            let last = stats.and_then(|s| s.channels.get(channel)).map_or(f64::NAN, |c| c.last);
                            *slot = value.unwrap_or(if last.is_finite() { last } else { spec.shift });
                        }
                    }
                    let stream = Stream::derive(
                        scenario.seed,
                        &[&device_id, &spec.name, "fault", &event.index.to_string()],
                    );
                    let active = ActiveFault {
                        event: event.index,
                        fault: fault.clone(),
                        since: now_s,
                        stuck,
                        stream,
                    };
                    let mut entity_mut = world.entity_mut(entity);
                    match entity_mut.get_mut::<SensorFaults>() {
                        Some(mut faults) => faults.0.push(active),
                        None => {
                            entity_mut.insert(SensorFaults(vec![active]));
                        }
                    }
                    affected += 1;
                }
                world.resource_mut::<Metrics>().groups[group_index].fault_activations += 1;
            }
        }
        Action::Crash => {
            for &device in devices_of(event) {
                if let Some(mut power) = world.get_mut::<Power>(topology.devices[device as usize]) {
                    power.online = false;
                }
                world.resource_mut::<Metrics>().groups[scenario.group_of(device)].fault_activations += 1;
                affected += 1;
            }
        }
        Action::ClockSkew { offset_s, ppm } => {
            for &device in devices_of(event) {
                if let Some(mut skew) = world.get_mut::<ClockSkew>(topology.devices[device as usize]) {
                    *skew = ClockSkew {
                        offset_s: *offset_s,
                        ppm: *ppm,
                        since_s: now_s,
                    };
                }
                world.resource_mut::<Metrics>().groups[scenario.group_of(device)].fault_activations += 1;
                affected += 1;
            }
        }
        Action::Partition => {
            if let Target::Gateway(g) = event.target {
                if let Some(mut buffer) = world.get_mut::<EdgeBuffer>(topology.gateways[usize::from(g)]) {
                    buffer.partitioned = true;
                }
                world.resource_mut::<Metrics>().gateways[usize::from(g)].partitions += 1;
                affected = 1;
            }
        }
        Action::Upload(spec) => {
            for &device in devices_of(event) {
                if let Some(mut uplink) = world.get_mut::<Uplink>(topology.devices[device as usize]) {
                    uplink.0 = *spec;
                }
                affected += 1;
            }
        }
    }
    affected
}

fn end(world: &mut World, scenario: &Scenario, event: &EventSpec) {
    let topology = world.resource::<Topology>().clone();
    match &event.action {
        Action::SensorFault { .. } => {
            for &device in devices_of(event) {
                for &entity in topology.sensors_of(device) {
                    let mut entity_mut = world.entity_mut(entity);
                    let now_empty = match entity_mut.get_mut::<SensorFaults>() {
                        Some(mut faults) => {
                            faults.0.retain(|f| f.event != event.index);
                            faults.0.is_empty()
                        }
                        None => false,
                    };
                    if now_empty {
                        entity_mut.remove::<SensorFaults>();
                    }
                }
            }
        }
        Action::Crash => {
            for &device in devices_of(event) {
                if let Some(mut power) = world.get_mut::<Power>(topology.devices[device as usize]) {
                    power.online = true;
                }
            }
        }
        Action::ClockSkew { .. } => {
            for &device in devices_of(event) {
                if let Some(mut skew) = world.get_mut::<ClockSkew>(topology.devices[device as usize]) {
                    *skew = ClockSkew::default();
                }
            }
        }
        Action::Partition => {
            if let Target::Gateway(g) = event.target {
                heal(world, scenario, &topology, g);
            }
        }
        Action::Upload(_) => {
            for &device in devices_of(event) {
                let group = &scenario.groups[scenario.group_of(device)];
                if let Some(mut uplink) = world.get_mut::<Uplink>(topology.devices[device as usize]) {
                    uplink.0 = group.upload;
                }
            }
        }
    }
}

/// Ends a partition: the backlog is delivered, and the cloud catches up with what it held.
fn heal(world: &mut World, scenario: &Scenario, topology: &Topology, gateway: u16) {
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
