"""Processes and collectives: rank/world/device from torchrun or srun, all-reduce, barrier, pre-emption flag."""
import datetime
import os
import signal

import torch
import torch.distributed as dist


def setup_distributed(timeout_s):
    """(rank, world, local_rank, local_world, device) from torchrun (RANK...) or srun (SLURM_PROCID...);
    NCCL on CUDA, gloo on CPU; plain `python train.py` is world 1."""
    env = os.environ
    if "RANK" in env:
        rank, world, local_rank = int(env["RANK"]), int(env["WORLD_SIZE"]), int(env["LOCAL_RANK"])
        local_world = int(env.get("LOCAL_WORLD_SIZE", world))
    elif int(env.get("SLURM_NTASKS", "1")) > 1:
        rank, world, local_rank = int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env["SLURM_LOCALID"])
        local_world = int(env.get("SLURM_NTASKS_PER_NODE", "1").split("(")[0])
        env.setdefault("MASTER_ADDR", env.get("SLURM_LAUNCH_NODE_IPADDR", "127.0.0.1"))
        env.setdefault("MASTER_PORT", "29500")
    else:
        rank, world, local_rank, local_world = 0, 1, 0, 1
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=timeout_s),
                                device_id=device if device.type == "cuda" else None)
    return rank, world, local_rank, local_world, device


def all_reduce(tensor, op=dist.ReduceOp.SUM):
    """In-place sum (or op) over ranks; a no-op in a single process."""
    if dist.is_initialized():
        dist.all_reduce(tensor, op)
    return tensor


def broadcast_buffers(module, src=0):
    """Every rank takes rank src's buffers (BatchNorm running statistics): each rank's last forward updated
    its own, and evaluation and checkpoints must agree with what rank 0 saves."""
    if dist.is_initialized():
        for buffer in module.buffers():
            dist.broadcast(buffer, src)


def broadcast_module(module, src=0):
    """Every rank takes rank src's parameters and buffers (e.g. the selected checkpoint rank src loaded)."""
    if dist.is_initialized():
        for tensor in [*module.parameters(), *module.buffers()]:
            dist.broadcast(tensor.data, src)


def barrier():
    if dist.is_initialized():
        dist.barrier()


class Preemption:
    """SIGTERM (SLURM pre-emption) asks every rank to checkpoint and exit cleanly.

    A signal may reach one rank only, so ranks agree through an all-reduce of the flag that poll() starts at
    one call and reads at the next: every rank learns of it within one step, and no step waits for it. The
    flag travels on the CPU (gloo), so reading it never synchronises the GPU's stream. Every rank must call
    poll() equally often.
    """

    def __init__(self):
        self.signalled = False
        self._pending = None
        self._group = None
        if dist.is_initialized() and dist.get_backend() != "gloo":
            self._group = dist.new_group(backend="gloo")
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
            work.wait()
            agreed = bool(flag.item())
        flag = torch.tensor([float(self.signalled)])
        self._pending = (dist.all_reduce(flag, group=self._group, async_op=True), flag)
        return agreed

    def close(self):
        """Waits for the last all-reduce, so no collective is in flight when the process group goes away."""
        if self._pending is not None:
            self._pending[0].wait()
            self._pending = None
