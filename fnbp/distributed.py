"""Several processes training one model: ``jax.distributed``, set up from arguments or the
environment.

One process runs per host (or per GPU); :func:`initialize` joins them before anything uses
JAX, then ``jax.devices()`` lists every process's devices, :func:`fnbp.data_mesh` lays one
mesh over all of them and :func:`fnbp.fit` trains data parallel across the processes: every
process runs the same program on the same training set, each of its devices gathers and
computes its own rows of every global batch, and XLA all-reduces the gradient sums between
them (on CPU through gloo, the collectives jax 0.10.2 uses by default there:
``jax_cpu_collectives_implementation="gloo"``).

Where the settings come from, first found first:

==================  =============================  ============================================
setting             argument                       environment variable
==================  =============================  ============================================
coordinator         ``coordinator="HOST:PORT"``    ``JAX_COORDINATOR_ADDRESS`` (jax reads it too)
process count       ``num_processes=N``            ``JAX_NUM_PROCESSES`` (fnbp's; jax reads none)
this process        ``process_id=I`` (0 … N−1)     ``JAX_PROCESS_ID`` (fnbp's; jax reads none)
==================  =============================  ============================================

and, with ``cluster=``, jax's own detection fills in what is left from a cluster's
environment: ``"slurm"`` (``SLURM_JOB_ID``, ``SLURM_STEP_NODELIST``, ``SLURM_NTASKS``,
``SLURM_PROCID``, ``SLURM_LOCALID``; the port from the job id, or ``JAX_COORDINATOR_PORT``),
``"ompi"`` (Open MPI's ``OMPI_MCA_orte_hnp_uri``, ``OMPI_COMM_WORLD_SIZE``,
``OMPI_COMM_WORLD_RANK``), ``"mpi4py"`` (any MPI, through the ``mpi4py`` package), or
``"auto"`` (the first of Open MPI, Slurm, Cloud TPU and Kubernetes that is present). Under
Slurm and Open MPI, jax also restricts each process to one GPU, its local rank.

Nothing is initialized when none of these is given: a single process, as before.

jax's preemption service (``jax_enable_preemption_service``, on by default) installs its own
SIGTERM handler when it starts, in C++ and unseen by Python's ``signal.getsignal``: a handler
for SIGTERM must be installed after :func:`initialize` (``fnbp train`` does so).

What jax does on failure, measured with jax 0.10.2 on CPU: a process that cannot register
with the coordinator within the timeout is aborted (SIGABRT, exit code 134, ``DEADLINE_EXCEEDED
… RegisterTask`` on stderr), not given a Python exception; a process whose peer dies is
aborted the same way once the coordination service notices.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Mapping
from typing import NamedTuple

import jax
import numpy as np

ENV_VARS = {
    "coordinator": "JAX_COORDINATOR_ADDRESS",
    "num_processes": "JAX_NUM_PROCESSES",
    "process_id": "JAX_PROCESS_ID",
}
# jax 0.10.2's cluster_detection_method names for CPU and GPU clusters; "auto": jax's default
# order (Open MPI, Slurm, Cloud TPU, Kubernetes; mpi4py only when asked for by name).
CLUSTERS = ("auto", "slurm", "ompi", "mpi4py")
# The variables jax 0.10.2 detects each of those clusters by (all of them must be set; it reads
# the process count and index from the last ones). Asked for by name and absent, jax logs an
# error and then fails on a KeyError, so resolve() checks them first.
CLUSTER_VARS = {
    "slurm": ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID",
              "SLURM_LOCALID"),
    "ompi": ("OMPI_MCA_orte_hnp_uri", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK",
             "OMPI_COMM_WORLD_LOCAL_RANK"),
}  # fmt: skip


class Launch(NamedTuple):
    """How this process joins the others (:func:`resolve`); ``None`` fields are left for jax's
    cluster detection to fill in."""

    coordinator: str | None  # "HOST:PORT" of process 0's coordination service
    num_processes: int | None
    process_id: int | None  # 0 … num_processes − 1
    cluster: str | None  # None: no detection; else one of CLUSTERS


def resolve(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    cluster: str | None = None,
    environ: Mapping[str, str] | None = None,
    names: Mapping[str, str] | None = None,
) -> Launch | None:
    """The settings :func:`initialize` would use, checked, from the arguments and then the
    environment variables of :data:`ENV_VARS`; ``None`` when neither gives any and there is no
    ``cluster``: a single process.

    Arguments:
        coordinator: ``"HOST:PORT"``: the address of process 0 and a free port on it.
        num_processes: the number of processes N ≥ 1.
        process_id: this process's index, ``0 ≤ I < N``.
        cluster: ``None`` (every setting must be given), or one of :data:`CLUSTERS`: jax
            detects those not given from the cluster's environment.
        environ: the environment to read (``os.environ`` by default).
        names: how errors name the arguments (the CLI passes its flags:
            ``{"coordinator": "--coordinator", …}``).

    Raises:
        ValueError: naming the argument or environment variable, what was expected and what
            came: a coordinator that is not ``HOST:PORT`` with a port 1 … 65535, a count that
            is not an int ≥ 1, an index outside ``0 … N−1``, an unknown cluster or one whose
            variables (:data:`CLUSTER_VARS`; for mpi4py the package) are missing, or, without
            a cluster, a setting that neither the arguments nor the environment give.
    """
    environ = os.environ if environ is None else environ
    names = {**{k: k for k in (*ENV_VARS, "cluster")}, **(names or {})}
    if cluster is not None:
        _check_cluster(cluster, environ, names["cluster"])
    given = {}  # setting: (value, where it came from)
    for field, value in (("coordinator", coordinator), ("num_processes", num_processes),
                         ("process_id", process_id)):  # fmt: skip
        if value is not None:
            given[field] = (value, names[field])
        elif environ.get(ENV_VARS[field], "").strip():
            given[field] = (environ[ENV_VARS[field]].strip(), ENV_VARS[field])
    if not given and cluster is None:
        return None
    values = {
        "coordinator": _address(*given["coordinator"]) if "coordinator" in given else None,
        "num_processes": _count(*given["num_processes"], 1, "the number of processes")
        if "num_processes" in given else None,
        "process_id": _count(*given["process_id"], 0, "this process's index")
        if "process_id" in given else None,
    }  # fmt: skip
    n, i = values["num_processes"], values["process_id"]
    if n is not None and i is not None and i >= n:
        raise ValueError(
            f"{given['process_id'][1]} must be 0 to {n - 1} (one index per process, "
            f"{given['num_processes'][1]} {n}), got {i}"
        )
    missing = [f for f in ENV_VARS if values[f] is None]
    if missing and cluster is None:
        raise ValueError(
            "several processes need a coordinator address, a process count and this process's "
            f"index; missing: {', '.join(f'{names[f]} (or {ENV_VARS[f]})' for f in missing)}; "
            f"or pass {names['cluster']} to detect them from a cluster's environment (Slurm, "
            "Open MPI)"
        )
    return Launch(**values, cluster=cluster)


def _check_cluster(cluster: str, environ: Mapping[str, str], name: str) -> None:
    """A ValueError unless ``cluster`` is one of :data:`CLUSTERS` that jax can detect here."""
    if cluster not in CLUSTERS:
        raise ValueError(f"{name} must be one of {CLUSTERS}, got {cluster!r}")
    unset = [v for v in CLUSTER_VARS.get(cluster, ()) if v not in environ]
    if unset:
        raise ValueError(
            f"{name} {cluster}: jax detects such a job by {', '.join(CLUSTER_VARS[cluster])}, "
            f"but {', '.join(unset)} {'is' if len(unset) == 1 else 'are'} not set (start every "
            f"process with {'srun' if cluster == 'slurm' else 'mpirun'}), or give the "
            "coordinator, the number of processes and this process's index instead"
        )
    if cluster == "mpi4py" and importlib.util.find_spec("mpi4py") is None:
        raise ValueError(f"{name} mpi4py needs the mpi4py package (pip install mpi4py)")


def _address(value, source: str) -> str:
    """``value`` if it is ``"HOST:PORT"`` with a port 1 … 65535, else a ValueError."""
    host, _, port = str(value).strip().rpartition(":")
    if not (isinstance(value, str) and host and port.isdigit() and 1 <= int(port) <= 65535):
        raise ValueError(
            f"{source} must be HOST:PORT (process 0's address and a free port on it, e.g. "
            f"10.0.0.1:1234), got {value!r}"
        )
    return value.strip()


def _count(value, source: str, least: int, what: str) -> int:
    """``value`` (an int, or the text of one from the environment) if it is ≥ ``least``."""
    if isinstance(value, str):
        try:
            value = int(value)
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < least:
        raise ValueError(f"{source} must be an int ≥ {least} ({what}), got {value!r}")
    return int(value)


def initialize(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    cluster: str | None = None,
    timeout: int = 300,
    environ: Mapping[str, str] | None = None,
) -> bool:
    """Join this process to the others with ``jax.distributed.initialize``, when the
    arguments, the environment or ``cluster`` ask for it (see :func:`resolve`); call it in
    every process before anything uses JAX.

    CPU devices get cross-process collectives: gloo over TCP (jax 0.10.2's default; set here
    when ``jax_cpu_collectives_implementation`` is unset, left alone otherwise: "mpi" stays).

    Arguments:
        coordinator, num_processes, process_id, cluster, environ: as in :func:`resolve`.
        timeout: seconds to wait for every process to register with the coordinator (jax
            aborts the process after it).

    Returns:
        ``True`` when this is now one of several processes (``jax.process_count()`` of them;
        also when jax was initialized already with the same settings), ``False`` when nothing
        asked for it (nothing done: a single process).

    Raises:
        ValueError: see :func:`resolve`; or jax is already initialized with other settings,
            or ``cluster`` detects nothing it needs.
        RuntimeError: from jax, if something already used JAX in this process.
    """
    launch = resolve(coordinator, num_processes, process_id, cluster=cluster, environ=environ)
    if launch is None:
        return False
    if jax.distributed.is_initialized():
        have = (jax.process_count(), jax.process_index())
        want = (launch.num_processes, launch.process_id)
        if any(w is not None and w != h for w, h in zip(want, have, strict=True)):
            raise ValueError(
                f"jax.distributed is initialized already as process {have[1]} of {have[0]}, "
                f"not as process {want[1]} of {want[0]}"
            )
        return True
    if jax.config.jax_cpu_collectives_implementation is None:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    detection = "deactivate" if cluster is None else (None if cluster == "auto" else cluster)
    try:
        jax.distributed.initialize(
            launch.coordinator, launch.num_processes, launch.process_id,
            cluster_detection_method=detection, initialization_timeout=timeout,
        )  # fmt: skip
    except ValueError as e:  # what detection left undefined
        raise ValueError(
            f"cluster={cluster!r} detected no cluster environment that gives what is missing "
            f"({e}); pass coordinator, num_processes and process_id"
        ) from None
    return True


def is_main() -> bool:
    """Whether this is process 0, the one that writes files (always, in a single process)."""
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Wait until every process has come here (under the same ``name``); nothing in a
    single process."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def gathered(values) -> np.ndarray:
    """Every process's ``values`` (the same shape everywhere), stacked: ``(P, *shape)``, the
    same on every process; ``values[None]`` in a single process. For decisions every process
    must take alike (a check that fails on one and not another would leave the others waiting
    in a collective)."""
    values = np.asarray(values)
    if jax.process_count() == 1:
        return values[None]
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(values))
