"""Where the negative students' extra training time goes: one DSKD training step with `negative` against the
default step, on random images (timing only, no data needed).

The default step reads the teacher's features from the cache; a negative step also draws the synthetic anomalies
and runs the teacher on the images that got one. Prints medians over `--repeats` batches (the first is dropped):
the anomaly draw, the teacher on the altered images (per `--batch` x share images), and the whole loss plus
backward of each step. Run it on an idle machine, as timings under load say little.

    python benchmarks/negative_cost.py --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from distillad.methods import build_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--share", type=float, default=0.5, help="the negative option: share of images altered")
    parser.add_argument("--repeats", type=int, default=6)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    images = torch.rand(args.batch, 3, args.size, args.size)
    negative = build_model("dskd", "efficientnet_lite0", {"negative": args.share}).train()
    default = build_model("dskd", "efficientnet_lite0", {}).train()
    with torch.no_grad():
        cached = default.teacher_features(images)
    expected_altered = args.share * args.batch
    times: dict[str, list[float]] = {"anomaly draw": [], f"teacher on {expected_altered:g} altered images": [],
                                     "default step (loss + backward)": [], "negative step (loss + backward)": []}
    names = list(times)
    for _ in range(args.repeats):
        start = time.perf_counter()
        synthetic = negative.anomalies(images)
        times[names[0]].append(time.perf_counter() - start)
        altered = synthetic.applied.nonzero().squeeze(1)
        start = time.perf_counter()
        with torch.no_grad():
            negative.teacher_features(synthetic.images[altered])
        # scaled to the expected count: the draw alters a random number of images
        times[names[1]].append((time.perf_counter() - start) * expected_altered / max(len(altered), 1))
        for name, model in ((names[2], default), (names[3], negative)):
            model.zero_grad(set_to_none=True)
            start = time.perf_counter()
            model.training_loss(images, cached).backward()
            times[name].append(time.perf_counter() - start)
    for name, values in times.items():
        kept = values[1:] if len(values) > 1 else values
        print(f"{name}: median {statistics.median(kept):.3f} s over {len(kept)} batches")


if __name__ == "__main__":
    main()
