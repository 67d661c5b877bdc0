//! The one place that decides the order of a simulation step.

use bevy_ecs::schedule::{IntoScheduleConfigs, Schedule, SingleThreadedExecutor, SystemSet};

use crate::systems::{infer, rollout, sample, storyboard, uplink};

/// The phases of a step, in order.
#[derive(SystemSet, Debug, Clone, PartialEq, Eq, Hash)]
pub enum StepSet {
    /// Storyboard events due now start or end.
    Storyboard,
    /// Sensors produce their readings (parallel across sensors).
    Sample,
    /// Models score the windows devices completed; rollouts advance on what they decided.
    Infer,
    /// Traffic leaves the edge: to the cloud, a gateway buffer, or lost.
    Uplink,
    /// Cloud-side staleness is measured.
    Observe,
}

/// Builds the step schedule. The schedule itself runs on one thread (the world's owner);
/// only [`sample::sample_sensors`] fans out, over disjoint devices.
pub fn step_schedule() -> Schedule {
    let mut schedule = Schedule::default();
    schedule.set_executor(SingleThreadedExecutor::new());
    schedule.configure_sets(
        (
            StepSet::Storyboard,
            StepSet::Sample,
            StepSet::Infer,
            StepSet::Uplink,
            StepSet::Observe,
        )
            .chain(),
    );
    schedule.add_systems((
        storyboard::apply_due_events.in_set(StepSet::Storyboard),
        sample::sample_sensors.in_set(StepSet::Sample),
        infer::run_inference.in_set(StepSet::Infer),
        rollout::advance_rollouts
            .in_set(StepSet::Infer)
            .after(infer::run_inference),
        uplink::forward_uplink.in_set(StepSet::Uplink),
        uplink::measure_staleness.in_set(StepSet::Observe),
    ));
    schedule
}
