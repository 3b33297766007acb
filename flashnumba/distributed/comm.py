"""The ring's one communication pattern: pass tensors to the next rank, take the previous rank's.

    ring = Ring(group)
    (K_next, V_next), transfer = ring.pass_on(K_j, V_j)     # issued: in flight from here
    ...  the kernels of this step run on K_j, V_j ...
    transfer.wait()                                        # K_next, V_next have arrived

Every rank sends to rank + 1 and receives from rank - 1 (mod P, ranks of `group`)
with torch.distributed's point-to-point operations, issued together
(``batch_isend_irecv``) so that NCCL runs the sends and receives of all ranks as
one group and no rank waits on a send whose receive was not yet posted. The step's
kernels run between issuing and waiting: the next block is in flight while this one
computes. Works with NCCL (CUDA tensors) and gloo (CPU tensors).
"""

import torch
import torch.distributed as dist


class Transfer:
    """Point-to-point operations in flight; ``wait()`` returns when every one has completed."""

    def __init__(self, requests):
        self.requests = requests

    def wait(self):
        for request in self.requests:
            request.wait()


class Ring:
    """The ranks of `group` (None: the default group) in a ring: r sends to r + 1, receives from r - 1."""

    def __init__(self, group=None):
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("ring attention needs torch.distributed: call "
                               "torch.distributed.init_process_group first (nccl on GPUs, gloo on CPUs)")
        self.group = group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        if self.rank < 0:
            raise RuntimeError("this process is not a member of the group passed to ring attention")
        self.next = self._global((self.rank + 1) % self.world)
        self.prev = self._global((self.rank - 1) % self.world)

    def _global(self, group_rank):
        """The global rank the point-to-point operations address (they take global ranks)."""
        if self.group is None:
            return group_rank
        return dist.get_global_rank(self.group, group_rank)

    def pass_on(self, *tensors):
        """Send `tensors` to the next rank and receive as many of the same shapes from the previous
        one: returns (the receive buffers, a Transfer to wait on before reading them)."""
        tensors = [t.contiguous() for t in tensors]
        received = [torch.empty_like(t) for t in tensors]
        operations = [dist.P2POp(dist.isend, t, self.next, self.group) for t in tensors]
        operations += [dist.P2POp(dist.irecv, buffer, self.prev, self.group) for buffer in received]
        return received, Transfer(dist.batch_isend_irecv(operations))
