"""Tests for fnbp/distributed.py and training across processes: the settings (arguments, then
the environment), the CLI's options, and real runs of two processes on the loopback address,
each with two forced CPU devices (jax's CPU collectives: gloo), against one process with four.
"""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import chex
import numpy as np
import pytest
from helpers import forced_devices_flags

from fnbp import distributed
from fnbp.cli import main
from fnbp.distributed import Launch, resolve

# ----------------------------------------------------------------------------------------------
# resolve: where the settings come from, and what it refuses


def test_resolve_without_any_setting_is_a_single_process():
    assert resolve(environ={}) is None
    assert resolve(environ={"JAX_NUM_PROCESSES": " "}) is None  # blank: not given


def test_resolve_reads_the_environment_and_arguments_win_over_it():
    env = {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "4",
           "JAX_PROCESS_ID": "3"}  # fmt: skip
    assert resolve(environ=env) == Launch("10.0.0.1:1234", 4, 3, None)
    assert resolve("[::1]:99", 2, 1, environ=env) == Launch("[::1]:99", 2, 1, None)
    assert resolve(process_id=0, environ=env) == Launch("10.0.0.1:1234", 4, 0, None)


SLURM = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "node[01-04]", "SLURM_NTASKS": "4",
         "SLURM_PROCID": "2", "SLURM_LOCALID": "0"}  # fmt: skip


def test_resolve_with_a_cluster_leaves_what_is_not_given_to_jaxs_detection():
    assert resolve(cluster="slurm", environ=SLURM) == Launch(None, None, None, "slurm")
    assert resolve(num_processes=8, cluster="auto", environ={}) == Launch(None, 8, None, "auto")


@pytest.mark.parametrize(
    "kwargs, env, match",
    [
        ({"coordinator": "localhost"}, {}, "coordinator must be HOST:PORT .*got 'localhost'"),
        ({"coordinator": "host:0"}, {}, "coordinator must be HOST:PORT .*got 'host:0'"),
        ({"coordinator": "host:65536"}, {}, "coordinator must be HOST:PORT"),
        ({}, {"JAX_COORDINATOR_ADDRESS": ":1234"}, "JAX_COORDINATOR_ADDRESS must be HOST:PORT"),
        ({"num_processes": 0}, {}, "num_processes must be an int ≥ 1 .*got 0"),
        ({"num_processes": 2.0}, {}, "num_processes must be an int ≥ 1 .*got 2.0"),
        ({}, {"JAX_NUM_PROCESSES": "two"}, "JAX_NUM_PROCESSES must be an int ≥ 1 .*got 'two'"),
        ({"process_id": -1}, {}, "process_id must be an int ≥ 0 .*got -1"),
        ({"process_id": True}, {}, "process_id must be an int ≥ 0 .*got True"),
        ({"coordinator": "h:1", "num_processes": 2, "process_id": 2}, {},
         r"process_id must be 0 to 1 \(one index per process, num_processes 2\), got 2"),
        ({"num_processes": 2}, {"JAX_PROCESS_ID": "5"}, "JAX_PROCESS_ID must be 0 to 1"),
        ({"coordinator": "h:1"}, {}, r"missing: num_processes \(or JAX_NUM_PROCESSES\), "
         r"process_id \(or JAX_PROCESS_ID\); or pass cluster"),
        ({"cluster": "pbs"}, {}, "cluster must be one of .*got 'pbs'"),
        ({"cluster": "slurm"}, {k: v for k, v in SLURM.items() if k != "SLURM_PROCID"},
         "cluster slurm: jax detects such a job by SLURM_JOB_ID, .*but SLURM_PROCID is not set "
         r"\(start every process with srun\)"),
        ({"cluster": "ompi"}, {}, "cluster ompi: .*but OMPI_MCA_orte_hnp_uri, .* are not set"),
    ],
)  # fmt: skip
def test_resolve_refuses_bad_settings_naming_where_they_came_from(kwargs, env, match):
    with pytest.raises(ValueError, match=match):
        resolve(**kwargs, environ=env)


def test_initialize_does_nothing_without_settings(monkeypatch):
    for var in distributed.ENV_VARS.values():
        monkeypatch.delenv(var, raising=False)
    assert distributed.initialize() is False
    assert distributed.is_main()
    assert distributed.gathered([3, 4]).tolist() == [[3, 4]]
    distributed.barrier("nothing to wait for")


# ----------------------------------------------------------------------------------------------
# the CLI's options: refused before anything is written or joined


@pytest.fixture
def no_join(monkeypatch, tmp_path):
    """No JAX_* settings from outside, an empty current folder, and no real join: these
    commands must fail before jax.distributed.initialize, which would wait for peers."""
    for var in distributed.ENV_VARS.values():
        monkeypatch.delenv(var, raising=False)

    def refuse(*args, **kwargs):
        raise AssertionError("jax.distributed.initialize must not be reached")

    monkeypatch.setattr(distributed, "initialize", refuse)
    monkeypatch.chdir(tmp_path)
    return monkeypatch


JOINED = ["--coordinator", "127.0.0.1:1234", "--num-processes", "2"]


@pytest.mark.parametrize(
    "args, env, match",
    [
        ([*JOINED, "--process-id", "2", "--out", "run"], {},
         r"--process-id must be 0 to 1 \(one index per process, --num-processes 2\), got 2"),
        (["--coordinator", "localhost", "--num-processes", "2", "--process-id", "0",
          "--out", "run"], {}, "--coordinator must be HOST:PORT"),
        (["--num-processes", "2", "--process-id", "0", "--out", "run"], {},
         r"missing: --coordinator \(or JAX_COORDINATOR_ADDRESS\)"),
        (["--out", "run"], {"JAX_NUM_PROCESSES": "zero"},
         "JAX_NUM_PROCESSES must be an int ≥ 1 .*got 'zero'"),
        ([*JOINED, "--process-id", "0"], {}, "several processes write one run folder: give --out"),
    ],
    ids=["id-too-big", "no-port", "no-coordinator", "env-count", "no-out"],
)  # fmt: skip
def test_train_bad_process_options_exit_2_with_one_line_and_write_nothing(
    no_join, tmp_path, capsys, args, env, match
):
    for var, value in env.items():
        no_join.setenv(var, value)
    rc = main(["train", "--epochs", "1", "--no-progress", *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and err[0].startswith("fnbp: error:"), err
    assert re.search(match, err[0]), err[0]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "args, match",
    [
        (["--num-processes", "0"], "--num-processes: must be > 0"),
        (["--process-id", "one"], "--process-id: invalid int value: 'one'"),
        (["--cluster", "pbs"], "--cluster: invalid choice: 'pbs'"),
    ],
)
def test_train_bad_process_arguments_exit_2_via_argparse(no_join, capsys, args, match):
    with pytest.raises(SystemExit) as e:
        main(["train", "--no-progress", "--out", "run", *args])
    assert e.value.code == 2
    assert match in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# two processes on 127.0.0.1, each with 2 forced CPU devices, against one process with 4

# `fnbp train` across two processes: 5 epochs of 14 steps (1437 // 96), a checkpoint every 7.
CLI = ["train", "--sizes", "64,32,10", "--epochs", "5", "--batch-size", "96",
       "--checkpoint-every", "7", "--no-progress"]  # fmt: skip

# Each process runs this: `fnbp train` once per command in argv[2:] (JSON: {"argv": [...],
# "sigterm": P}), in this process, which the first command joins to the others:
# JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID make it one of two (without
# them it is a single process). With "sigterm": P, process P sends itself a SIGTERM once that
# run has its first checkpoint. It records what fit returned (its last finished call), which
# checkpoints and other files this process wrote itself (through fnbp's writers), what each
# command printed and, one of several, what fit must refuse.
_RUN = r"""
import contextlib, io, json, os, signal, sys, threading, time
from pathlib import Path
import numpy as np
from fnbp import checkpoint, report, train
from fnbp import io as fnbp_io
from fnbp.cli import main
root, commands = sys.argv[1], [json.loads(a) for a in sys.argv[2:]]
out = {"commands": [], "errors": {}}
save, fit, saves, written = checkpoint.save_checkpoint, train.fit, [], set()
checkpoint.save_checkpoint = lambda path, c: saves.append(path.name) or save(path, c)
atomic, save_json = fnbp_io._atomic_write_bytes, report.save_json
fnbp_io._atomic_write_bytes = lambda path, b: written.add(Path(path).name) or atomic(path, b)
report.save_json = lambda path, obj: written.add(Path(path).name) or save_json(path, obj)
def spy(*args, **kwargs):
    result = fit(*args, **kwargs)
    out["params"] = [{k: np.asarray(v).tolist() for k, v in layer.items()} for layer in result[0]]
    out["history"] = result[-1]
    return result
train.fit = spy
def sigterm_at_first_checkpoint(run):
    while checkpoint.latest_checkpoint(f"{run}/checkpoints") is None:
        time.sleep(0.02)
    os.kill(os.getpid(), signal.SIGTERM)
for command in commands:
    if command.get("sigterm") == int(os.environ.get("JAX_PROCESS_ID", "0")):
        run = command["argv"][command["argv"].index("--out") + 1]
        threading.Thread(target=sigterm_at_first_checkpoint, args=(run,), daemon=True).start()
    saves.clear()
    written.clear()
    with contextlib.redirect_stdout(io.StringIO()) as printed, \
         contextlib.redirect_stderr(io.StringIO()) as said:
        rc = main(command["argv"])
    out["commands"].append({"rc": rc, "stdout": printed.getvalue(), "stderr": said.getvalue(),
                            "saves": list(saves), "written": sorted(written)})
import jax, optax
import fnbp
from fnbp import data
out.update(processes=jax.process_count(), devices=jax.device_count())
def error(name, f):
    try:
        f()
    except ValueError as e:
        out["errors"][name] = str(e)
if jax.process_count() > 1:
    ds = data.load_digits(seed=0)
    model = fnbp.MLP((64, 32, 10), "relu", "softmax_cross_entropy")
    args = (model, optax.sgd(0.1), fnbp.init_params(jax.random.key(1), model, "he_normal"),
            ds.x_train, ds.y_train)
    common = dict(key=jax.random.key(0), epochs=1, batch_size=64, progress=False)
    error("no-mesh", lambda: fit(*args, **common))
    process_0 = [d for d in jax.devices() if d.process_index == 0]
    error("mesh-of-process-0", lambda: fit(*args, **common, mesh=fnbp.data_mesh(process_0)))
    error("3-devices", lambda: fnbp.data_mesh(3))
    own = f"{root}/run/checkpoints" if jax.process_index() == 0 else f"{root}/elsewhere"
    error("folders", lambda: fit(*args, **common, mesh=fnbp.data_mesh(), checkpoint_dir=own,
                                 resume=True))
with open(f"{root}/process-{jax.process_index()}.json", "w") as f:
    json.dump(out, f)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(devices: int, **extra) -> dict:
    """This environment without settings of jax.distributed or a cluster, on CPU, with
    ``devices`` forced CPU devices."""
    env = {k: v for k, v in os.environ.items()
           if k not in distributed.ENV_VARS.values() and not k.startswith(("SLURM_", "OMPI_"))}  # fmt: skip
    return {**env, "JAX_PLATFORMS": "cpu",
            "XLA_FLAGS": forced_devices_flags(devices), **extra}  # fmt: skip


def _start(commands: list[tuple[list[str], dict]], logs: Path) -> list[subprocess.Popen]:
    """Start each ``(argv, env)``, its output into ``logs/<i>.log``."""
    logs.mkdir(parents=True, exist_ok=True)
    procs = []
    for i, (argv, env) in enumerate(commands):
        with open(logs / f"{i}.log", "w") as log:
            procs.append(subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT,
                                          start_new_session=True))  # fmt: skip
    return procs


def _finish(procs, logs: Path, timeout: float = 240) -> None:
    """Wait for every process; all must exit 0 (their logs in the message otherwise)."""
    deadline = time.monotonic() + timeout
    try:
        for p in procs:
            p.wait(timeout=max(deadline - time.monotonic(), 1))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    failed = [i for i, p in enumerate(procs) if p.returncode != 0]
    assert not failed, "\n".join((logs / f"{i}.log").read_text()[-3000:] for i in failed)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """``(two, one, root of two, root of one)``: what each of two processes (2 devices each)
    recorded of their `fnbp train` (run folder ``<root>/run``) and of the same command that
    process 1 stops by a SIGTERM (``<root>/stopped``), and what one process with 4 devices, run
    beside them, recorded of the first command with ``--devices 4``."""
    two, one = tmp_path_factory.mktemp("two"), tmp_path_factory.mktemp("one")
    port = _free_port()
    commands = [json.dumps({"argv": [*CLI, "--out", str(two / "run")]}),
                json.dumps({"argv": [*CLI, "--out", str(two / "stopped")], "sigterm": 1})]  # fmt: skip
    pair = _start(
        [([sys.executable, "-c", _RUN, str(two), *commands],
          _env(2, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
               JAX_PROCESS_ID=str(i))) for i in range(2)],
        two / "logs",
    )  # fmt: skip
    command = json.dumps({"argv": [*CLI, "--devices", "4", "--out", str(one / "run")]})
    single = _start([([sys.executable, "-c", _RUN, str(one), command], _env(4))], one / "logs")
    _finish(pair, two / "logs")
    _finish(single, one / "logs")
    read = lambda root, i: json.loads((root / f"process-{i}.json").read_text())  # noqa: E731
    return [read(two, 0), read(two, 1)], read(one, 0), two, one


def _results(run: Path) -> tuple[dict, list]:
    """The params.npz and the metrics.jsonl records (less their seconds) of a run folder."""
    with np.load(run / "params.npz", allow_pickle=False) as f:
        params = {k: f[k] for k in f.files}
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return params, [{k: v for k, v in r.items() if k != "seconds"} for r in records]


def test_two_processes_of_two_devices_train_as_one_process_of_four(runs):
    (first, _), one, two_root, one_root = runs
    assert (first["processes"], first["devices"], one["processes"], one["devices"]) == (2, 4, 1, 4)
    assert first["commands"][0]["rc"] == one["commands"][0]["rc"] == 0
    (two_params, two_records), (one_params, one_records) = (
        _results(two_root / "run"), _results(one_root / "run"))  # fmt: skip
    steps = [14, 28, 42, 56, 70]
    assert [r["step"] for r in two_records] == [r["step"] for r in one_records] == steps
    # float32 rounding: the four devices' gradient sums are all-reduced in another order (gloo
    # between the processes, XLA within each) than in one process; five epochs of momentum SGD
    # keep that near 1e-7 relative (1e-6 atol for entries near 0)
    chex.assert_trees_all_close(two_params, one_params, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(two_records, one_records, rtol=1e-5, atol=1e-6)
    assert one_records[-1]["test_accuracy"] > 0.9  # it learned: the comparison means something
    config = json.loads((two_root / "run" / "config.json").read_text())
    assert (config["devices"], config["processes"], config["device_count"]) == ("all", 2, 4)


def test_every_process_gets_the_same_params_and_history_and_process_0_alone_writes(runs):
    (first, second), _, _, _ = runs
    assert first["params"] == second["params"]  # bit for bit
    clockless = lambda h: [{k: v for k, v in r.items() if k != "seconds"} for r in h]  # noqa: E731
    assert clockless(first["history"]) == clockless(second["history"])  # each its own clock
    printed = re.sub(r"[\d.]+ s\)", "s)", first["commands"][0]["stdout"])
    assert printed == re.sub(r"[\d.]+ s\)", "s)", second["commands"][0]["stdout"])
    assert printed.startswith("final test accuracy: ")
    assert first["commands"][0]["saves"] == [f"ckpt-{s:09d}.npz" for s in range(7, 71, 7)]
    assert first["commands"][0]["written"] == ["config.json", "metrics.jsonl", "params.npz"]
    assert second["commands"][0]["saves"] == second["commands"][0]["written"] == []


def test_sigterm_to_one_process_stops_every_process_at_the_same_chunk(runs):
    (first, second), _, root, _ = runs
    stopped = first["commands"][1], second["commands"][1]
    assert [c["rc"] for c in stopped] == [130, 143]  # process 1 got the SIGTERM
    said = [c["stderr"].strip().splitlines()[-1] for c in stopped]
    step = int(re.search(r"stopped after step (\d+);", said[1])[1])
    assert said[0].startswith(f"fnbp: another process was signalled: stopped after step {step};")
    assert said[1].startswith(f"fnbp: SIGTERM: stopped after step {step};")
    again = f"fnbp train --resume {root / 'stopped'} in every process, with its process options"
    assert said[0].endswith(again) and said[1].endswith(again)
    assert stopped[0]["saves"][-1] == f"ckpt-{step:09d}.npz"
    assert stopped[0]["written"] == ["config.json", "metrics.jsonl"]
    assert stopped[1]["saves"] == stopped[1]["written"] == []


def test_fit_across_processes_refuses_what_would_leave_a_process_out_in_every_process(runs):
    (first, second), _, _, _ = runs
    errors = first["errors"]
    assert errors.keys() == {"no-mesh", "mesh-of-process-0", "3-devices", "folders"}
    assert "jax runs 2 processes (jax.distributed), so fit needs a mesh" in errors["no-mesh"]
    assert "holds none of process 1" in errors["mesh-of-process-0"]
    assert "devices must be a multiple of the 2 processes" in errors["3-devices"]
    assert ("the processes find different checkpoints (process 0: 2 (newest step 70), process 1:"
            " 0 (newest step -1))") in errors["folders"]  # fmt: skip
    # each raised it alike, so none waits for the other (the folders' naming its own folder)
    same = lambda errors: {k: v.split(": ", 1)[-1] for k, v in errors.items()}  # noqa: E731
    assert same(first["errors"]) == same(second["errors"])


def test_resume_refuses_a_run_of_another_process_layout_and_changes_nothing(runs, no_join, capsys):
    run = runs[2] / "run"
    before = {p.name: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    rc = main(["train", "--resume", str(run), "--no-progress"])  # here: one process, one device
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].startswith("fnbp: error:"), err
    assert ("ckpt-000000070.npz: the checkpoint was written by 2 processes with 4 devices in all, "
            "this run has 1 process with 1 device in all; resume with the same layout") in err[-1]  # fmt: skip
    assert {p.name: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


def _cli_pair(root: Path, *argv: str, logs: str, slurm: bool = False) -> list[subprocess.Popen]:
    """`python -m fnbp.cli *argv` in two processes joined by the process options, or with
    ``slurm`` by ``--cluster slurm`` and the variables srun would set for two tasks on one node
    (jax reads the coordinator from the node list, the port from JAX_COORDINATOR_PORT)."""
    port = _free_port()
    joins = [(["--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id",
               str(i)], {}) for i in range(2)]  # fmt: skip
    if slurm:
        srun = {"SLURM_JOB_ID": "1", "SLURM_STEP_NODELIST": "127.0.0.1", "SLURM_NTASKS": "2",
                "JAX_COORDINATOR_PORT": str(port)}  # fmt: skip
        joins = [(["--cluster", "slurm"], {**srun, "SLURM_PROCID": str(i), "SLURM_LOCALID": str(i)})
                 for i in range(2)]  # fmt: skip
    return _start(
        [([sys.executable, "-m", "fnbp.cli", *argv, *join], _env(2, **env)) for join, env in joins],
        root / logs,
    )


def _wait_for_checkpoint(procs, out: Path, step: int) -> Path:
    """Poll until the run in ``out`` has a checkpoint of at least ``step`` steps (every
    process still running); that checkpoint."""
    from fnbp.checkpoint import latest_checkpoint

    deadline = time.monotonic() + 180
    while (newest := latest_checkpoint(out / "checkpoints")) is None or int(newest.stem[5:]) < step:
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs)
        time.sleep(0.02)
    return newest


def test_a_run_stopped_by_sigterm_then_kill_9_of_one_process_resumes_bitwise(tmp_path, runs):
    from fnbp.checkpoint import verify_checkpoint

    out = tmp_path / "run"
    shutil.copytree(runs[2] / "stopped", out)  # stopped by a SIGTERM to process 1 (above)
    step = int(sorted((out / "checkpoints").glob("ckpt-*.npz"))[-1].stem[5:])
    logs = lambda name, i: (tmp_path / name / f"{i}.log").read_text()  # noqa: E731
    # resumed, then a kill -9 of process 1 a chunk later
    procs = _cli_pair(tmp_path, "train", "--resume", str(out), "--no-progress", logs="killed")
    newest = _wait_for_checkpoint(procs, out, step + 7)
    procs[1].kill()  # SIGKILL: no handler runs
    procs[1].wait()
    # Process 0 is left waiting in the next all-reduce; jax aborts it once the coordination
    # service misses process 1's heartbeats (~100 s): the job's end, as a scheduler kills it.
    procs[0].kill()
    assert [p.wait() for p in procs] == [-signal.SIGKILL, -signal.SIGKILL]
    assert f"resuming {out} from ckpt-{step:09d}.npz" in logs("killed", 0)
    assert not (out / "params.npz").exists()  # it did not finish
    kept = sorted((out / "checkpoints").glob("ckpt-*.npz"))
    assert kept[-1].name >= newest.name
    for path in kept:
        verify_checkpoint(path)  # whole: written atomically by process 0
    # resumed again, as under srun (--cluster slurm: jax detects the rest from its variables)
    resumed = _cli_pair(tmp_path, "train", "--resume", str(out), "--no-progress", logs="resumed",
                        slurm=True)  # fmt: skip
    _finish(resumed, tmp_path / "resumed")
    assert all(f"resuming {out} from {kept[-1].name}" in logs("resumed", i) for i in range(2))
    (params, records), (want_params, want_records) = _results(out), _results(runs[2] / "run")
    assert params.keys() == want_params.keys()
    for k in params:
        np.testing.assert_array_equal(params[k], want_params[k], err_msg=k)  # bit for bit
    assert records == want_records
    assert not list((out / "checkpoints").glob(".*"))  # no temporary file left behind
