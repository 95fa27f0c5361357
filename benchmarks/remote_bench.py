"""Fleet benchmark: N synthetic checkpoints in an S3 endpoint on loopback (moto's server), repaired on Dask.

Measures, at the server and on the workers:

- bytes served for ``inspect`` of one checkpoint and of the whole run (header-only reads);
- wall time of ``fix s3://bucket/run --out s3://bucket/fixed-W --executor dask://...`` with W = 1 and 2
  worker processes (a ``distributed.LocalCluster``, one thread each);
- peak RSS of each worker process (``VmHWM``, read on the worker after its run);
- the acceptance measurement: ``ckpt-migrate inspect s3://bucket/big/checkpoint-500`` and ``fix --dry-run`` of
  it, run as the CLI, on one checkpoint whose adapter is ``--inspect-blocks`` Llama-7B layers (64: 1.20 GiB).

    .venv/bin/python benchmarks/remote_bench.py --checkpoints 64 --blocks 1 --inspect-blocks 64

The moto server runs in this process and shares the machine's CPUs with the workers; its own costs
(request parsing, in-memory storage) are part of every wall time measured here.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "benchmarks"))


def _peak_rss_mib() -> float:
    """This process's own high-water RSS (VmHWM): ``ru_maxrss`` of a spawned worker also counts the RSS its
    parent had before ``exec`` (here the moto server's whole store), see docs/remote.md."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _cli(*args: str) -> tuple[int, float]:
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "ckpt_migrate", *args], capture_output=True, text=True)
    return done.returncode, round(time.perf_counter() - started, 2)


def _acceptance(server, fs, checkpoint: Path) -> dict:
    """``inspect`` and ``fix --dry-run`` of one big checkpoint, as the CLI, counted at the server."""
    fs.put(str(checkpoint), "bucket/big/checkpoint-500", recursive=True)
    size = fs.size("bucket/big/checkpoint-500/adapter_model.safetensors")
    measured: dict = {"adapter_bytes": size}
    for name, args in {
        "inspect": ("inspect", "s3://bucket/big/checkpoint-500"),
        "dry_run": ("fix", "s3://bucket/big/checkpoint-500", "--dry-run"),
    }.items():
        server.served.reset()
        code, seconds = _cli(*args)
        served = server.served
        measured[name] = {
            "command": "ckpt-migrate " + " ".join(args),
            "exit_code": code,
            "seconds": seconds,
            "bytes_served": served.get_bytes,
            "gets": served.gets,
        }
        print(
            f"{measured[name]['command']}: exit {code}, {served.get_bytes} bytes served in {served.gets} GETs "
            f"for a {size / 2**20:.1f} MiB adapter ({seconds} s)"
        )
    fs.rm("bucket/big", recursive=True)
    return measured


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoints", type=int, default=64, help="checkpoints in the run (default 64)")
    parser.add_argument("--blocks", type=int, default=1, help="Llama-7B-shaped layers per adapter (~20 MB each)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts to time")
    parser.add_argument(
        "--inspect-blocks",
        type=int,
        default=64,
        help="layers of the one big adapter inspected through the CLI (0: skip)",
    )
    parser.add_argument("--work", type=Path, default=REPO / "bench-work", help="where synth caches the checkpoints")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()

    from distributed import LocalCluster
    from s3_server import s3_endpoint, s3fs_for
    from synth import Spec, adapter_bytes, generate

    from ckpt_migrate import api

    spec = Spec(blocks=args.blocks, optimizer="small")
    checkpoint = generate(args.work, spec)
    results: dict = {"checkpoints": args.checkpoints, "adapter_bytes": adapter_bytes(spec), "load": os.getloadavg()}
    with s3_endpoint() as server:
        fs = s3fs_for(server)
        fs.mkdir("bucket")
        if args.inspect_blocks:
            results["acceptance"] = _acceptance(
                server, fs, generate(args.work, Spec(args.inspect_blocks, optimizer="small"))
            )
        for index in range(args.checkpoints):
            fs.put(str(checkpoint), f"bucket/run/checkpoint-{index + 1}", recursive=True)
        total = sum(fs.du("bucket/run", total=False).values())
        each = adapter_bytes(spec) / 2**20
        print(f"{args.checkpoints} checkpoints, {each:.1f} MiB adapter each, {total / 2**20:.0f} MiB in all")

        server.served.reset()
        report = api.inspect("s3://bucket/run/checkpoint-1")
        results["inspect_one"] = {
            "exit_code": report.exit_code,
            "bytes": server.served.get_bytes,
            "gets": server.served.gets,
        }
        server.served.reset()
        started = time.perf_counter()
        report = api.inspect("s3://bucket/run")
        results["inspect_run"] = {
            "seconds": round(time.perf_counter() - started, 2),
            "bytes": server.served.get_bytes,
            "bytes_per_checkpoint": server.served.get_bytes // args.checkpoints,
        }
        print("inspect:", json.dumps(results["inspect_one"]), json.dumps(results["inspect_run"]))

        for workers in args.workers:
            cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None)
            client = cluster.get_client()
            address = cluster.scheduler_address.removeprefix("tcp://")
            server.served.reset()
            load = os.getloadavg()
            started = time.perf_counter()
            report = api.fix(
                "s3://bucket/run", f"s3://bucket/fixed-{workers}", executor=f"dask://{address}", progress=False
            )
            seconds = time.perf_counter() - started
            rss = client.run(_peak_rss_mib)
            statuses = sorted({c.status.value for c in report.checkpoints})
            published = len([k for k in fs.find(f"bucket/fixed-{workers}") if k.endswith("ckpt_migrate_manifest.json")])
            results[f"fix_{workers}_workers"] = {
                "seconds": round(seconds, 1),
                "checkpoints_per_minute": round(60 * args.checkpoints / seconds, 1),
                "exit_code": report.exit_code,
                "statuses": statuses,
                "manifests": published,
                "bytes_served": server.served.get_bytes,
                "bytes_received": server.served.received_bytes,
                # what the client would have sent with every object uploaded (before server-side copies)
                "bytes_published": sum(fs.du(f"bucket/fixed-{workers}", total=False).values()),
                "server_side_copies": server.served.copies,
                "worker_peak_rss_mib": sorted(round(v) for v in rss.values()),
                "load_average_before": [round(v, 2) for v in load],
                "load_average_after": [round(v, 2) for v in os.getloadavg()],
            }
            print(f"fix, {workers} worker(s):", json.dumps(results[f"fix_{workers}_workers"]))
            client.close()
            cluster.close()
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
