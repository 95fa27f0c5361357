"""Checkpoints in object storage and fleets on Dask, against a real S3 endpoint on loopback (moto's server).

What a user relies on: inspect reads headers, not weights (bytes counted at the server); a fix from a bucket
to a bucket reproduces the trained logits under the newest peft and peft 0.12; a Dask cluster repairs every
checkpoint with a manifest each; a killed fix leaves nothing published and the re-run succeeds; bad input
is one line naming the URL.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import FIXTURES, LAYOUTS, TUNER_FIXTURES, case_dirs, load_case, needs_base, old_python, run_cli
from logits_check import max_logit_error

pytest.importorskip("moto")
pytest.importorskip("s3fs")

REPO = Path(__file__).resolve().parent.parent
MANIFEST = "ckpt_migrate_manifest.json"
LLAMA = FIXTURES / "llama_score"


@pytest.fixture(scope="module")
def s3():
    from s3_server import s3_endpoint, s3fs_for

    with s3_endpoint() as server:
        fs = s3fs_for(server)
        fs.mkdir("bucket")
        server.fs = fs
        yield server


def put(s3, local: Path, key: str) -> str:
    s3.fs.put(str(local), f"bucket/{key}", recursive=True)
    return f"s3://bucket/{key}"


@pytest.fixture(scope="module")
def big_adapter(tmp_path_factory) -> Path:
    """A synthetic peft-0.12 checkpoint with a ~160 MB adapter (benchmarks/synth.py; optimizer: a few KB)."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from synth import Spec, generate

    return generate(tmp_path_factory.mktemp("synth"), Spec(blocks=8, optimizer="small"), log=lambda _: None)


# ------------------------------------------------------------------------------------- reading headers only


def _inspect_json(src: str | Path, base: str | Path | None) -> dict:
    from ckpt_migrate import api
    from ckpt_migrate.render import to_dict

    return to_dict(api.inspect(src, base_model=base))


@pytest.mark.parametrize(
    "case_dir", case_dirs(FIXTURES) + case_dirs(LAYOUTS) + case_dirs(TUNER_FIXTURES), ids=lambda p: p.name
)
def test_sparse_mirror_plans_exactly_as_the_checkpoint_itself(case_dir):
    """The claim the header-only inspect rests on: the planner reads nothing the sparse mirror leaves out."""
    import fsspec

    fs = fsspec.filesystem("memory")
    key = f"/plans/{case_dir.name}/run"
    fs.put(str(case_dir / "run"), key, recursive=True)
    base = case_dir / "base" if needs_base(load_case(case_dir)) else None
    local = json.dumps(_inspect_json(case_dir / "run", base)).replace(str(case_dir / "run"), f"memory:/{key}")
    remote = json.dumps(_inspect_json(f"memory:/{key}", base))
    assert remote == local
    fs.rm(key, recursive=True)


def _served_for(s3, *args: str) -> int:
    s3.served.reset()
    code, stdout, stderr = run_cli(*args)
    assert code == (3 if args[0] == "inspect" else 0), stderr
    assert ": repairable" in stdout
    return s3.served.get_bytes


def _header_bytes(weights: Path) -> int:
    with open(weights, "rb") as handle:
        return 8 + int.from_bytes(handle.read(8), "little")


def test_bytes_served_for_inspect_do_not_grow_with_the_tensor_data(s3, big_adapter, tmp_path):
    """inspect and the dry run are served the headers: a ~160 MB adapter and a ~100 KB one with the same
    tensors (other shapes) cost the same bytes at the server, to within their headers' difference."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from synth import Spec, generate

    small = generate(tmp_path, Spec(blocks=8, hidden=64, intermediate=128, r=4, optimizer="small"), log=lambda _: None)
    sizes = {}
    served = {}
    for name, checkpoint in {"big": big_adapter, "small": small}.items():
        url = put(s3, checkpoint, f"sizes/{name}/checkpoint-500")
        weights = checkpoint / "adapter_model.safetensors"
        sizes[name] = (weights.stat().st_size, _header_bytes(weights))
        served[name] = (_served_for(s3, "inspect", url), _served_for(s3, "fix", url, "--dry-run"))
    assert sizes["big"][0] > 1000 * sizes["small"][0]  # 160 MB of tensor data against 100 KB
    header_difference = abs(sizes["big"][1] - sizes["small"][1])
    for command in (0, 1):
        assert served["big"][command] <= 2 * 2**20
        # the only other differences: a few digits (r, object sizes) in adapter_config.json and the LIST answers
        assert abs(served["big"][command] - served["small"][command]) <= header_difference + 256, (served, sizes)
    print(f"bytes served (inspect, dry run): {served}; (adapter bytes, header bytes): {sizes}")


# ------------------------------------------------------------------------------------- fix, bucket to bucket


def _download(s3, url: str, target: Path) -> Path:
    s3.fs.get(url.removeprefix("s3://"), str(target), recursive=True)
    return target


def test_fix_bucket_to_bucket_reproduces_the_trained_logits(s3, tmp_path):
    src = put(s3, LLAMA / "run", "llama/run")
    out = "s3://bucket/llama/run-fixed"
    base = put(s3, LLAMA / "base", "llama/base")  # a base model in the bucket too: the output is proven and verified
    code, stdout, stderr = run_cli("fix", src, "--out", out, "--base-model", base, "--quiet")
    assert code == 0, stderr
    assert f"repaired -> {out}/checkpoint-2" in stdout and "shown numerically" in stdout
    fixed = _download(s3, out, tmp_path / "fixed")
    tolerance = load_case(LLAMA)["tolerance"]
    for name in ("checkpoint-2", "checkpoint-4"):
        manifest = json.loads((fixed / name / MANIFEST).read_text())
        assert manifest["source"] == f"{src}/{name}"
        assert max_logit_error(LLAMA, fixed / name, name) <= tolerance
    if old_python() is not None:
        args = [str(LLAMA), str(fixed / "checkpoint-4"), "checkpoint-4"]
        result = subprocess.run(
            [old_python(), str(REPO / "tests" / "logits_check.py"), *args], capture_output=True, text=True, check=True
        )
        assert json.loads(result.stdout.strip().splitlines()[-1])[args[1]] <= tolerance
    # re-running resumes: nothing is rewritten, both are reported repaired by the earlier run
    code, stdout, _ = run_cli("fix", src, "--out", out, "--quiet")
    assert code == 0 and stdout.count("by an earlier run; skipped") == 2


def test_dask_cluster_repairs_every_checkpoint_of_a_fleet(s3, tmp_path):
    from distributed import LocalCluster

    run = tmp_path / "run"
    for step in (2, 4, 6, 8, 10):  # five checkpoints: more tasks than workers
        shutil.copytree(LLAMA / "run" / ("checkpoint-4" if step == 4 else "checkpoint-2"), run / f"checkpoint-{step}")
    (run / "checkpoint-10" / "adapter_config.json").unlink()  # one bad checkpoint: reported, the others published
    src = put(s3, run, "fleet/run")
    out = "s3://bucket/fleet/run-fixed"
    with LocalCluster(
        n_workers=2, threads_per_worker=1, processes=False, protocol="tcp://", dashboard_address=None
    ) as c:
        address = c.scheduler_address.removeprefix("tcp://")
        code, stdout, stderr = run_cli("fix", src, "--out", out, "--executor", f"dask://{address}", "--format", "json")
    assert code == 7, stderr
    report = json.loads(stdout)
    statuses = {Path(c["source"]).name: c["status"] for c in report["checkpoints"]}
    # no base model: written, not proven
    assert statuses == {f"checkpoint-{s}": "written" for s in (2, 4, 6, 8)} | {"checkpoint-10": "unreadable"}
    assert "checkpoint-10/adapter_config.json: missing" in stderr
    published = sorted(k for k in s3.fs.find("bucket/fleet/run-fixed") if k.endswith(MANIFEST))
    assert [Path(k).parent.name for k in published] == [f"checkpoint-{s}" for s in (2, 4, 6, 8)]
    assert not [k for k in s3.fs.find("bucket/fleet/run-fixed") if "checkpoint-10" in k]
    fixed = _download(s3, out + "/checkpoint-6", tmp_path / "fixed-6")
    assert max_logit_error(LLAMA, fixed, "checkpoint-2") <= load_case(LLAMA)["tolerance"]


# ------------------------------------------------------------------------------------- a worker lost mid-repair


def _kill_the_worker_publishing(s3, prefix: str, process: subprocess.Popen, workers: set[int]) -> None:
    """SIGKILL the worker process uploading ``prefix``: the pid its staging marker names (written first)."""
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and process.poll() is None:
        s3.fs.invalidate_cache()
        try:
            pid = json.loads(s3.fs.cat_file(f"{prefix}/.ckpt-migrate-staging"))["pid"]
        except FileNotFoundError:
            time.sleep(0.02)
            continue
        assert pid in workers, (pid, workers)  # a Dask worker's process, not the CLI's
        os.kill(pid, signal.SIGKILL)
        return
    raise AssertionError("the fleet finished before its worker could be killed")


def _fleet(src: str, out: str, executor: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "ckpt_migrate", "fix", src, "--out", out, "--executor", executor]
    return subprocess.Popen([*command, "--format", "json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _statuses(stdout: str) -> dict[str, str]:
    return {Path(c["source"]).name: c["status"] for c in json.loads(stdout)["checkpoints"]}


def _published(s3, prefix: str) -> list[str]:
    s3.fs.invalidate_cache()
    return sorted(Path(k).parent.name for k in s3.fs.find(prefix) if k.endswith(MANIFEST))


def _allow_no_failure(dask_scheduler) -> None:
    dask_scheduler.allowed_failures = 0  # distributed.scheduler.allowed-failures, as a cluster may be configured


def test_a_lost_worker_is_retried_or_reported_and_the_rerun_resumes(s3, big_adapter, tmp_path):
    """Two worker processes; the one uploading the big checkpoint is SIGKILLed. With Dask's default
    allowed-failures its task runs again and the fleet completes; with none allowed the checkpoint is
    reported failed (exit 7), nothing of it published, and re-running completes it."""
    from distributed import Client, LocalCluster

    run = tmp_path / "run"
    shutil.copytree(big_adapter, run / "checkpoint-500")
    shutil.copytree(LLAMA / "run" / "checkpoint-2", run / "checkpoint-2")
    src = put(s3, run, "lost/run")
    with (
        LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster,
        Client(cluster) as client,
    ):
        executor = "dask://" + cluster.scheduler_address.removeprefix("tcp://")

        process = _fleet(src, "s3://bucket/lost/retried", executor)
        _kill_the_worker_publishing(
            s3, "bucket/lost/retried/checkpoint-500", process, set(client.run(os.getpid).values())
        )
        stdout, stderr = process.communicate(timeout=300)
        assert process.returncode == 0, stderr
        assert _statuses(stdout) == {"checkpoint-2": "written", "checkpoint-500": "written"}
        assert _published(s3, "bucket/lost/retried") == ["checkpoint-2", "checkpoint-500"]
        assert not s3.fs.exists("bucket/lost/retried/checkpoint-500/.ckpt-migrate-staging")

        client.wait_for_workers(2, timeout=60)  # the nanny restarted the killed one
        client.run_on_scheduler(_allow_no_failure)
        out = "s3://bucket/lost/reported"
        process = _fleet(src, out, executor)
        _kill_the_worker_publishing(
            s3, "bucket/lost/reported/checkpoint-500", process, set(client.run(os.getpid).values())
        )
        stdout, stderr = process.communicate(timeout=300)
        assert process.returncode == 7, stderr
        assert _statuses(stdout) == {"checkpoint-2": "written", "checkpoint-500": "failed"}
        lines = [line for line in stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and "Traceback" not in stderr, stderr
        assert f"{src}/checkpoint-500: failed: " in lines[0] and "worker was lost" in lines[0]
        assert "re-run to resume" in lines[0]
        assert _published(s3, "bucket/lost/reported") == ["checkpoint-2"]
        code, _, stderr = run_cli("inspect", f"{out}/checkpoint-500")  # the partial upload is not there
        assert code == 5 and "no object under this prefix" in stderr

        client.wait_for_workers(2, timeout=60)
        process = _fleet(src, out, executor)
        stdout, stderr = process.communicate(timeout=300)
        assert process.returncode == 0, stderr
        # the one published before is skipped (reported as the local resume reports it)
        assert _statuses(stdout) == {"checkpoint-2": "repaired", "checkpoint-500": "written"}
        assert _published(s3, "bucket/lost/reported") == ["checkpoint-2", "checkpoint-500"]
        fixed = _download(s3, f"{out}/checkpoint-2", tmp_path / "fixed-2")
        assert max_logit_error(LLAMA, fixed, "checkpoint-2") <= load_case(LLAMA)["tolerance"]


# ------------------------------------------------------------------------------------- killed, then re-run


def test_killed_fix_publishes_nothing_and_the_rerun_succeeds(s3, big_adapter, tmp_path):
    src = put(s3, big_adapter, "kill/run/checkpoint-500")
    out = "s3://bucket/kill/fixed"
    env = dict(os.environ)
    command = [sys.executable, "-m", "ckpt_migrate", "fix", src, "--out", out, "--quiet"]
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    marker = "bucket/kill/fixed/.ckpt-migrate-staging"
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline and process.poll() is None:
            s3.fs.invalidate_cache()
            if s3.fs.exists(marker):  # publishing has begun: the marker is the first object written
                break
            time.sleep(0.02)
        assert process.poll() is None, "the fix finished before it could be killed"
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.wait()
    s3.fs.invalidate_cache()
    left = s3.fs.find("bucket/kill/fixed")
    assert left and not [k for k in left if k.endswith(MANIFEST)], left  # a partial write, and no manifest
    code, _, stderr = run_cli("inspect", out)  # not there to any command
    assert code == 5 and "no object under this prefix" in stderr
    code, stdout, stderr = run_cli("fix", src, "--out", out, "--quiet")
    assert code == 0, stderr
    s3.fs.invalidate_cache()
    keys = {Path(k).name for k in s3.fs.find("bucket/kill/fixed")}
    assert MANIFEST in keys and ".ckpt-migrate-staging" not in keys and "optimizer.pt" not in keys


# ------------------------------------------------------------------------------------- hostile input over s3://


def _checkpoint_copy(tmp_path: Path) -> Path:
    return Path(shutil.copytree(LLAMA / "run" / "checkpoint-2", tmp_path / "checkpoint-2"))


@pytest.mark.parametrize("command", ["inspect", "fix"])
def test_truncated_safetensors_header_over_s3_is_one_line(s3, tmp_path, command):
    checkpoint = _checkpoint_copy(tmp_path)
    weights = checkpoint / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])  # the header says more than the file holds
    url = put(s3, checkpoint, f"hostile-{command}/header/checkpoint-2")
    args = ["--out", f"s3://bucket/hostile-{command}/header-out"] if command == "fix" else []
    code, _, stderr = run_cli(command, url, *args)
    assert code == 5
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in stderr
    assert f"{url}/adapter_model.safetensors" in lines[0] and "exceeds the file size" in lines[0]
    assert "/tmp" not in lines[0]
    assert not s3.fs.exists(f"bucket/hostile-{command}/header-out")


def test_missing_config_over_s3_is_one_line(s3, tmp_path):
    checkpoint = _checkpoint_copy(tmp_path)
    (checkpoint / "adapter_config.json").unlink()
    url = put(s3, checkpoint, "hostile/config/checkpoint-2")
    code, _, stderr = run_cli("fix", url, "--out", "s3://bucket/hostile/config-out")
    assert code == 5
    assert stderr.strip() == f"ckpt-migrate: error: {url}/adapter_config.json: missing"
    code, _, stderr = run_cli("inspect", "s3://bucket/hostile/nothing-here")
    assert code == 5 and "s3://bucket/hostile/nothing-here" in stderr


def _one_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    assert "/tmp" not in lines[0]  # the URL is named, never the temporary mirror
    return lines[0]


@pytest.mark.parametrize("command", ["inspect", "fix"])
def test_adapter_config_that_is_not_json_over_s3_is_one_line(s3, tmp_path, command):
    checkpoint = _checkpoint_copy(tmp_path)
    (checkpoint / "adapter_config.json").write_bytes(b'{"peft_type": "LORA", "r": 4,')
    url = put(s3, checkpoint, f"hostile-{command}/json/checkpoint-2")
    out = f"s3://bucket/hostile-{command}/json-out"
    code, _, stderr = run_cli(command, url, *(["--out", out] if command == "fix" else []))
    assert code == 5
    line = _one_line(stderr)
    assert f"{url}/adapter_config.json" in line and "invalid JSON" in line
    assert not s3.fs.exists(out.removeprefix("s3://"))


@pytest.mark.parametrize("source", ["checkpoint-2", "."])
def test_out_prefix_holding_other_objects_is_refused_untouched(s3, source):
    """A run or a single checkpoint into an --out prefix that holds something else: refused (exit 6), nothing
    written there, nothing removed."""
    src = _join_url(put(s3, LLAMA / "run", f"hostile/busy-{source}/run"), source)
    out = f"bucket/hostile/busy-{source}/out"
    s3.fs.pipe(f"{out}/notes.txt", b"someone else's")
    code, _, stderr = run_cli("fix", src, "--out", f"s3://{out}")
    assert code == 6
    line = _one_line(stderr)
    assert f"s3://{out}" in line and "not empty; refusing to overwrite" in line
    s3.fs.invalidate_cache()
    assert s3.fs.find(out) == [f"{out}/notes.txt"] and s3.fs.cat(f"{out}/notes.txt") == b"someone else's"


def _join_url(url: str, relative: str) -> str:
    return url if relative == "." else f"{url}/{relative}"


@pytest.mark.parametrize("command", ["inspect", "fix"])
def test_missing_base_model_over_s3_is_one_line(s3, command):
    src = put(s3, LLAMA / "run", f"hostile-{command}/nobase/run")
    base = f"s3://bucket/hostile-{command}/nobase/base"  # nothing there
    out = f"bucket/hostile-{command}/nobase/out"
    args = ["--out", f"s3://{out}"] if command == "fix" else []
    code, _, stderr = run_cli(command, src, "--base-model", base, *args)
    assert code == 5
    line = _one_line(stderr)
    assert base in line and "base model not found" in line
    assert not s3.fs.exists(out)


def test_local_runs_import_no_remote_package(tmp_path):
    """fsspec, s3fs and distributed stay out of a local-path run."""
    code = (
        "import sys; from ckpt_migrate import api; "
        f"api.inspect({str(LLAMA / 'run')!r}); "
        "print(sorted(m for m in ('s3fs', 'distributed', 'ckpt_migrate.remote.fleet') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
