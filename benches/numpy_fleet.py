#!/usr/bin/env python3
"""The baseline of the fleet throughput benchmark: the vectorized numpy program a Python
engineer would write for the workload of scenarios/fleet-bench.toml.

100k devices x 2 sensors at 1 Hz for one simulated hour, in 60 s windows:
  temperature = 20 + 5 sin(2 pi t / 24h) + N(0, 0.2)
  level       = random walk, steps N(0, 0.5), clamped to [0, 100] at every step
and per window and device: count, min, max, mean of each sensor.

Devices are processed in chunks (cache-sized arrays), windows in order, with in-place
operations; the clamped walk is advanced one vectorized step at a time across the chunk
(clamping at each step is what makes it a clamped walk, so a single cumsum would be wrong).
Prints one JSON line.

Usage: numpy_fleet.py [--devices N] [--seconds S] [--chunk C]
"""

import argparse
import json
import time

import numpy as np


def run(devices: int, seconds: int, chunk: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    window = 60
    windows = seconds // window
    level = np.full(devices, 50.0)
    checksum = 0.0
    samples = 0
    started = time.perf_counter()
    for w in range(windows):
        t = np.arange(w * window, (w + 1) * window, dtype=np.float64)
        sine = 20.0 + 5.0 * np.sin(2.0 * np.pi * t / 86400.0)
        for start in range(0, devices, chunk):
            stop = min(start + chunk, devices)
            n = stop - start
            temperature = rng.standard_normal(size=(n, window))
            temperature *= 0.2
            temperature += sine
            walk = rng.standard_normal(size=(window, n))
            walk *= 0.5
            x = level[start:stop].copy()
            for i in range(window):
                row = walk[i]
                row += x
                np.maximum(row, 0.0, out=row)
                np.minimum(row, 100.0, out=row)
                x = row
            level[start:stop] = x
            # summaries: count, min, max, mean per device and sensor
            t_min = temperature.min(axis=1)
            t_max = temperature.max(axis=1)
            t_mean = temperature.mean(axis=1)
            l_min = walk.min(axis=0)
            l_max = walk.max(axis=0)
            l_mean = walk.mean(axis=0)
            checksum += float(t_mean[0] + l_mean[0] + t_min[0] + t_max[0] + l_min[0] + l_max[0])
            samples += 2 * n * window
    wall = time.perf_counter() - started
    return {
        "program": "numpy",
        "numpy": np.__version__,
        "devices": devices,
        "simulated_seconds": seconds,
        "samples": samples,
        "wall_seconds": wall,
        "samples_per_second": samples / wall,
        "checksum": checksum,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, default=100_000)
    parser.add_argument("--seconds", type=int, default=3600)
    parser.add_argument("--chunk", type=int, default=4096)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    print(json.dumps(run(args.devices, args.seconds, args.chunk, args.seed)))


if __name__ == "__main__":
    main()
