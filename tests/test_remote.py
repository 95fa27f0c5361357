"""Checkpoints in object storage and fleets on Dask, against a real S3 endpoint on loopback (moto's server).

What a user relies on: inspect reads headers, not weights (bytes counted at the server); a fix from a bucket
to a bucket reproduces the trained logits under the newest peft and peft 0.12; a Dask cluster repairs every
checkpoint with a manifest each; a killed fix leaves nothing published and the re-run succeeds; bad input
is one line naming the URL.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
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
    """A synthetic peft-0.12 checkpoint with a 43 MB adapter: two Llama-7B layers (benchmarks/synth.py; the 1.2 GB
    one, 64 layers, is measured by benchmarks/remote_bench.py)."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from synth import Spec, generate

    return generate(tmp_path_factory.mktemp("synth"), Spec(blocks=2, optimizer="small"), log=lambda _: None)


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
    """inspect and the dry run are served the headers: a 43 MB adapter and a 71 KB one with the same tensors
    (other shapes) cost the same bytes at the server, to within their headers' difference. (Both exceed the
    64 KiB first read of a safetensors file, which takes the length prefix and, mostly, the whole header.)"""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from synth import Spec, generate

    from ckpt_migrate.remote.mirror import HEADER_PROBE_BYTES

    small = generate(tmp_path, Spec(blocks=2, hidden=128, intermediate=256, r=4, optimizer="small"), log=lambda _: None)
    sizes = {}
    served = {}
    for name, checkpoint in {"big": big_adapter, "small": small}.items():
        url = put(s3, checkpoint, f"sizes/{name}/checkpoint-500")
        weights = checkpoint / "adapter_model.safetensors"
        sizes[name] = (weights.stat().st_size, _header_bytes(weights))
        served[name] = (_served_for(s3, "inspect", url), _served_for(s3, "fix", url, "--dry-run"))
    assert sizes["small"][0] > HEADER_PROBE_BYTES and sizes["big"][0] > 500 * sizes["small"][0]  # 43 MB, 71 KB
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
    s3.served.reset()
    code, stdout, stderr = run_cli("fix", src, "--out", out, "--base-model", base, "--quiet")
    assert code == 0, stderr
    assert f"repaired -> {out}/checkpoint-2" in stdout and "shown numerically" in stdout
    fixed = _download(s3, out, tmp_path / "fixed")
    tolerance = load_case(LLAMA)["tolerance"]
    unchanged = 0
    for name in ("checkpoint-2", "checkpoint-4"):
        manifest = json.loads((fixed / name / MANIFEST).read_text())
        assert manifest["source"] == f"{src}/{name}"
        assert max_logit_error(LLAMA, fixed / name, name) <= tolerance
        same = [f for f, digest in manifest["outputs_sha256"].items() if manifest["inputs_sha256"].get(f) == digest]
        for file in same:  # copied server-side, not uploaded: the same bytes as the source's
            assert (fixed / name / file).read_bytes() == (LLAMA / "run" / name / file).read_bytes()
        unchanged += len(same)
    assert unchanged >= 4 and s3.served.copies == unchanged  # README.md, scheduler.pt, training_args.bin...
    if old_python() is not None:
        args = [str(LLAMA), str(fixed / "checkpoint-4"), "checkpoint-4"]
        result = subprocess.run(
            [old_python(), str(REPO / "tests" / "logits_check.py"), *args], capture_output=True, text=True, check=True
        )
        assert json.loads(result.stdout.strip().splitlines()[-1])[args[1]] <= tolerance
    # re-running resumes: nothing is rewritten; repaired only where what was published passes the proof now
    code, stdout, _ = run_cli("fix", src, "--out", out, "--quiet")
    assert code == 0 and stdout.count("already written into") == 2 and stdout.count("NOT proven") == 2
    code, stdout, _ = run_cli("fix", src, "--out", out, "--base-model", base, "--quiet")
    assert code == 0 and stdout.count("already repaired into") == 2 and stdout.count("(static proof passed)") == 2


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
    assert statuses == {f"checkpoint-{s}": "written" for s in (2, 4, 6, 8)} | {"checkpoint-10": "unreadable"}, stderr
    assert "checkpoint-10/adapter_config.json: missing" in stderr
    published = sorted(k for k in s3.fs.find("bucket/fleet/run-fixed") if k.endswith(MANIFEST))
    assert [Path(k).parent.name for k in published] == [f"checkpoint-{s}" for s in (2, 4, 6, 8)]
    assert not [k for k in s3.fs.find("bucket/fleet/run-fixed") if "checkpoint-10" in k]
    fixed = _download(s3, out + "/checkpoint-6", tmp_path / "fixed-6")
    assert max_logit_error(LLAMA, fixed, "checkpoint-2") <= load_case(LLAMA)["tolerance"]


def test_threads_of_one_worker_load_rng_states_at_once():
    """A Dask worker with several threads repairs several checkpoints in one process: the numpy globals one
    thread allows for a legacy rng_state.pth must not be taken away by another thread finishing its own load
    (torch's allow-list is per process; it failed about 1 load in 100 before the loads were serialised)."""
    import importlib
    import threading

    from ckpt_migrate.formats.pickles import load_weights_only

    numpy_globals = importlib.import_module("ckpt_migrate.migrations.m0004_portable_rng_state")._numpy_safe_globals
    path = LLAMA / "run" / "checkpoint-2" / "rng_state.pth"
    failures: list[str] = []

    def load_many() -> None:
        for _ in range(50):
            try:
                load_weights_only(path, allowed=numpy_globals())
            except Exception as exc:  # noqa: BLE001 - counted, then asserted
                failures.append(str(exc))

    threads = [threading.Thread(target=load_many) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []


MIXED = {  # one run folder, one layout per checkpoint (peft 0.12 fixtures)
    "checkpoint-2": LLAMA / "run" / "checkpoint-2",  # one adapter at the top
    "checkpoint-4": LAYOUTS / "llama_named_adapter" / "run" / "checkpoint-2",  # in a subfolder
    "checkpoint-6": LAYOUTS / "llama_two_adapters" / "run" / "checkpoint-2",  # at the top and in a subfolder
    "checkpoint-8": LAYOUTS / "llama_fp16" / "run" / "checkpoint-2",  # fp16
    "checkpoint-10": FIXTURES / "bert_bin" / "run" / "checkpoint-2",  # adapter_model.bin
}


def test_run_of_mixed_layouts_in_a_bucket_is_planned_and_written_as_on_disk(s3, tmp_path):
    """inspect of the run and fix of it to a bucket give what the local run gives: the same report, and outputs
    with the same sha256 (the manifests compared file by file)."""
    from ckpt_migrate import api
    from ckpt_migrate.render import to_dict

    run = tmp_path / "run"
    for name, checkpoint in MIXED.items():
        shutil.copytree(checkpoint, run / name)
    src = put(s3, run, "mixed/run")
    local = json.dumps(to_dict(api.inspect(run))).replace(str(run), src)
    assert json.dumps(to_dict(api.inspect(src))) == local
    remote = api.fix(src, "s3://bucket/mixed/fixed", progress=False)
    on_disk = api.fix(run, tmp_path / "fixed", progress=False)
    assert remote.exit_code == on_disk.exit_code
    assert [(c.relative, c.status) for c in remote.checkpoints] == [(c.relative, c.status) for c in on_disk.checkpoints]
    written = [c.relative for c in on_disk.checkpoints if c.output is not None]
    assert len(written) == len(MIXED)
    for name in written:
        ours = json.loads(s3.fs.cat_file(f"bucket/mixed/fixed/{name}/{MANIFEST}"))
        theirs = json.loads((tmp_path / "fixed" / name / MANIFEST).read_text())
        assert ours["outputs_sha256"] == theirs["outputs_sha256"], name
        assert ours["migrations_applied"] == theirs["migrations_applied"], name


def test_run_with_an_adapter_at_its_top_and_checkpoints_is_refused_remotely(s3, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(LLAMA / "run", run)
    for file in (LLAMA / "run" / "checkpoint-2").iterdir():
        shutil.copy(file, run / file.name)
    src = put(s3, run, "top-and-checkpoints/run")
    code, _, stderr = run_cli("fix", src, "--out", "s3://bucket/top-and-checkpoints/fixed")
    assert code == 5
    line = _one_line(stderr)
    assert src in line and "holds an adapter at its top and checkpoint-* directories" in line
    assert not s3.fs.exists("bucket/top-and-checkpoints/fixed")


# ------------------------------------------------------------------------------------- a worker lost mid-repair


def _kill_mid_upload(s3, key: str, start: Callable[[], subprocess.Popen]) -> tuple[subprocess.Popen, int]:
    """Start a fix and SIGKILL the process uploading ``key`` (bucket-relative) while its PUT is held at the
    server: after the staging marker and before the manifest. Which process: the pid the marker names."""
    held = s3.hold("PUT", key)
    process = start()
    try:
        assert held.reached.wait(timeout=180), "the upload was never reached"
        marker = f"{key.rpartition('/')[0]}/.ckpt-migrate-staging"
        pid = json.loads(s3.fs.cat_file(marker))["pid"]
        os.kill(pid, signal.SIGKILL)
        if pid == process.pid:
            process.wait()
    finally:
        held.release.set()
    return process, pid


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


def test_a_lost_worker_is_retried_or_reported_and_the_rerun_resumes(s3, tmp_path):
    """Two worker processes; the one uploading checkpoint-4 is SIGKILLed mid-upload. With Dask's default
    allowed-failures its task runs again and the fleet completes; with none allowed the checkpoint is
    reported failed (exit 7), nothing of it published, and re-running completes it."""
    from distributed import Client, LocalCluster

    src = put(s3, LLAMA / "run", "lost/run")
    with (
        LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster,
        Client(cluster) as client,
    ):
        executor = "dask://" + cluster.scheduler_address.removeprefix("tcp://")
        workers = set(client.run(os.getpid).values())
        weights = "checkpoint-4/adapter_model.safetensors"

        out = "s3://bucket/lost/retried"
        process, killed = _kill_mid_upload(s3, f"bucket/lost/retried/{weights}", lambda: _fleet(src, out, executor))
        assert killed in workers  # a Dask worker's process, not the CLI's
        stdout, stderr = process.communicate(timeout=300)
        assert process.returncode == 0, stderr
        assert _statuses(stdout) == {"checkpoint-2": "written", "checkpoint-4": "written"}
        assert _published(s3, "bucket/lost/retried") == ["checkpoint-2", "checkpoint-4"]
        assert not s3.fs.exists("bucket/lost/retried/checkpoint-4/.ckpt-migrate-staging")

        client.wait_for_workers(2, timeout=60)  # the nanny restarted the killed one
        client.run_on_scheduler(_allow_no_failure)
        out = "s3://bucket/lost/reported"
        process, killed = _kill_mid_upload(s3, f"bucket/lost/reported/{weights}", lambda: _fleet(src, out, executor))
        stdout, stderr = process.communicate(timeout=300)
        assert process.returncode == 7, stderr
        assert _statuses(stdout) == {"checkpoint-2": "written", "checkpoint-4": "failed"}
        lines = [line for line in stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and "Traceback" not in stderr, stderr
        assert f"{src}/checkpoint-4: failed: " in lines[0] and "worker was lost" in lines[0]
        assert "re-run to resume" in lines[0]
        assert _published(s3, "bucket/lost/reported") == ["checkpoint-2"]  # its partial upload: no manifest

        client.wait_for_workers(2, timeout=60)
        process = _fleet(src, out, executor)
        stdout, stderr = process.communicate(timeout=300)
        assert process.returncode == 0, stderr
        # the one published before is skipped, and written, not proven (no base model), as the earlier run said
        assert _statuses(stdout) == {"checkpoint-2": "written", "checkpoint-4": "written"}
        assert "already written into" in stdout
        assert _published(s3, "bucket/lost/reported") == ["checkpoint-2", "checkpoint-4"]
    for prefix in ("bucket/lost/retried/checkpoint-4", "bucket/lost/reported/checkpoint-4"):
        _assert_objects_are_what_the_manifest_names(s3, prefix)


def _assert_objects_are_what_the_manifest_names(s3, prefix: str) -> None:
    """Nothing of a killed worker's upload is left beside what the retry published: every object but the
    manifest is an output the manifest names, with its sha256 (the logits are checked by the other tests)."""
    s3.fs.invalidate_cache()
    manifest = json.loads(s3.fs.cat_file(f"{prefix}/{MANIFEST}"))
    objects = {k.removeprefix(prefix + "/"): k for k in s3.fs.find(prefix)}
    assert set(objects) == set(manifest["outputs_sha256"]) | {MANIFEST}
    for name, digest in manifest["outputs_sha256"].items():
        assert hashlib.sha256(s3.fs.cat_file(objects[name])).hexdigest() == digest, name


# ------------------------------------------------------------------------------------- killed, then re-run


def test_killed_fix_publishes_nothing_and_the_rerun_succeeds(s3, tmp_path):
    src = put(s3, LLAMA / "run" / "checkpoint-2", "kill/run/checkpoint-2")
    out = "s3://bucket/kill/fixed"
    command = [sys.executable, "-m", "ckpt_migrate", "fix", src, "--out", out, "--quiet"]
    process, _ = _kill_mid_upload(
        s3, "bucket/kill/fixed/adapter_model.safetensors", lambda: subprocess.Popen(command, stderr=subprocess.DEVNULL)
    )
    assert process.returncode == -signal.SIGKILL
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
    fixed = _download(s3, out, tmp_path / "fixed")
    assert max_logit_error(LLAMA, fixed, "checkpoint-2") <= load_case(LLAMA)["tolerance"]


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


@pytest.mark.parametrize(("name", "source"), [("one-checkpoint", "checkpoint-2"), ("run", ".")])
def test_out_prefix_holding_other_objects_is_refused_untouched(s3, name, source):
    """A run or a single checkpoint into an --out prefix that holds something else: refused (exit 6), nothing
    written there, nothing removed."""
    src = _join_url(put(s3, LLAMA / "run", f"hostile/busy-{name}/run"), source)
    out = f"bucket/hostile/busy-{name}/out"
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
