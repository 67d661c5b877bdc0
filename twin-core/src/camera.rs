//! Camera frames: a set of recorded images an edge camera replays, one per frame, with the
//! label of each (the ground truth a classifier's accuracy is measured against).
//!
//! The file is JSON Lines, one image per line: `{"label": 7, "pixels": [64 numbers]}` (other
//! fields, such as `timestamp`, are ignored). `scenarios/models/digits-heldout.jsonl` holds the
//! digits images the `digits` model never saw in training.

use serde::Deserialize;

/// Images of equal size, row-major pixels, with their labels.
#[derive(Clone, Debug, PartialEq)]
pub struct ImageSet {
    /// Pixels per image.
    pub width: usize,
    /// Every image's pixels, image after image.
    pub pixels: Vec<f32>,
    /// Each image's label.
    pub labels: Vec<i64>,
    /// Each image's mean pixel (the sensor's scalar reading, for statistics).
    pub means: Vec<f64>,
}

#[derive(Deserialize)]
struct Line {
    label: i64,
    pixels: Vec<f64>,
}

impl ImageSet {
    /// Parses JSON Lines text. Errors name the 1-based line.
    ///
    /// # Errors
    /// A line that is not `{"label": int, "pixels": [numbers]}`, images of different sizes,
    /// non-finite pixels, or no image at all.
    pub fn from_jsonl(text: &str) -> Result<Self, String> {
        let mut set = ImageSet {
            width: 0,
            pixels: Vec::new(),
            labels: Vec::new(),
            means: Vec::new(),
        };
        for (index, raw) in text.lines().enumerate() {
            let number = index + 1;
            if raw.trim().is_empty() {
                continue;
            }
            let line: Line = serde_json::from_str(raw).map_err(|err| format!("line {number}: {err}"))?;
            if line.pixels.is_empty() {
                return Err(format!("line {number}: an image needs at least one pixel"));
            }
            if set.width == 0 {
                set.width = line.pixels.len();
            } else if line.pixels.len() != set.width {
                return Err(format!(
                    "line {number}: {} pixels, but the first image has {}",
                    line.pixels.len(),
                    set.width
                ));
            }
            if let Some(bad) = line.pixels.iter().position(|p| !p.is_finite()) {
                return Err(format!("line {number}: pixel {bad} is not a finite number"));
            }
            set.means
                .push(line.pixels.iter().sum::<f64>() / line.pixels.len() as f64);
            set.pixels.extend(line.pixels.iter().map(|&p| p as f32));
            set.labels.push(line.label);
        }
        if set.labels.is_empty() {
            return Err("no image in the file".to_owned());
        }
        Ok(set)
    }

    /// Images in the set.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// Whether the set has no image (never true for a parsed set).
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// The image a camera of device `device_id` starts its replay with: seeded by the
    /// scenario's seed, the device and the sensor, so every camera starts somewhere else and a
    /// camera's frame `k` is image `first + k` (wrapping around).
    pub fn first_image(&self, seed: u64, device_id: &str, sensor: &str) -> u64 {
        crate::rng::Stream::derive(seed, &[device_id, sensor, "camera"]).next_u64() % self.len() as u64
    }

    /// The pixels of image `index` (wrapping around).
    pub fn image(&self, index: u64) -> (&[f32], i64) {
        let i = (index % self.len() as u64) as usize;
        (&self.pixels[i * self.width..(i + 1) * self.width], self.labels[i])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_refuses_with_line_numbers() {
        let set = ImageSet::from_jsonl("{\"label\": 3, \"pixels\": [0, 1]}\n{\"label\": 4, \"pixels\": [1, 1]}\n")
            .expect("parses");
        assert_eq!((set.width, set.len()), (2, 2));
        assert_eq!(set.image(3), (&[1.0f32, 1.0][..], 4));
        assert_eq!(set.means, vec![0.5, 1.0]);
        let err = ImageSet::from_jsonl("{\"label\": 3, \"pixels\": [0, 1]}\n{\"label\": 4, \"pixels\": [1]}\n")
            .expect_err("ragged");
        assert!(err.starts_with("line 2: 1 pixels"), "{err}");
        let err = ImageSet::from_jsonl("{\"label\": \"x\", \"pixels\": [0]}").expect_err("bad label");
        assert!(err.starts_with("line 1:"), "{err}");
        assert!(ImageSet::from_jsonl("\n").is_err());
    }
}
