//! `run_inference`: every device running a model scores each window it completed in this step.
//!
//! Rows are gathered in device index order and every model version runs once per step on all
//! of its rows (one batched tract call per version, whatever the fleet size). Each row's score
//! is compared with the device's threshold; where the ground truth is known (a faulty group,
//! or a fault active on the model's sensor) the outcome counts towards accuracy.

use bevy_ecs::world::World;

use crate::components::{DeployedModel, PendingRows, ScenarioSpec, SensorFaults, Topology};
use crate::inference::OutputValues;
use crate::metrics::Metrics;

struct Pending {
    rows: usize,
    threshold: f32,
    truth: Option<bool>,
}

/// Runs every deployed model version on the rows its devices completed this step.
pub fn run_inference(world: &mut World) {
    let scenario = world.resource::<ScenarioSpec>().0.clone();
    if scenario.models.is_empty() {
        return;
    }
    let Some(topology) = world.remove_resource::<Topology>() else {
        return;
    };
    let mut batches: Vec<Vec<f32>> = vec![Vec::new(); scenario.models.len()];
    let mut owners: Vec<Vec<Pending>> = (0..scenario.models.len()).map(|_| Vec::new()).collect();
    for group in scenario.groups.iter().filter(|g| g.model.is_some()) {
        for device in group.first_device..group.first_device + group.count {
            let entity = topology.devices[device as usize];
            let Some(deployed) = world.get::<DeployedModel>(entity).copied() else {
                continue;
            };
            let fault_on_sensor = world
                .get::<SensorFaults>(entity)
                .is_some_and(|f| f.0.get(usize::from(deployed.slot)).is_some_and(|list| !list.is_empty()));
            let Some(mut pending) = world.get_mut::<PendingRows>(entity) else {
                continue;
            };
            if pending.0.is_empty() {
                continue;
            }
            let model = usize::from(deployed.model);
            let width = scenario.models[model].compiled.width();
            let rows = pending.0.len() / width;
            batches[model].append(&mut pending.0);
            let truth = if fault_on_sensor { Some(true) } else { group.faulty };
            owners[model].push(Pending {
                rows,
                threshold: deployed.threshold,
                truth,
            });
        }
    }
    world.insert_resource(topology);
    let mut metrics = world.resource_mut::<Metrics>();
    for (model, (batch, owners)) in batches.iter().zip(owners).enumerate() {
        if batch.is_empty() {
            continue;
        }
        let counters = &mut metrics.models[model];
        let scores = match scenario.models[model].compiled.run(batch) {
            Ok(outputs) => outputs.into_iter().find(|o| o.width == 1).map(|o| match o.values {
                OutputValues::F32(values) => values,
                OutputValues::I64(values) => values.into_iter().map(|v| v as f32).collect(),
            }),
            Err(_) => None,
        };
        // A run that failed, or a model whose per-row output does not have one value per row
        // (it reduces over the batch, say), scores nothing: every row counts as an error.
        let rows: usize = owners.iter().map(|o| o.rows).sum();
        let Some(scores) = scores.filter(|s| s.len() == rows) else {
            counters.errors += rows as u64;
            continue;
        };
        let mut row = 0;
        for owner in owners {
            for score in &scores[row..row + owner.rows] {
                let alarm = *score >= owner.threshold;
                counters.inferences += 1;
                counters.alarms += u64::from(alarm);
                counters.score_sum += f64::from(*score);
                match (owner.truth, alarm) {
                    (Some(true), true) => counters.true_positives += 1,
                    (Some(true), false) => counters.false_negatives += 1,
                    (Some(false), true) => counters.false_positives += 1,
                    (Some(false), false) => counters.true_negatives += 1,
                    (None, _) => {}
                }
            }
            row += owner.rows;
        }
    }
}
