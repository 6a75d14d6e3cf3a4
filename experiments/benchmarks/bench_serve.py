"""The scoring service under load, on loopback: requests/s and latency percentiles at 1, 8 and 32 concurrent
clients, the server's memory over 2,000 requests, and a burst of bad uploads beside good ones.

    python experiments/benchmarks/bench_serve.py --package PKG [--device cpu] [--requests 2000]

Without an existing ``PKG``, the demo (MRAD-TF, tiny CLIP at 128 px, ``calibration=normal_holdout``) is
trained and exported into it first. The client is a bounded asyncio loop (httpx): every phase sends a fixed
number of requests and stops by itself; nothing but 127.0.0.1 is contacted. Prints markdown.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import describe_machine

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true"}


def make_package(path: Path) -> None:
    work = Path(tempfile.mkdtemp(prefix="bench_serve_"))
    run_dir = work / "run"
    train = [sys.executable, "-m", "anomret.train", "+experiment=demo", "calibration=normal_holdout"]
    subprocess.run([*train, f"hydra.run.dir={run_dir}"], cwd=work, env=ENV, check=True, capture_output=True)
    subprocess.run(
        [sys.executable, "-m", "anomret.export", str(run_dir), str(path)], cwd=work, env=ENV, check=True
    )


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def phase(base: str, payloads: list[bytes], n: int, concurrency: int) -> dict[str, float]:
    """``n`` requests from ``concurrency`` clients; latencies of the 200s, counts of every status."""
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    counter = iter(range(n))
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base, timeout=120, limits=limits) as client:

        async def worker() -> None:
            for index in counter:
                data = payloads[index % len(payloads)]
                start = time.perf_counter()
                answer = await client.post("/predict", files={"image": ("p.png", data, "image/png")})
                elapsed = time.perf_counter() - start
                statuses[answer.status_code] = statuses.get(answer.status_code, 0) + 1
                if answer.status_code == 200:
                    latencies.append(elapsed)

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - start
    ms = np.array(latencies) * 1000
    return {
        "requests": n,
        "ok": statuses.get(200, 0),
        "statuses": statuses,
        "rps": n / wall,
        "p50": float(np.percentile(ms, 50)) if len(ms) else float("nan"),
        "p95": float(np.percentile(ms, 95)) if len(ms) else float("nan"),
        "p99": float(np.percentile(ms, 99)) if len(ms) else float("nan"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--package", type=Path, required=True)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--requests", type=int, default=2000, help="requests of the memory phase")
    parser.add_argument("--images", type=Path, default=None, help="folder of PNG images to send")
    args = parser.parse_args()
    if not args.package.exists():
        make_package(args.package)
    images = args.images
    if images is None:  # the test images of the run the package was exported from
        from omegaconf import OmegaConf

        run_dir = Path(json.loads((args.package / "manifest.json").read_text())["source_run"])
        images = Path(OmegaConf.load(run_dir / "config.yaml").dataset.root)
    payloads = [
        path.read_bytes() for path in sorted(images.rglob("*.png")) if "ground_truth" not in path.parts
    ][:32]
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "anomret.serve",
            str(args.package),
            "--port",
            str(port),
            "--device",
            args.device,
        ],
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(1200):
            try:
                if httpx.get(f"{base}/ready", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.25)
        else:
            raise SystemExit("the service did not become ready")
        asyncio.run(phase(base, payloads, 20, 4))  # warm-up
        print(f"Machine: {describe_machine(args.device)}")
        print(f"Load (1-min average at start): {os.getloadavg()[0]:.2f}\n")
        print("| clients | requests | ok | requests/s | p50 ms | p95 ms | p99 ms | largest batch |")
        print("|---:|---:|---:|---:|---:|---:|---:|---:|")
        for concurrency, n in ((1, 100), (8, 400), (32, 800)):
            result = asyncio.run(phase(base, payloads, n, concurrency))
            stats = httpx.get(f"{base}/stats").json()
            print(
                f"| {concurrency} | {n} | {result['ok']} | {result['rps']:.1f} | {result['p50']:.1f} | "
                f"{result['p95']:.1f} | {result['p99']:.1f} | {stats['largest_batch']} |"
            )

        print(f"\nMemory (server RSS) over {args.requests} requests at 8 clients:\n")
        samples = [rss_mib(server.pid)]
        step = args.requests // 8
        for _ in range(8):
            asyncio.run(phase(base, payloads, step, 8))
            samples.append(rss_mib(server.pid))
        print("| after requests | " + " | ".join(str(i * step) for i in range(9)) + " |")
        print("|---|" + "---:|" * 9)
        print("| RSS MiB | " + " | ".join(f"{s:.0f}" for s in samples) + " |")
        growth = samples[-1] - samples[1]
        print(
            f"\nGrowth after the first {step} requests: {growth:+.1f} MiB (median step {statistics.median(np.diff(samples[1:])):+.1f} MiB)"
        )

        bad = [b"not an image", payloads[0][: len(payloads[0]) // 2], b""]
        mixed = [payloads[i % len(payloads)] if i % 3 == 0 else bad[i % len(bad)] for i in range(600)]
        result = asyncio.run(phase(base, mixed, len(mixed), 32))
        ready = httpx.get(f"{base}/ready").status_code
        print(
            f"\nBurst: {len(mixed)} requests at 32 clients, two in three bad (not an image, truncated, empty): "
            f"statuses {dict(sorted(result['statuses'].items()))}; good ones p99 {result['p99']:.1f} ms; "
            f"/ready afterwards {ready}"
        )
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    main()
