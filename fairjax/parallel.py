"""Device mesh, parameter sharding rules, multi-host start-up and host-local -> global batches.

One `Mesh` with axes ``('data', 'fsdp', 'tensor')`` serves every model:

* parameters are placed by *sharding rules*: ``(regex, spec)`` pairs matched with
  ``re.search`` against the '/'-joined param path (``'down_blocks_1/attentions_0/.../to_q/kernel'``);
  the first match wins; ``spec`` is a ``PartitionSpec``-like tuple (``None``, an axis
  name, :data:`FSDP_IF_FITS`, or a tuple of axis names per dim).  The models ship rules for
  the ``tensor`` axis (:func:`tensor_rules`: attention q/k/v and MLP-in kernels split on their
  output dim, attention-out and MLP-down kernels on their input dim).  A param no rule matches
  is sharded FSDP style: over its largest dim divisible by the ``fsdp`` axis size; replicated
  if none is, or if it has fewer than ``fsdp_min_size`` elements (config key); never over the
  layer axis of a scanned stack (a path through ``transformer_blocks/``, ``layers/`` or
  ``blocks/``, :data:`fairjax.io.tree.STACKED`), which ``nn.scan`` slices.
* the batch is split over ``('data', 'fsdp')`` on its leading dim (both axes hold
  different examples; ``tensor`` holds copies).
* each process feeds its own contiguous slice of the global batch (process ``i`` of
  ``n`` holds rows ``[i*B/n, (i+1)*B/n)``) and
  ``jax.make_array_from_process_local_data`` stitches the global array.

Multi-host: call :func:`initialize_distributed` before anything touches a device.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from fairjax.errors import ShardingError
from fairjax.io.tree import STACKED, path_str

log = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")


# ----------------------------------------------------------------------------- start-up


def cache_root() -> str:
    """fairjax's cache folder: ``$FAIRJAX_CACHE_DIR``, else ``$XDG_CACHE_HOME/fairjax``, else ``~/.cache/fairjax``."""
    env = os.environ.get("FAIRJAX_CACHE_DIR")
    if env:
        return os.path.abspath(os.path.expanduser(env))
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "fairjax")


def enable_compilation_cache(directory: str | None = None) -> str | None:
    """Turn on JAX's persistent compilation cache so that a re-run (and every resume) loads the
    compiled train / sampling programs instead of compiling them again.

    The folder: ``directory``, else ``$JAX_COMPILATION_CACHE_DIR`` (JAX's own variable wins when
    set), else ``<cache_root()>/xla``. ``FAIRJAX_COMPILATION_CACHE=0`` turns it off. Programs that
    compile in under ``jax_persistent_cache_min_compile_time_secs`` (JAX's default, 1 s) are not
    stored. Returns the folder in use, or None when off. Call before the first compile; calling
    again is harmless.
    """
    if os.environ.get("FAIRJAX_COMPILATION_CACHE", "1").strip().lower() in ("0", "false", "no", "off"):
        return None
    import jax

    current = jax.config.jax_compilation_cache_dir
    folder = directory or os.environ.get("JAX_COMPILATION_CACHE_DIR") or current or os.path.join(cache_root(), "xla")
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        log.warning("compilation cache off: cannot create %s (%s)", folder, e.strerror or e)
        return None
    if not os.access(folder, os.W_OK):
        log.warning("compilation cache off: %s is not writable", folder)
        return None
    if current != folder:
        jax.config.update("jax_compilation_cache_dir", folder)
        try:  # JAX decides once per process whether the cache is used: make it look again
            from jax._src import compilation_cache

            compilation_cache.reset_cache()
        except (ImportError, AttributeError):  # pragma: no cover - a JAX without it reads the flag at each compile
            pass
    return folder


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    local_device_ids: Sequence[int] | None = None,
    cpu_collectives: str = "gloo",
    required: bool = True,
) -> bool:
    """Start the JAX multi-controller runtime (``jax.distributed.initialize``) before devices are used.

    Arguments left ``None`` come from the environment: ``FAIRJAX_COORDINATOR``
    (``host:port`` of process 0), ``FAIRJAX_NUM_PROCESSES``, ``FAIRJAX_PROCESS_ID``
    (the launch scripts in ``launch/`` set them).  With none of them,
    ``jax.distributed.initialize()`` auto-detects the cluster (Cloud TPU pod, SLURM,
    Open MPI, ...); when ``required`` is False that is only attempted if such a launcher's
    variables are present, so a plain single process stays single.  On the CPU backend
    cross-process collectives use ``cpu_collectives`` (gloo), set before initialisation.

    Returns True when the distributed runtime is initialised (now or before), False for
    a single process.  A failed start-up is a one-line :class:`ShardingError`.
    """
    env = os.environ
    coordinator_address = coordinator_address or env.get("FAIRJAX_COORDINATOR") or None
    if num_processes is None and env.get("FAIRJAX_NUM_PROCESSES"):
        num_processes = int(env["FAIRJAX_NUM_PROCESSES"])
    if process_id is None and env.get("FAIRJAX_PROCESS_ID"):
        process_id = int(env["FAIRJAX_PROCESS_ID"])
    if is_distributed_initialized():
        return True
    explicit = coordinator_address is not None or num_processes is not None or process_id is not None
    if num_processes == 1 and not coordinator_address:
        return False
    if not explicit and not required and not _cluster_detected(env):
        return False
    if cpu_collectives:
        jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    kwargs: dict[str, Any] = {}
    if coordinator_address:
        kwargs["coordinator_address"] = coordinator_address
    if num_processes is not None:
        kwargs["num_processes"] = num_processes
    if process_id is not None:
        kwargs["process_id"] = process_id
    if local_device_ids is not None:
        kwargs["local_device_ids"] = list(local_device_ids)
    try:
        jax.distributed.initialize(**kwargs)
    except Exception as e:  # noqa: BLE001 - turn any start-up failure into one actionable line
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise ShardingError(
            f"jax.distributed.initialize({', '.join(f'{k}={v!r}' for k, v in kwargs.items())}) failed: {first}; "
            "on a cluster launch with launch/*.sh, or set FAIRJAX_COORDINATOR=host:port, FAIRJAX_NUM_PROCESSES "
            "and FAIRJAX_PROCESS_ID"
        ) from None
    return True


def is_distributed_initialized() -> bool:
    try:
        return bool(jax.distributed.is_initialized())
    except AttributeError:  # older jax
        from jax._src import distributed

        return distributed.global_state.client is not None


def _cluster_detected(env: Mapping[str, str]) -> bool:
    """A multi-process launcher jax.distributed can auto-detect (no explicit coordinator given)."""
    if int(env.get("SLURM_NTASKS", "1") or 1) > 1 and "SLURM_JOB_ID" in env:
        return True
    if int(env.get("OMPI_COMM_WORLD_SIZE", "1") or 1) > 1:
        return True
    if env.get("TPU_WORKER_HOSTNAMES", "").count(",") >= 1 or env.get("MEGASCALE_COORDINATOR_ADDRESS"):
        return True
    return False


# ----------------------------------------------------------------------------- mesh


def mesh_shape(spec: Mapping[str, int], n_devices: int) -> dict[str, int]:
    """Resolve ``{data, fsdp, tensor}`` sizes; at most one ``-1`` takes the remaining devices.

    Missing axes default to 1.  The product must equal ``n_devices`` (a mesh larger than
    the devices, or one that leaves devices unused, is an error).
    """
    unknown = sorted(set(spec) - set(MESH_AXES))
    if unknown:
        raise ShardingError(f"mesh: unknown axis {unknown}; use only {list(MESH_AXES)}")
    sizes = {a: int(spec.get(a, 1)) for a in MESH_AXES}
    free = [a for a, s in sizes.items() if s == -1]
    bad = [a for a, s in sizes.items() if s == 0 or s < -1]
    if bad:
        raise ShardingError(f"mesh: axis {bad[0]}={sizes[bad[0]]} must be a positive size or -1")
    if len(free) > 1:
        raise ShardingError(f"mesh: only one axis may be -1, got {free}")
    fixed = int(np.prod([s for s in sizes.values() if s != -1]))
    if free:
        if n_devices % fixed:
            raise ShardingError(
                f"mesh: the fixed axes {_fmt(sizes)} (product {fixed}) do not divide the {n_devices} devices"
            )
        sizes[free[0]] = n_devices // fixed
    total = int(np.prod(list(sizes.values())))
    if total > n_devices:
        raise ShardingError(
            f"mesh {_fmt(sizes)} needs {total} devices but only {n_devices} are available; shrink the mesh or use -1"
        )
    if total != n_devices:
        raise ShardingError(
            f"mesh {_fmt(sizes)} uses {total} of the {n_devices} devices; make the product {n_devices} or use -1"
        )
    return sizes


def _fmt(sizes: Mapping[str, int]) -> str:
    return "x".join(f"{a}={sizes[a]}" for a in MESH_AXES if a in sizes)


def make_mesh(spec: Mapping[str, int] | None = None, devices: Sequence[Any] | None = None) -> Mesh:
    """A ``Mesh`` over all (global) devices with axes ``('data', 'fsdp', 'tensor')``.

    ``spec`` e.g. ``{'data': -1, 'fsdp': 1, 'tensor': 1}`` (the default: pure data parallel).
    Devices are laid out with ``jax.experimental.mesh_utils`` (inner axes ``tensor``,
    then ``fsdp`` on the fastest links; ``jax.devices()`` is process-major, so with
    several hosts the outer ``data`` axis is the one that crosses hosts).
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = mesh_shape(dict(spec or {"data": -1}), len(devices))
    shape = tuple(sizes[a] for a in MESH_AXES)
    try:
        from jax.experimental import mesh_utils

        arr = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
    except Exception:  # noqa: BLE001 - topologies mesh_utils cannot place: plain (process-major) order
        arr = np.asarray(devices, dtype=object).reshape(shape)
    return Mesh(arr, MESH_AXES)


# ----------------------------------------------------------------------------- params


def _norm_spec(spec: Any) -> P:
    if isinstance(spec, P):
        return spec
    if spec is None:
        return P()
    if isinstance(spec, str):
        return P(spec)
    return P(*[tuple(s) if isinstance(s, list) else s for s in spec])


def _axis_size(mesh: Mesh, entry: Any) -> int:
    if entry is None:
        return 1
    names = entry if isinstance(entry, tuple) else (entry,)
    return int(np.prod([mesh.shape[n] for n in names]))


#: a rule entry that shards its dim over ``fsdp`` only when that fits (the dim divides over the
#: ``fsdp`` axis and the param has at least ``min_size`` elements), and leaves it whole otherwise
FSDP_IF_FITS = "fsdp?"


def fsdp_spec(shape: Sequence[int], fsdp_size: int, axis: str = "fsdp", min_size: int = 0) -> P:
    """Default placement: shard the largest dim divisible by ``fsdp_size``; replicate otherwise, and
    replicate a param with fewer than ``min_size`` elements (sharding it would save nothing).

    Ties go to the last such dim (the output/feature dim of a Dense kernel or conv).
    """
    if fsdp_size <= 1 or not shape or int(np.prod(shape)) < min_size:
        return P()
    best = None
    for i, d in enumerate(shape):
        if d % fsdp_size == 0 and d >= fsdp_size and (best is None or d >= shape[best]):
            best = i
    if best is None:
        return P()
    spec: list[Any] = [None] * len(shape)
    spec[best] = axis
    return P(*spec)


def tensor_rules(column: Sequence[str], row: Sequence[str]) -> list[tuple[str, tuple]]:
    """Megatron-style rules for ``nn.Dense`` kernels ``(in, out)`` on the ``tensor`` axis, by module path regex:

    * ``column`` (attention q/k/v, MLP in): ``out`` split over ``tensor``, ``in`` over ``fsdp`` if it
      fits (:data:`FSDP_IF_FITS`); the bias split like ``out``;
    * ``row`` (attention out, MLP down): ``in`` split over ``tensor``, ``out`` over ``fsdp`` if it fits;
      the bias (whole ``out``, needed after the reduction) falls to the FSDP default.

    A column layer's output stays split over ``tensor`` into the row layer that consumes it, so a
    block needs one reduction over ``tensor``; XLA inserts it (the result is the unsplit one up to
    float summation order)."""
    rules: list[tuple[str, tuple]] = []
    for pat in column:
        rules += [(rf"{pat}/kernel$", (FSDP_IF_FITS, "tensor")), (rf"{pat}/bias$", ("tensor",))]
    for pat in row:
        rules.append((rf"{pat}/kernel$", ("tensor", FSDP_IF_FITS)))
    return rules


def param_spec(path: str, shape: Sequence[int], mesh: Mesh, rules: Sequence[tuple[str, Any]] = (),
               min_size: int = 0) -> P:
    """PartitionSpec of one param: the first rule whose regex ``re.search``-es ``path``, else FSDP
    (:func:`fsdp_spec` with ``min_size``).  A rule's :data:`FSDP_IF_FITS` entries become ``fsdp`` or
    ``None``; any other entry must divide its dim (else a one-line :class:`ShardingError`)."""
    fsdp = mesh.shape["fsdp"]
    stacked = len(shape) > 1 and any(k in STACKED for k in path.split("/")[:-1])  # (layers, ...) of a scanned stack
    for pattern, spec in rules:
        if re.search(pattern, path):
            spec = _norm_spec(spec)
            if stacked and len(spec) < len(shape):  # a rule written for one layer: the layer axis stays whole
                spec = P(None, *spec)
            if len(spec) > len(shape):
                raise ShardingError(
                    f"sharding rule {pattern!r} -> {tuple(spec)} has {len(spec)} dims but param {path} has shape {tuple(shape)}"
                )
            fits = fsdp > 1 and int(np.prod(shape)) >= min_size
            spec = P(*[("fsdp" if fits and d % fsdp == 0 else None) if e == FSDP_IF_FITS else e
                       for d, e in zip(shape, spec)])
            for d, entry in zip(shape, spec):
                n = _axis_size(mesh, entry)
                if d % n:
                    raise ShardingError(
                        f"sharding rule {pattern!r} -> {tuple(spec)} splits dim {d} of param {path} {tuple(shape)} "
                        f"{n} ways; change the rule"
                    )
            return spec
    if stacked:  # keep the layer axis whole: nn.scan slices it
        return P(None, *fsdp_spec(shape[1:], fsdp, min_size=min_size))
    return fsdp_spec(shape, fsdp, min_size=min_size)


def param_shardings(tree: Any, mesh: Mesh, rules: Sequence[tuple[str, Any]] = (), min_size: int = 0) -> Any:
    """``NamedSharding`` tree for a tree of arrays / ``ShapeDtypeStruct`` (see :func:`param_spec`)."""
    rules = [(str(r), s) for r, s in (rules or ())]

    def one(path, leaf):
        return NamedSharding(mesh, param_spec(path_str(path), np.shape(leaf), mesh, rules, min_size))

    return jax.tree_util.tree_map_with_path(one, tree)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


# ----------------------------------------------------------------------------- batch


def batch_spec() -> P:
    return P(BATCH_AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (example) dim split over ``('data', 'fsdp')``; other dims whole."""
    return NamedSharding(mesh, batch_spec())


def batch_shards(mesh: Mesh) -> int:
    return int(mesh.shape["data"] * mesh.shape["fsdp"])


def check_batch_size(global_batch: int, mesh: Mesh, multiple: int = 1) -> None:
    """One-line error unless ``global_batch`` splits evenly over data x fsdp (x ``multiple``)."""
    n = batch_shards(mesh)
    need = n * multiple
    if global_batch <= 0 or global_batch % need:
        extra = f" x {multiple} gradient-accumulation micro-batches" if multiple > 1 else ""
        raise ShardingError(
            f"global batch {global_batch} does not divide over data={mesh.shape['data']} x fsdp={mesh.shape['fsdp']}"
            f"{extra} = {need}; use a batch size that is a multiple of {need}"
        )


def host_batch_slice(global_batch: int, process_index: int | None = None, process_count: int | None = None) -> slice:
    """Rows of the global batch held by this process: a contiguous ``global_batch / n`` block."""
    i = jax.process_index() if process_index is None else process_index
    n = jax.process_count() if process_count is None else process_count
    if global_batch % n:
        raise ShardingError(f"global batch {global_batch} does not divide over {n} processes")
    per = global_batch // n
    return slice(i * per, (i + 1) * per)


def global_batch(local: Mapping[str, Any], mesh: Mesh, global_size: int | None = None) -> dict[str, jax.Array]:
    """Host-local numpy batch (this process's rows) -> global ``jax.Array`` dict sharded over the batch axes.

    Every entry must have the same leading size ``b_local``; the global leading size is
    ``b_local * process_count`` (checked against ``global_size`` when given).
    """
    sharding = batch_sharding(mesh)
    n_proc = jax.process_count()
    out = {}
    sizes = {k: np.shape(v)[0] if np.ndim(v) else None for k, v in local.items()}
    if any(s is None for s in sizes.values()):
        raise ShardingError(f"batch entries must have a leading example dim; scalars: {[k for k, s in sizes.items() if s is None]}")
    if len(set(sizes.values())) > 1:
        raise ShardingError(f"batch entries disagree on the leading (example) size: {sizes}")
    for k, v in local.items():
        v = np.asarray(v)
        g = v.shape[0] * n_proc
        if global_size is not None and g != global_size:
            raise ShardingError(
                f"batch[{k!r}] has {v.shape[0]} rows on each of {n_proc} processes = {g}, expected global batch {global_size}"
            )
        check_batch_size(g, mesh)
        out[k] = jax.make_array_from_process_local_data(sharding, v, (g,) + v.shape[1:])
    return out


def put_global(tree: Any, shardings: Any) -> Any:
    """Place a tree of host values (identical on every process) onto ``shardings``.

    Works on any number of processes: each process supplies only the shards its own
    devices hold (``jax.make_array_from_callback``).
    """

    def one(x, s):
        if isinstance(x, jax.Array) and x.is_fully_addressable is False:
            return jax.device_put(x, s)
        a = np.asarray(x)
        return jax.make_array_from_callback(a.shape, s, lambda idx: a[idx])

    return jax.tree.map(one, tree, shardings)
