"""What decoding in a supervised child process costs against decoding in process.

`dskd score` decodes every image in a child process of the decode task (`DecoderProcess`), so
that an image which crashes the decoder is one error row rather than a dead worker. This times
`decode_image(bytes, 256)` both ways on the same bytes held in memory (no reads), on the images
`bench/scoring.py` uses: 1024² and 256² JPEG and PNG. The two ways take turns for `--rounds`
rounds and each keeps its best, so a busy machine hurts both alike. Also: how long a new child
takes to answer its first image (its start-up, paid once per decoding process).

    python bench/decode_supervision.py                 # 100 images per set, ~2 minutes
    python bench/decode_supervision.py --images 40 --rounds 2

Wall time per image (best round) and CPU time per image (this process and the child together,
fewest in a round) are both reported: on a busy machine the CPU time is the steadier figure, and
it is what the pipeline, whose decode tasks run beside the model, pays.

The last line is machine-readable, for the headline set (1024² JPEG) and the worst set:
    overhead_pct=<headline> worst_overhead_pct=<worst> overhead_ms_per_image=<headline>
    cpu_overhead_pct=<headline> child_start_s=<…>
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from scoring import make_images  # bench/scoring.py: the same generated photos

from dskd_ray.io.decoder_process import DecoderProcess
from dskd_ray.io.images import decode_image

MODEL_SIZE = 256


def _child_cpu_s(decoder: DecoderProcess | None) -> float:
    """CPU seconds the decoder's child has used (user + system), from /proc."""
    proc = decoder._proc if decoder else None
    if proc is None:
        return 0.0
    fields = Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def timed(decode, blobs: list[bytes], decoder: DecoderProcess | None) -> tuple[float, float]:  # noqa: ANN001
    """(images/s, CPU ms an image in this process and the child together)."""
    cpu, child = time.process_time(), _child_cpu_s(decoder)
    start = time.perf_counter()
    for data in blobs:
        decode(data, MODEL_SIZE)
    wall = time.perf_counter() - start
    used = time.process_time() - cpu + _child_cpu_s(decoder) - child
    return len(blobs) / wall, 1000 * used / len(blobs)


def child_start_s(work: Path, repeats: int = 3) -> float:
    data = make_images(work / "tiny", 1, 64, "png")[0].read_bytes()
    times = []
    for _ in range(repeats):
        decoder = DecoderProcess()
        start = time.perf_counter()
        decoder.decode(data, MODEL_SIZE)
        times.append(time.perf_counter() - start)
        decoder.close()
    return min(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=100, help="images per set")
    parser.add_argument("--rounds", type=int, default=3, help="turns each way; best kept")
    parser.add_argument("--out", default="bench/out/decode_supervision.json")
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="dskd-bench-decode-"))
    print(
        f"{args.images} images per set, {args.rounds} rounds; {os.cpu_count()} CPUs; "
        f"load average {os.getloadavg()[0]:.1f} at start",
        flush=True,
    )
    decoder = DecoderProcess()
    results: dict = {"args": vars(args), "sets": {}}
    for size, fmt in [(1024, "jpg"), (1024, "png"), (256, "jpg"), (256, "png")]:
        name = f"{size}² {fmt.upper()}"
        blobs = [p.read_bytes() for p in make_images(work / name, args.images, size, fmt)]
        for data in blobs[:4]:  # the same pixels both ways
            assert (decoder.decode(data, MODEL_SIZE)[0] == decode_image(data, MODEL_SIZE)[0]).all()
        in_process = supervised = 0.0
        cpu_in, cpu_sup = float("inf"), float("inf")
        for _ in range(args.rounds):
            rate, cpu = timed(decode_image, blobs, None)
            in_process, cpu_in = max(in_process, rate), min(cpu_in, cpu)
            rate, cpu = timed(decoder.decode, blobs, decoder)
            supervised, cpu_sup = max(supervised, rate), min(cpu_sup, cpu)
        row = {
            "bytes_per_image": sum(map(len, blobs)) / len(blobs),
            "in_process_images_per_s": in_process,
            "supervised_images_per_s": supervised,
            "overhead_ms_per_image": 1000 * (1 / supervised - 1 / in_process),
            "overhead_pct": 100 * (in_process / supervised - 1),
            "in_process_cpu_ms_per_image": cpu_in,
            "supervised_cpu_ms_per_image": cpu_sup,
            "cpu_overhead_pct": 100 * (cpu_sup / cpu_in - 1),
        }
        results["sets"][name] = row
        print(
            f"{name}: {row['bytes_per_image'] / 1000:.0f} KB; in process {in_process:.1f} img/s "
            f"({cpu_in:.2f} CPU ms an image), supervised {supervised:.1f} img/s "
            f"({cpu_sup:.2f} CPU ms): wall +{row['overhead_ms_per_image']:.2f} ms an image "
            f"({row['overhead_pct']:+.1f}%), CPU {row['cpu_overhead_pct']:+.1f}%",
            flush=True,
        )
    decoder.close()
    results["child_start_s"] = child_start_s(work)
    shutil.rmtree(work, ignore_errors=True)
    results["load_average_end"] = os.getloadavg()[0]
    print(
        f"child start-up (first image answered): {results['child_start_s']:.2f} s; "
        f"load average at end {results['load_average_end']:.1f}"
    )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    head = results["sets"]["1024² JPG"]
    worst = max(r["overhead_pct"] for r in results["sets"].values())
    print(
        f"overhead_pct={head['overhead_pct']:.1f} worst_overhead_pct={worst:.1f} "
        f"overhead_ms_per_image={head['overhead_ms_per_image']:.2f} "
        f"cpu_overhead_pct={head['cpu_overhead_pct']:.1f} "
        f"child_start_s={results['child_start_s']:.2f}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
