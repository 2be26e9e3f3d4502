"""How the processes of one stage-2 run work together. The trainer asks a `Ranks` object and never
torch.distributed: `Alone` for one process (every collective the identity), `Torchrun` for the
ranks torchrun starts (DistributedDataParallel for the gradients, all_reduce for the logged
numbers, rank 0 for every file). `ranks_for(device)` gives the one that applies."""

from __future__ import annotations

from contextlib import nullcontext

import torch

from kava_common import KavaError


def ranks_for(device: torch.device) -> "Alone":
    """`Torchrun` when a process group is running (kava_common.launch.init_distributed), else `Alone`."""
    import torch.distributed as dist
    return Torchrun(device) if dist.is_available() and dist.is_initialized() else Alone()


class Alone:
    """One process: nothing to exchange, no one to wait for."""
    rank, world = 0, 1

    def deal(self, batches: list[list[int]], n_samples: int, batch_size: int) -> list[list[int]]:
        """This process's micro-batches of an epoch: all of them."""
        return batches

    def wrap(self, trainer, in_graph: list | None = None):
        """What computes a micro-batch's loss and parts: the trainer's own forward."""
        return trainer.forward

    def runs_empty(self, last: bool) -> bool:
        """Whether a micro-batch with no sample left must still run a backward: never alone."""
        return False

    def accumulating(self, last: bool):
        """The context of a micro-batch's backward (`last`: the step's last one)."""
        return nullcontext()

    def combine(self, parts: dict, counts: dict, weights: list[float], new_rows: list[int]) -> list[int]:
        """The step's logged numbers over every process (in place) and the samples any of them
        newly left out: here, this one's."""
        return new_rows

    def any(self, flag: bool) -> bool:
        """Whether `flag` holds on any process."""
        return flag

    def barrier(self) -> None:
        pass

    def gather(self, obj) -> list | None:
        """Every process's `obj`, in rank order, on rank 0 (None on the others)."""
        return [obj]

    def on_main(self, fn, default=None):
        """fn() on rank 0 (its result; `default` on the others), the others waiting until it is done."""
        return fn()

    def close(self) -> None:
        pass


def deal(batches: list[list[int]], rank: int, world: int, n_samples: int, batch_size: int) -> list[list[int]]:
    """An epoch's micro-batches dealt round-robin to `world` ranks; the last few that would not
    give every rank one are left out, so each optimizer step averages world x grad_accum of them."""
    if len(batches) < world:
        raise KavaError(f"{n_samples} training samples make {len(batches)} micro-batch(es) of --batch-size "
                        f"{batch_size}, fewer than the {world} torchrun ranks, each of which needs one: lower "
                        "--batch-size or the number of ranks")
    return batches[:len(batches) - len(batches) % world][rank::world]


class Torchrun(Alone):
    """The ranks of a torchrun launch. Collectives reduce tensors on the trainer's device (NCCL
    reduces CUDA tensors only)."""
    PARTS = ("loss", "loss_kv", "loss_ce", "loss_kd", "loss_cot", "loss_hidden")   # averaged over the ranks
    COUNTS = ("tokens", "samples", "kd_dropped", "kd_skipped")  # summed

    def __init__(self, device: torch.device):
        import torch.distributed as dist
        self.dist, self.device = dist, device
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.ddp = None

    def deal(self, batches, n_samples, batch_size):
        return deal(batches, self.rank, self.world, n_samples, batch_size)

    def wrap(self, trainer, in_graph=None):
        """The student and the projectors in DistributedDataParallel: gradients averaged over
        the ranks in buckets during the backward of each step's last micro-batch; no
        device_ids, so the batch reaches the step as the loader gave it (the step moves what it
        needs to the device itself). Which trainable parameters a step leaves out of its graph
        follows from the settings alone (kv_weight 0, a layer weight of 0, the relation loss
        leave projectors out), so one sample's graph (`in_graph`, by default
        `parameters_in_graph(trainer)`) tells whether DDP must search for unused parameters on
        every backward (a walk of the graph, and PyTorch's note when it finds none)."""
        from torch.nn.parallel import DistributedDataParallel
        in_graph = parameters_in_graph(trainer) if in_graph is None else in_graph
        self.ddp = DistributedDataParallel(_MicroBatch(trainer.model, trainer.distiller, trainer.forward, in_graph),
                                           device_ids=None, find_unused_parameters=len(in_graph) < len(trainer.params),
                                           gradient_as_bucket_view=True)
        return self.ddp

    def runs_empty(self, last):
        """DistributedDataParallel averages in the backward of the last micro-batch, which every
        rank therefore runs, with a zero loss if it has no sample left."""
        return last

    def accumulating(self, last):
        return nullcontext() if last else self.ddp.no_sync()

    def combine(self, parts, counts, weights, new_rows):
        """In place: the logged loss parts averaged over the ranks (each rank's finite check then
        sees the same loss), the counts and the teacher weights' sums summed. Samples any rank
        left out are returned to every rank, so that rank 0 reports and counts them all; they
        are exchanged only in a step that found one."""
        t = torch.tensor([parts[k] for k in self.PARTS] + [float(counts[k]) for k in self.COUNTS]
                         + [float(len(new_rows))] + list(weights), device=self.device, dtype=torch.float64)
        self.dist.all_reduce(t)
        got = t.tolist()
        rows = []
        if got[len(self.PARTS) + len(self.COUNTS)] > 0:
            every = [None] * self.world
            self.dist.all_gather_object(every, new_rows)
            rows = sorted(set().union(*every))
        for k, v in zip(self.PARTS, got):
            parts[k] = v / self.world
        for k, v in zip(self.COUNTS, got[len(self.PARTS):]):
            counts[k] = int(round(v))
        weights[:] = got[len(self.PARTS) + len(self.COUNTS) + 1:]
        return rows

    def any(self, flag):
        """A stop asked of one process stops them all at the same step."""
        t = torch.tensor([float(flag)], device=self.device)
        self.dist.all_reduce(t, op=self.dist.ReduceOp.MAX)
        return bool(t.item())

    def barrier(self):
        self.dist.barrier()

    def gather(self, obj):
        got = [None] * self.world if self.rank == 0 else None
        self.dist.gather_object(obj, got, dst=0)
        return got

    def on_main(self, fn, default=None):
        out = fn() if self.rank == 0 else default
        self.barrier()
        return out

    def close(self):
        """Release DistributedDataParallel, which holds the process group, once training is over
        (its module refers back to the trainer, so without this only the garbage collector would
        free it)."""
        self.ddp = None


def parameters_in_graph(trainer) -> list[torch.nn.Parameter]:
    """The trainable parameters in the graph of one sample's loss (no backward is run; the random
    number generators are left as they were)."""
    with torch.random.fork_rng(devices=[trainer.device] if trainer.device.type == "cuda" else []):
        used = graph_parameters(trainer.forward(trainer.first_sample())[0])
    return [p for p in trainer.params if id(p) in used]


def graph_parameters(loss: torch.Tensor) -> set[int]:
    """ids of the leaf tensors whose gradients the backward of `loss` would accumulate."""
    found, seen, todo = set(), set(), [loss.grad_fn]
    while todo:
        fn = todo.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        if hasattr(fn, "variable"):                     # AccumulateGrad: a leaf
            found.add(id(fn.variable))
        todo.extend(f for f, _ in fn.next_functions)
    return found


class _MicroBatch(torch.nn.Module):
    """The student and the projectors as one module whose forward is the trainer's, for
    DistributedDataParallel: it sees every trainable parameter, and a forward before each
    backward even where the step goes around the model's own forward (`ce_chunk`). A batch with
    no sample left gives a zero loss that reaches every parameter a step's graph holds."""

    def __init__(self, model, distiller, forward, in_graph: list):
        super().__init__()
        self.model, self.distiller = model, distiller
        self._forward, self._in_graph = forward, in_graph

    def forward(self, batch):
        if batch.get("empty"):
            return sum(p.view(-1)[0] for p in self._in_graph) * 0.0, {}
        return self._forward(batch)
