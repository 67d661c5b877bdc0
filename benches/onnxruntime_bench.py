#!/usr/bin/env python3
"""onnxruntime side of model-bench: per-row time of a model at given batch sizes, single-threaded.

Reads the rows to use from a JSON file (written by model-bench, the same rows tract runs on) and
prints one JSON line per batch size: {"batch": B, "median_us_per_row": ...}.

Usage: onnxruntime_bench.py MODEL.onnx ROWS.json --batches 1 256 --repeat 200
"""

import argparse
import json
import time

import numpy as np
import onnxruntime


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("rows")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 256])
    parser.add_argument("--repeat", type=int, default=200)
    args = parser.parse_args()
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
    session = onnxruntime.InferenceSession(args.model, options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    rows = np.asarray(json.load(open(args.rows)), dtype=np.float32)
    for batch in args.batches:
        feed = {name: np.ascontiguousarray(rows[:batch])}
        for _ in range(20):
            session.run(None, feed)
        times = []
        for _ in range(args.repeat):
            start = time.perf_counter()
            session.run(None, feed)
            times.append(time.perf_counter() - start)
        print(json.dumps({"batch": batch, "median_us_per_row": float(np.median(times)) * 1e6 / batch,
                          "onnxruntime": onnxruntime.__version__}))


if __name__ == "__main__":
    main()
