"""Defaults that come from the launcher and the environment: torchrun, a SLURM array, and
the folder variables that let one command line serve a laptop and a cluster.

Precedence everywhere: a flag (or a stage-2 YAML key) given by the user, then the
environment, then the built-in default.
"""

from __future__ import annotations

import os

# folder defaults a cluster job can set once for every command
ENV_PATHS = {
    "KAVA_CACHE_DIR": "root folder of stage-1 caches (stage 1 --out)",
    "KAVA_RUNS_DIR": "root folder of stage-2 runs (stage 2 --out is KAVA_RUNS_DIR/run)",
}


def launcher_part(env=None) -> tuple[int, int, str] | None:
    """(number of parts, this process's part, launcher) when a launcher started several
    processes: torchrun (WORLD_SIZE, RANK) or a SLURM job array (SLURM_ARRAY_TASK_COUNT,
    SLURM_ARRAY_TASK_ID counted from SLURM_ARRAY_TASK_MIN); None for a lone process."""
    env = os.environ if env is None else env
    try:
        if "WORLD_SIZE" in env and "RANK" in env:
            return int(env["WORLD_SIZE"]), int(env["RANK"]), "torchrun"
        if "SLURM_ARRAY_TASK_COUNT" in env and "SLURM_ARRAY_TASK_ID" in env:
            first = int(env.get("SLURM_ARRAY_TASK_MIN", 0))
            return int(env["SLURM_ARRAY_TASK_COUNT"]), int(env["SLURM_ARRAY_TASK_ID"]) - first, "SLURM array"
    except ValueError as e:
        raise ValueError(f"launcher environment: {e} (WORLD_SIZE/RANK or SLURM_ARRAY_TASK_* must be integers)") \
            from None
    return None


def stage1_defaults(given: dict, env=None) -> tuple[dict, list[str]]:
    """Stage-1 settings the launcher and environment supply where `given` has none, and one
    line per setting so taken (for the log)."""
    env = os.environ if env is None else env
    out, said = {}, []
    part = launcher_part(env)
    if part and "num_shards" not in given and "shard_index" not in given:
        n, i, who = part
        out.update(num_shards=n, shard_index=i)
        said.append(f"--num-shards {n} --shard-index {i} from {who}")
        local = env.get("LOCAL_RANK")
        if who == "torchrun" and local is not None and given.get("device", "auto") == "auto":
            out["device"] = f"cuda:{int(local)}" if _cuda() else "cpu"
            said.append(f"--device {out['device']} from LOCAL_RANK {local}")
    if "out" not in given and env.get("KAVA_CACHE_DIR"):
        out["out"] = env["KAVA_CACHE_DIR"]
        said.append(f"--out {out['out']} from KAVA_CACHE_DIR")
    return out, said


def stage2_out_default(env=None) -> str | None:
    """Stage 2's run folder from KAVA_RUNS_DIR, when set."""
    env = os.environ if env is None else env
    root = env.get("KAVA_RUNS_DIR")
    return os.path.join(root, "run") if root else None


def _cuda() -> bool:
    import torch
    return torch.cuda.is_available()


def init_distributed(device: str) -> tuple[int, int, str]:
    """(rank, world size, device) of this process. Under torchrun with WORLD_SIZE > 1 the
    process group is started (NCCL on GPUs, gloo on the CPU) and `auto` becomes this rank's GPU
    (LOCAL_RANK) or the CPU; a lone process gets (0, 1, device) and starts nothing."""
    import torch
    import torch.distributed as dist
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, device
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if cuda:
        device = f"cuda:{local}"
        torch.cuda.set_device(local)
    elif device == "auto":
        device = "cpu"
    if not dist.is_initialized():   # device_id binds NCCL to this rank's GPU (barrier() needs it)
        dist.init_process_group("nccl" if cuda else "gloo", device_id=torch.device(device) if cuda else None)
    return dist.get_rank(), dist.get_world_size(), device


def end_distributed() -> None:
    """End the process group `init_distributed` started, on each rank once its last collective
    is done; nothing in a lone process. Called after success only: after an error another rank
    may still wait in a collective, and the launcher ends it. Whatever holds the group
    (DistributedDataParallel's reducer) must be released first, which is why garbage
    reference cycles are collected here: a group that lives on until the interpreter shuts
    down can abort the process there, after its work is done (seen with gloo: SIGABRT,
    "terminate called without an active exception"). The barrier keeps a rank from tearing
    its connections down while another still exchanges its last collective over them (the
    same abort, rarely, in the 2-rank gloo test; PyTorch's own distributed tests wait at a
    barrier before destroy_process_group for the same reason)."""
    import gc
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()
