//! Hardware profiles: what a model would take on the devices a fleet really has.
//!
//! The twin runs every model with tract on its own host, but a Raspberry Pi, a Jetson or a
//! Cortex-M7 is not that host. A profile turns a model's counted cost ([`ModelCost`]: multiply-
//! accumulates per row, parameters, family) into a projected latency per inference. The
//! projection uses counts only, never the host's timings, so the report stays identical on
//! every machine; the host's own measurements go to `timing.json`.
//!
//! `latency_p50 = overhead + macs_per_row * ns_per_mac[family]`, and `p90 = p50 * spread`.
//! Each `ns_per_mac` is a published batch-1 latency divided by the published model's
//! multiply-accumulate count; the sources are `../shared/reference/hardware-latency.md`
//! (collected from the ncnn benchmark README, Alasdair Allan's cross-device benchmark, the
//! kentaroy47 TensorRT benchmark and MLPerf Tiny v1.1), and MAC counts are the models' own
//! papers (ResNet-50 4.1 G at 224x224, MobileNetV2 300 M, SSD-MobileNetV2 0.8 G at 300x300)
//! and the MLPerf Tiny paper (DS-CNN 2.7 M, FC autoencoder 0.264 M, ResNet-8 12.5 M). Where no
//! figure exists for a family, the profile says which family it borrows and why
//! ([`Factor::source`]). Overheads (call, transfer to an accelerator) and spreads are stated
//! assumptions, not measurements.

use serde::Serialize;

use crate::inference::{ModelCost, ModelFamily};

/// Where a factor comes from.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Factor {
    /// Nanoseconds per multiply-accumulate at batch 1.
    pub ns_per_mac: f64,
    /// The published figure it is derived from, or why it is borrowed.
    pub source: &'static str,
}

/// A device class.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Profile {
    /// Name used in scenarios (`hardware = "rpi4-cpu"`).
    pub name: &'static str,
    /// What it is.
    pub description: &'static str,
    /// Factors for dense, conv and depthwise models, in [`ModelFamily::ALL`] order.
    pub factors: [Factor; 3],
    /// Fixed cost of one inference call (runtime dispatch, transfer to the accelerator), in
    /// microseconds: an assumption.
    pub overhead_us: f64,
    /// p90 over p50 of repeated calls (scheduling, thermal, USB): an assumption.
    pub spread: f64,
    /// Memory a model may use, in bytes (parameters plus activations).
    pub memory_bytes: u64,
    /// Multiplier when the model does not fit `memory_bytes` but the device can still run it
    /// from slower memory (the Edge TPU streams weights from the host); `None` means it
    /// cannot run at all.
    pub spill_slowdown: Option<f64>,
}

const RPI4_CONV: f64 = 534.1e6 / 4.1e9;
const RPI4_DEPTHWISE: f64 = 93.5e6 / 300e6;
const JETSON_CONV: f64 = 42e6 / (4.1e9 * (256.0 * 256.0) / (224.0 * 224.0));
const CORAL_DEPTHWISE: f64 = 18.2e6 / 0.8e9;
const NCS2_DEPTHWISE: f64 = 80.4e6 / 0.8e9;
const M7_DENSE: f64 = 1.83e6 / 0.264e6;
const M7_CONV: f64 = 54.9e6 / 12.5e6;
const M7_DEPTHWISE: f64 = 16.4e6 / 2.7e6;
/// tract on this project's x86 host, vibration-anomaly v2 at batch 256 (BENCHMARKS.md,
/// `model-bench`, 2026-11-27 run 2): 0.178 us per row for 280 multiply-accumulates.
const X86_DENSE: f64 = 178.0 / 280.0;

/// Every profile, by name.
pub const PROFILES: [Profile; 6] = [
    Profile {
        name: "rpi4-cpu",
        description: "Raspberry Pi 4, Cortex-A72 1.8 GHz, one thread",
        factors: [
            Factor {
                ns_per_mac: RPI4_DEPTHWISE,
                source: "borrowed from depthwise: no published RPi4 fully-connected figure; both are memory-bound",
            },
            Factor {
                ns_per_mac: RPI4_CONV,
                source: "ncnn fp32 1 thread, ResNet-50 534.1 ms / 4.1 GMAC (ncnn benchmark README)",
            },
            Factor {
                ns_per_mac: RPI4_DEPTHWISE,
                source: "ncnn fp32 1 thread, MobileNetV2 93.5 ms / 300 MMAC (ncnn benchmark README)",
            },
        ],
        overhead_us: 20.0,
        spread: 1.3,
        memory_bytes: 512 << 20,
        spill_slowdown: None,
    },
    Profile {
        name: "jetson-nano-gpu",
        description: "Jetson Nano, TensorRT fp16 on the Maxwell GPU",
        factors: [
            Factor {
                ns_per_mac: JETSON_CONV * 3.0,
                source: "conv factor x3: families differ by about 3x (hardware-latency.md notes); no published dense figure",
            },
            Factor {
                ns_per_mac: JETSON_CONV,
                source: "TensorRT fp16, ResNet-50 at 256x256 42 ms / 5.36 GMAC (kentaroy47 TensorRT benchmark)",
            },
            Factor {
                ns_per_mac: JETSON_CONV * 3.0,
                source: "conv factor x3: depthwise layers use the GPU poorly (hardware-latency.md notes)",
            },
        ],
        overhead_us: 500.0,
        spread: 1.15,
        memory_bytes: 1 << 30,
        spill_slowdown: None,
    },
    Profile {
        name: "coral-edgetpu",
        description: "Coral USB Accelerator (Edge TPU, int8, USB3); legacy accelerator class",
        factors: [
            Factor {
                ns_per_mac: CORAL_DEPTHWISE,
                source: "borrowed from depthwise (SSD-MobileNetV2): the Edge TPU maps dense layers onto the same systolic array",
            },
            Factor {
                ns_per_mac: CORAL_DEPTHWISE,
                source: "borrowed from depthwise (SSD-MobileNetV2): the only published Edge TPU figure in the reference",
            },
            Factor {
                ns_per_mac: CORAL_DEPTHWISE,
                source: "TFLite int8, SSD-MobileNetV2 18.2 ms / 0.8 GMAC (Alasdair Allan's cross-device benchmark)",
            },
        ],
        overhead_us: 1000.0,
        spread: 1.1,
        memory_bytes: 8 << 20,
        spill_slowdown: Some(4.0),
    },
    Profile {
        name: "intel-ncs2-vpu",
        description: "Intel Neural Compute Stick 2 (Myriad X, fp16, USB3); end-of-life, legacy accelerator class",
        factors: [
            Factor {
                ns_per_mac: NCS2_DEPTHWISE,
                source: "borrowed from depthwise (SSD-MobileNetV2): the only published NCS2 figure in the reference",
            },
            Factor {
                ns_per_mac: NCS2_DEPTHWISE,
                source: "borrowed from depthwise (SSD-MobileNetV2): the only published NCS2 figure in the reference",
            },
            Factor {
                ns_per_mac: NCS2_DEPTHWISE,
                source: "OpenVINO fp16, SSD-MobileNetV2 80.4 ms / 0.8 GMAC (Alasdair Allan's cross-device benchmark)",
            },
        ],
        overhead_us: 1500.0,
        spread: 1.1,
        memory_bytes: 500 << 20,
        spill_slowdown: None,
    },
    Profile {
        name: "cortex-m7-mcu",
        description: "Cortex-M7 microcontroller (NUCLEO-H7A3ZI-Q, X-CUBE-AI)",
        factors: [
            Factor {
                ns_per_mac: M7_DENSE,
                source: "MLPerf Tiny v1.1 (Krai), anomaly detection FC autoencoder 1.83 ms / 0.264 MMAC",
            },
            Factor {
                ns_per_mac: M7_CONV,
                source: "MLPerf Tiny v1.1 (Krai), image classification ResNet-8 54.9 ms / 12.5 MMAC",
            },
            Factor {
                ns_per_mac: M7_DEPTHWISE,
                source: "MLPerf Tiny v1.1 (Krai), keyword spotting DS-CNN 16.4 ms / 2.7 MMAC",
            },
        ],
        overhead_us: 5.0,
        spread: 1.02,
        memory_bytes: 1_400_000,
        spill_slowdown: None,
    },
    Profile {
        name: "cloud-x86",
        description: "x86 server core running tract (the twin's own kind of host)",
        factors: [
            Factor {
                ns_per_mac: X86_DENSE,
                source: "tract on this project's x86 host: vibration-anomaly v2, 0.178 us per row at batch 256 (BENCHMARKS.md, model-bench)",
            },
            Factor {
                ns_per_mac: X86_DENSE,
                source: "borrowed from dense: no convolution model measured on the host yet",
            },
            Factor {
                ns_per_mac: X86_DENSE,
                source: "borrowed from dense: no convolution model measured on the host yet",
            },
        ],
        overhead_us: 3.0,
        spread: 1.2,
        memory_bytes: 16 << 30,
        spill_slowdown: None,
    },
];

/// Default hardware of devices, gateways and the cloud.
pub const DEFAULT_DEVICE: &str = "rpi4-cpu";
/// Default hardware of gateways.
pub const DEFAULT_GATEWAY: &str = "jetson-nano-gpu";
/// Hardware the cloud placement runs on.
pub const CLOUD: &str = "cloud-x86";

/// The profile named `name`.
pub fn profile(name: &str) -> Option<&'static Profile> {
    PROFILES.iter().find(|p| p.name == name)
}

/// Names of every profile, for messages.
pub fn profile_names() -> String {
    PROFILES.iter().map(|p| p.name).collect::<Vec<_>>().join(", ")
}

/// A model's projected behaviour on one profile.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Projection {
    /// Median latency of one call on `rows` rows, in milliseconds.
    pub p50_ms: f64,
    /// 90th percentile, in milliseconds.
    pub p90_ms: f64,
    /// Whether the model fits the device's memory.
    pub fits_memory: bool,
    /// Whether the device can run the model at all (it fits, or it can spill).
    pub runnable: bool,
}

impl Profile {
    /// The factor for a family.
    pub fn factor(&self, family: ModelFamily) -> Factor {
        match family {
            ModelFamily::Dense => self.factors[0],
            ModelFamily::Conv => self.factors[1],
            ModelFamily::Depthwise => self.factors[2],
        }
    }

    /// Projects one call of a model over `rows` rows (one row on a device; many on a gateway
    /// or in the cloud, where one call serves every device whose window closed together).
    pub fn project(&self, cost: &ModelCost, rows: u64) -> Projection {
        let fits_memory = cost.memory_bytes() <= self.memory_bytes;
        let slowdown = if fits_memory {
            1.0
        } else {
            self.spill_slowdown.unwrap_or(1.0)
        };
        let compute_ns = cost.macs_per_row as f64 * rows.max(1) as f64 * self.factor(cost.family).ns_per_mac;
        let p50_ms = (self.overhead_us * 1e3 + compute_ns * slowdown) / 1e6;
        Projection {
            p50_ms,
            p90_ms: p50_ms * self.spread,
            fits_memory,
            runnable: fits_memory || self.spill_slowdown.is_some(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cost(macs: u64, parameters: u64, family: ModelFamily) -> ModelCost {
        ModelCost {
            macs_per_row: macs,
            parameters,
            peak_activations: 0,
            family,
        }
    }

    #[test]
    fn projections_reproduce_the_published_figures_they_come_from() {
        let close = |got: f64, want: f64| (got - want).abs() / want < 0.01;
        let m7 = profile("cortex-m7-mcu").expect("profile");
        let autoencoder = m7.project(&cost(264_000, 270_000, ModelFamily::Dense), 1);
        assert!(close(autoencoder.p50_ms, 1.83 + 0.005), "{autoencoder:?}");
        let rpi = profile("rpi4-cpu").expect("profile");
        let resnet = rpi.project(&cost(4_100_000_000, 25_000_000, ModelFamily::Conv), 1);
        assert!(close(resnet.p50_ms, 534.1 + 0.02), "{resnet:?}");
        let coral = profile("coral-edgetpu").expect("profile");
        let ssd = coral.project(&cost(800_000_000, 1_000_000, ModelFamily::Depthwise), 1);
        assert!(close(ssd.p50_ms, 18.2 + 1.0), "{ssd:?}");
    }

    #[test]
    fn families_differ_and_memory_is_checked() {
        let m7 = profile("cortex-m7-mcu").expect("profile");
        let dense = m7.project(&cost(1_000_000, 1_000, ModelFamily::Dense), 1);
        let conv = m7.project(&cost(1_000_000, 1_000, ModelFamily::Conv), 1);
        assert!(dense.p50_ms > conv.p50_ms);
        let big = m7.project(&cost(1_000, 1_000_000, ModelFamily::Dense), 1);
        assert!(!big.fits_memory && !big.runnable);
        let coral = profile("coral-edgetpu").expect("profile");
        let spilled = coral.project(&cost(1_000_000, 4_000_000, ModelFamily::Dense), 1);
        let fitting = coral.project(&cost(1_000_000, 1_000, ModelFamily::Dense), 1);
        assert!(!spilled.fits_memory && spilled.runnable);
        assert!(spilled.p50_ms > fitting.p50_ms);
        assert!(dense.p90_ms >= dense.p50_ms);
        for p in PROFILES {
            assert!(p.factors.iter().all(|f| f.ns_per_mac > 0.0 && !f.source.is_empty()));
        }
    }
}
