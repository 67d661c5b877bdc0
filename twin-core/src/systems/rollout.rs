//! Staged model rollouts: a canary, then waves, each gated on what the new version does to
//! the fleet's decisions, with an automatic rollback on abort.
//!
//! A rollout starts with its storyboard event ([`start_rollout`]): the first stage's devices
//! switch to the new version, and the version each ran before keeps running beside it as a
//! shadow, so every updated row is compared with what the device would have decided. After
//! every step, [`advance_rollouts`] looks at the updated devices' counters since the start
//! (alarm rate, agreement with the previous version, devices whose projected latency misses
//! their window): once `min_devices` updated devices have run the new version, any abort
//! condition stops the rollout and rolls every updated device back (or halts it); when a
//! stage's soak ends, the success gate decides whether the next stage deploys. A stage whose
//! soak ended before `min_devices` devices ran the new version waits.

use std::sync::Arc;

use bevy_ecs::resource::Resource;
use bevy_ecs::world::World;

use crate::components::{DeployedModel, NONE, Topology};
use crate::metrics::{ComparisonMetrics, Metrics};
use crate::scenario::{Gate, RolloutSpec};
use crate::time::SimClock;

/// Where a rollout ended up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RolloutState {
    /// Still running when the run ended.
    InProgress,
    /// Every stage passed.
    Completed,
    /// Aborted, and every updated device went back to its previous version.
    RolledBack,
    /// Aborted without rollback (`on_abort = "halt"`): updated devices keep the new version.
    Aborted,
}

impl RolloutState {
    /// The state's name in reports and criteria.
    pub fn name(self) -> &'static str {
        match self {
            Self::InProgress => "in_progress",
            Self::Completed => "completed",
            Self::RolledBack => "rolled_back",
            Self::Aborted => "aborted",
        }
    }
}

/// One entry of a rollout's timeline.
#[derive(Clone, Debug, PartialEq)]
pub struct TimelineEntry {
    /// Simulated time, ns.
    pub at: u64,
    /// Stage name.
    pub stage: String,
    /// `deployed`, `passed`, `waiting`, `aborted`, `rolled_back`, `halted`, `completed`.
    pub action: &'static str,
    /// Devices running the new version after the entry.
    pub devices: u64,
    /// Why (the measured values behind a decision).
    pub detail: String,
}

/// A device's deployment before the rollout touched it.
#[derive(Clone, Copy, Debug)]
struct Previous {
    device: u32,
    model: u16,
    shadow: u16,
    comparison: u16,
}

/// A rollout under way (or finished).
#[derive(Clone, Debug)]
pub struct RolloutRun {
    /// What it rolls out.
    pub spec: Arc<RolloutSpec>,
    /// Start time, ns.
    pub started_at: u64,
    /// Current stage.
    pub stage: usize,
    /// When the current stage deployed, ns.
    pub stage_started: u64,
    /// Where it stands.
    pub state: RolloutState,
    /// What happened, in order.
    pub timeline: Vec<TimelineEntry>,
    /// Why it was aborted, if it was.
    pub reason: Option<String>,
    previous: Vec<Previous>,
    waiting: bool,
}

impl RolloutRun {
    /// A rollout that has not deployed anything yet (the report's skeleton).
    pub fn pending(spec: Arc<RolloutSpec>, at: u64) -> Self {
        Self {
            spec,
            started_at: at,
            stage: 0,
            stage_started: at,
            state: RolloutState::InProgress,
            timeline: Vec::new(),
            reason: None,
            previous: Vec::new(),
            waiting: false,
        }
    }

    /// Devices running the new version now.
    pub fn updated(&self) -> u64 {
        match self.state {
            RolloutState::RolledBack => 0,
            _ => self.previous.len() as u64,
        }
    }
}

/// Every rollout started so far.
#[derive(Resource, Clone, Debug, Default)]
pub struct Rollouts {
    /// In start order.
    pub runs: Vec<RolloutRun>,
}

impl Rollouts {
    /// The next time a running rollout's soak ends (the engine ends a step there).
    pub fn next_time(&self, after: u64) -> Option<u64> {
        self.runs
            .iter()
            .filter(|r| r.state == RolloutState::InProgress)
            .filter_map(|r| {
                let soak = r.spec.stages.get(r.stage)?.soak.0;
                Some(r.stage_started.saturating_add(soak))
            })
            .filter(|&t| t > after)
            .min()
    }
}

/// Starts a rollout: deploys its first stage.
pub fn start_rollout(world: &mut World, topology: &Topology, spec: &Arc<RolloutSpec>, now: u64) -> u64 {
    let mut run = RolloutRun::pending(spec.clone(), now);
    deploy_stage(world, topology, &mut run, now);
    let devices = run.previous.len() as u64;
    world.get_resource_or_insert_with(Rollouts::default).runs.push(run);
    devices
}

/// Switches the current stage's devices to the new version.
fn deploy_stage(world: &mut World, topology: &Topology, run: &mut RolloutRun, now: u64) {
    let Some(stage) = run.spec.stages.get(run.stage) else {
        return;
    };
    let upto = (stage.devices as usize).min(run.spec.order.len());
    for &device in &run.spec.order[run.previous.len().min(upto)..upto] {
        let Some(mut deployed) = world.get_mut::<DeployedModel>(topology.devices[device as usize]) else {
            continue;
        };
        run.previous.push(Previous {
            device,
            model: deployed.model,
            shadow: deployed.shadow,
            comparison: deployed.comparison,
        });
        let new = run.spec.model as u16;
        deployed.shadow = if deployed.model == new { NONE } else { deployed.model };
        deployed.model = new;
        deployed.comparison = run.spec.comparison as u16;
    }
    run.stage_started = now;
    run.waiting = false;
    run.timeline.push(TimelineEntry {
        at: now,
        stage: stage.name.clone(),
        action: "deployed",
        devices: run.previous.len() as u64,
        detail: format!(
            "{} of {} targeted devices run {}",
            run.previous.len(),
            run.spec.order.len(),
            run.spec.label
        ),
    });
}

/// Puts every updated device back on the version it ran before.
fn roll_back(world: &mut World, topology: &Topology, run: &RolloutRun) {
    for previous in &run.previous {
        if let Some(mut deployed) = world.get_mut::<DeployedModel>(topology.devices[previous.device as usize]) {
            deployed.model = previous.model;
            deployed.shadow = previous.shadow;
            deployed.comparison = previous.comparison;
        }
    }
}

/// The measured values a gate looks at.
struct Observed {
    alarm_rate: Option<f64>,
    agreement: Option<f64>,
    deadline_misses: u64,
}

impl Observed {
    fn of(c: &ComparisonMetrics) -> Self {
        Self {
            alarm_rate: c.alarm_rate(),
            agreement: c.agreement(),
            deadline_misses: c.deadline_miss_devices.len() as u64,
        }
    }

    fn describe(&self) -> String {
        let show = |v: Option<f64>| v.map_or("n/a".to_owned(), |v| format!("{v:.4}"));
        format!(
            "alarm_rate {}, agreement {}, deadline misses {}",
            show(self.alarm_rate),
            show(self.agreement),
            self.deadline_misses
        )
    }

    /// The rate conditions of a gate: `(measured, limit, above, name)`.
    fn rates(&self, gate: &Gate) -> [(Option<f64>, Option<f64>, bool, &'static str); 4] {
        [
            (self.alarm_rate, gate.alarm_rate_above, true, "alarm_rate"),
            (self.alarm_rate, gate.alarm_rate_below, false, "alarm_rate"),
            (self.agreement, gate.agreement_above, true, "agreement"),
            (self.agreement, gate.agreement_below, false, "agreement"),
        ]
    }

    /// Whether the gate's deadline condition is exceeded.
    fn too_many_misses(&self, gate: &Gate) -> Option<u64> {
        gate.deadline_misses_above.filter(|&limit| self.deadline_misses > limit)
    }

    /// The abort conditions that trip (a condition on a value not yet measured does not).
    fn tripped(&self, gate: &Gate) -> Vec<String> {
        let mut out: Vec<String> = self
            .rates(gate)
            .into_iter()
            .filter_map(|(value, limit, above, name)| {
                let (v, l) = (value?, limit?);
                let trips = if above { v > l } else { v < l };
                trips.then(|| format!("{name} {v:.4} {} {l}", if above { ">" } else { "<" }))
            })
            .collect();
        if let Some(limit) = self.too_many_misses(gate) {
            out.push(format!("deadline misses {} > {limit}", self.deadline_misses));
        }
        out
    }

    /// The success conditions that do not hold (a value not yet measured does not hold).
    fn unmet(&self, gate: &Gate) -> Vec<String> {
        let mut out: Vec<String> = self
            .rates(gate)
            .into_iter()
            .filter_map(|(value, limit, above, name)| {
                let l = limit?;
                let holds = value.is_some_and(|v| if above { v > l } else { v < l });
                let shown = value.map_or("n/a".to_owned(), |v| format!("{v:.4}"));
                (!holds).then(|| format!("{name} {shown} not {} {l}", if above { ">" } else { "<" }))
            })
            .collect();
        if let Some(limit) = self.too_many_misses(gate) {
            out.push(format!("deadline misses {} not <= {limit}", self.deadline_misses));
        }
        out
    }
}

/// Evaluates every running rollout at the end of the step: abort, next stage, or wait.
pub fn advance_rollouts(world: &mut World) {
    let Some(mut rollouts) = world.remove_resource::<Rollouts>() else {
        return;
    };
    let Some(topology) = world.remove_resource::<Topology>() else {
        world.insert_resource(rollouts);
        return;
    };
    let now = world.resource::<SimClock>().step_end;
    for run in rollouts.runs.iter_mut().filter(|r| r.state == RolloutState::InProgress) {
        let Some((observed, seen)) = world
            .resource::<Metrics>()
            .comparisons
            .get(run.spec.comparison)
            .map(|c| (Observed::of(c), c.devices.len() as u64))
        else {
            continue;
        };
        let stage_name = run
            .spec
            .stages
            .get(run.stage)
            .map_or_else(String::new, |s| s.name.clone());
        if seen < u64::from(run.spec.min_devices) {
            let soak_over = run
                .spec
                .stages
                .get(run.stage)
                .is_some_and(|s| now >= run.stage_started.saturating_add(s.soak.0));
            if soak_over && !run.waiting {
                run.waiting = true;
                run.timeline.push(TimelineEntry {
                    at: now,
                    stage: stage_name,
                    action: "waiting",
                    devices: run.previous.len() as u64,
                    detail: format!(
                        "soak over, but only {seen} of min_devices = {} updated devices have run the new version",
                        run.spec.min_devices
                    ),
                });
            }
            continue;
        }
        let tripped = observed.tripped(&run.spec.abort);
        let soak_over = run
            .spec
            .stages
            .get(run.stage)
            .is_some_and(|s| now >= run.stage_started.saturating_add(s.soak.0));
        let failure = if !tripped.is_empty() {
            Some(format!("abort criteria: {}", tripped.join(", ")))
        } else if soak_over {
            let unmet = observed.unmet(&run.spec.success);
            (!unmet.is_empty()).then(|| format!("success criteria not met after the soak: {}", unmet.join(", ")))
        } else {
            None
        };
        if let Some(reason) = failure {
            let devices = run.previous.len() as u64;
            run.timeline.push(TimelineEntry {
                at: now,
                stage: stage_name.clone(),
                action: "aborted",
                devices,
                detail: format!("{reason} ({seen} devices observed; {})", observed.describe()),
            });
            if run.spec.rollback {
                roll_back(world, &topology, run);
                run.state = RolloutState::RolledBack;
                run.timeline.push(TimelineEntry {
                    at: now,
                    stage: stage_name,
                    action: "rolled_back",
                    devices: 0,
                    detail: format!("{devices} devices back on their previous version"),
                });
            } else {
                run.state = RolloutState::Aborted;
                run.timeline.push(TimelineEntry {
                    at: now,
                    stage: stage_name,
                    action: "halted",
                    devices,
                    detail: format!("{devices} devices keep {}", run.spec.label),
                });
            }
            run.reason = Some(reason);
            continue;
        }
        if !soak_over {
            continue;
        }
        run.timeline.push(TimelineEntry {
            at: now,
            stage: stage_name,
            action: "passed",
            devices: run.previous.len() as u64,
            detail: format!("{seen} devices observed; {}", observed.describe()),
        });
        run.stage += 1;
        if run.stage < run.spec.stages.len() {
            deploy_stage(world, &topology, run, now);
        } else {
            run.state = RolloutState::Completed;
            run.timeline.push(TimelineEntry {
                at: now,
                stage: "done".to_owned(),
                action: "completed",
                devices: run.previous.len() as u64,
                detail: format!("{} devices run the new version", run.previous.len()),
            });
        }
    }
    world.insert_resource(topology);
    world.insert_resource(rollouts);
}
