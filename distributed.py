"""Processes and collectives: rank/world/device from torchrun or srun, the process group, every collective the
project runs, and the pre-emption flag.

No other file calls torch.distributed (a test checks it): NCCL, and any group with a CUDA-only backend, refuses
host tensors ("No backend type associated with device type cpu") while gloo on a CPU accepts anything, so a CPU
test cannot catch a host tensor handed to a collective. Here every helper moves its tensor to the group's
communication device itself and gives the result back on the caller's device.
"""
import collections
import datetime
import os
import signal

import torch
import torch.distributed as dist

from labels import UserError

SUM, MAX, MIN = dist.ReduceOp.SUM, dist.ReduceOp.MAX, dist.ReduceOp.MIN
# The device collectives of the default group run on, and --dist-timeout, which every group takes (set by
# setup_distributed): torch gives a group created without a timeout its own default of 30 minutes.
_comm = {"device": torch.device("cpu"), "timeout": None}
# This process's place in a run, built once (train.setup) and passed whole: the resolved config, its device, its
# rank among world ranks and local_rank among local_world on its node. Run(cfg, device) is a single process.
Run = collections.namedtuple("Run", "cfg device rank world local_rank local_world", defaults=(0, 1, 0, 1))


def _ranks_from_env(env):
    """(rank, world, local_rank, local_world) from torchrun's or srun's variables; 0, 1, 0, 1 otherwise."""
    if "RANK" in env:
        world = int(env["WORLD_SIZE"])
        return int(env["RANK"]), world, int(env["LOCAL_RANK"]), int(env.get("LOCAL_WORLD_SIZE", world))
    if int(env.get("SLURM_NTASKS", "1")) > 1:
        env.setdefault("MASTER_ADDR", env.get("SLURM_LAUNCH_NODE_IPADDR", "127.0.0.1"))
        env.setdefault("MASTER_PORT", "29500")
        return (int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env["SLURM_LOCALID"]),
                int(env.get("SLURM_NTASKS_PER_NODE", "1").split("(")[0]))
    return 0, 1, 0, 1


def backend_devices(backend):
    """Device types a process-group backend string serves: "nccl" -> {cuda}, "gloo" -> {cpu, cuda},
    "cuda:gloo" -> {cuda}, "cpu:gloo,cuda:nccl" -> {cpu, cuda}."""
    types = set()
    for part in backend.lower().split(","):
        device, _, name = part.strip().rpartition(":")
        if device:
            types.add(device)
        else:
            types |= {"cuda"} if name == "nccl" else {"cpu", "cuda"}
    return types


def comm_device(backend, device):
    """Where a collective's tensors must be: the rank's own device when the backend serves it, else the CPU."""
    types = backend_devices(backend)
    if device.type in types:
        return device
    if "cpu" in types:
        return torch.device("cpu")
    raise UserError(f"--dist-backend {backend}: serves only {', '.join(sorted(types))} tensors, but this rank "
                    f"runs on {device.type}; use --dist-backend auto")


def setup_distributed(timeout_s, backend="auto"):
    """(rank, world, local_rank, local_world, device) from torchrun (RANK...) or srun (SLURM_PROCID...); the
    process group is NCCL on CUDA and gloo on CPU unless backend names another (e.g. cuda:gloo, which runs
    several ranks on one GPU under NCCL's device rule); plain `python train.py` is world 1."""
    rank, world, local_rank, local_world = _ranks_from_env(os.environ)
    if torch.cuda.is_available():
        # Where Slurm shows each task only its own GPU, every local rank sees device 0.
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    backend = ("nccl" if device.type == "cuda" else "gloo") if backend == "auto" else backend
    if world > 1:
        if backend == "nccl" and local_world > torch.cuda.device_count():
            raise UserError(f"NCCL cannot run {local_world} ranks on {torch.cuda.device_count()} GPU(s) of one node "
                            "(it refuses two ranks on one GPU); start at most one rank per GPU, or pass "
                            "--dist-backend cuda:gloo to test several ranks on one GPU")
        _comm["device"], _comm["timeout"] = comm_device(backend, device), datetime.timedelta(seconds=timeout_s)
        dist.init_process_group(backend, rank=rank, world_size=world, timeout=_comm["timeout"],
                                device_id=device if backend == "nccl" else None)
    return rank, world, local_rank, local_world, device


def new_group(backend):
    """A group of every rank on another backend, failing a stuck collective after --dist-timeout like the default
    group."""
    return dist.new_group(backend=backend, timeout=_comm["timeout"])


def world_size():
    return dist.get_world_size() if dist.is_initialized() else 1


class PeerLost(RuntimeError):
    """A collective that did not complete: another rank died, was stopped or hung past --dist-timeout."""


def _peer_lost(exc):
    """The PeerLost that a collective's failure exc means."""
    cause = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return PeerLost(f"a collective did not complete ({cause.split('] ')[-1]}): another rank died, was stopped or "
                    "hung longer than --dist-timeout; its own log says why")


def _completed(collective, *args, **kwargs):
    """collective(*args, **kwargs), whose failure (gloo raises RuntimeError, NCCL DistBackendError, both after
    --dist-timeout or when a peer's connection closes) becomes PeerLost, which the entry point reports in one
    line instead of a C++ stack in every surviving rank's log."""
    try:
        return collective(*args, **kwargs)
    except torch.OutOfMemoryError:
        raise
    except RuntimeError as exc:
        raise _peer_lost(exc) from None


def as_peer_lost(exc):
    """PeerLost for a failure of the collectives this file does not run (DistributedDataParallel's gradient
    all-reduce in the backward and its buffer broadcast in the forward): NCCL's DistBackendError, or a
    RuntimeError out of gloo's transport (its message names gloo's source file); None for any other error."""
    gloo = isinstance(exc, RuntimeError) and "/gloo/" in str(exc).split("\n", 1)[0]
    return _peer_lost(exc) if isinstance(exc, dist.DistBackendError) or gloo else None


def _in_place(tensor, collective):
    """Runs collective(t) on tensor, or on a copy on the communication device that is copied back."""
    if dist.is_initialized():
        moved = tensor if tensor.device == _comm["device"] else tensor.to(_comm["device"])
        _completed(collective, moved)
        if moved is not tensor:
            tensor.copy_(moved)
    return tensor


def all_reduce(tensor, op=SUM):
    """In-place sum (or op) over ranks, on any device the caller keeps it on; a no-op in a single process."""
    return _in_place(tensor, lambda t: dist.all_reduce(t, op))


def broadcast(tensor, src=0):
    """In-place: every rank takes rank src's values, on any device the caller keeps the tensor on."""
    return _in_place(tensor, lambda t: dist.broadcast(t, src))


def broadcast_buffers(module, src=0):
    """Every rank takes rank src's buffers (BatchNorm running statistics): each rank's last forward updated
    its own, and evaluation and checkpoints must agree with what rank 0 saves."""
    for buffer in module.buffers():
        broadcast(buffer, src)


def broadcast_module(module, src=0):
    """Every rank takes rank src's parameters and buffers (e.g. the selected checkpoint rank src loaded)."""
    for tensor in [*module.parameters(), *module.buffers()]:
        broadcast(tensor.data, src)


def barrier():
    if dist.is_initialized():
        _completed(dist.barrier)


def teardown():
    if dist.is_initialized():
        dist.destroy_process_group()


class Preemption:
    """SIGTERM (SLURM pre-emption) asks every rank to checkpoint and exit cleanly.

    A signal may reach one rank only, so ranks agree through an all-reduce of the flag that poll() starts at
    one call and reads at the next: every rank learns of it within one step, and no step waits for it. The
    flag travels on the CPU (a gloo group of its own where the default group is not gloo), so reading it never
    synchronises the GPU's stream. Every rank must call poll() equally often.
    """

    def __init__(self):
        self.signalled = False
        self._pending = None
        self._group = None
        if dist.is_initialized() and dist.get_backend() != "gloo":
            self._group = new_group("gloo")
        signal.signal(signal.SIGTERM, self._on_signal)

    def _on_signal(self, *_):
        self.signalled = True

    def poll(self):
        """True once any rank has been signalled (under DDP one call after the signal at the latest)."""
        if not dist.is_initialized():
            return self.signalled
        agreed = False
        if self._pending is not None:
            work, flag = self._pending
            _completed(work.wait)
            agreed = bool(flag.item())
        flag = torch.tensor([float(self.signalled)])
        self._pending = (_completed(dist.all_reduce, flag, group=self._group, async_op=True), flag)
        return agreed

    def close(self):
        """Waits for the last all-reduce, so no collective is in flight when the process group goes away."""
        if self._pending is not None:
            work, self._pending = self._pending[0], None
            _completed(work.wait)
