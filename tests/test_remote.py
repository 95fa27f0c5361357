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


def test_inspect_reads_headers_not_weights(s3, big_adapter):
    """A ~160 MB adapter: inspect over s3:// is served at most 2 MiB (counted by the server)."""
    url = put(s3, big_adapter, "big/run/checkpoint-500")
    size = (big_adapter / "adapter_model.safetensors").stat().st_size
    assert size > 150 * 2**20
    s3.served.reset()
    code, stdout, stderr = run_cli("inspect", url)
    assert code == 3, stderr
    assert f"{url}: repairable" in stdout
    assert s3.served.get_bytes <= 2 * 2**20, s3.served
    print(f"inspect of a {size / 2**20:.0f} MiB adapter: {s3.served}")
    s3.served.reset()
    code, stdout, _ = run_cli("fix", url, "--dry-run")
    assert code == 0 and "dry run: nothing written" in stdout
    assert s3.served.get_bytes <= 2 * 2**20, s3.served


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


def test_local_runs_import_no_remote_package(tmp_path):
    """fsspec, s3fs and distributed stay out of a local-path run."""
    code = (
        "import sys; from ckpt_migrate import api; "
        f"api.inspect({str(LLAMA / 'run')!r}); "
        "print(sorted(m for m in ('s3fs', 'distributed', 'ckpt_migrate.remote.fleet') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
