"""Data-parallel mask learning: 2 CPU processes under gloo learn identical masks; rank 0 alone writes."""

from __future__ import annotations

import multiprocessing
import os

import torch

from conftest import make_small_net
from helpers import export_graph


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist
    from safetensors.torch import save_file

    from sparsecompile.learned import TrainConfig, learn_gumbel_masks

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        x = torch.randn(2, 4, 8, 8)
        gm = export_graph(make_small_net(), x, dynamic_batch=True)
        calib = torch.randn(64, 4, 8, 8, generator=torch.Generator().manual_seed(5))
        result = learn_gumbel_masks(gm, calib, config=TrainConfig(max_steps=6, batch_size=16, eval_every=3),
                                    checkpoint_path=os.path.join(out_dir, "ckpt.safetensors"))
        save_file({k: v.to(torch.uint8).contiguous() for k, v in result.masks.items()},
                  os.path.join(out_dir, f"masks{rank}.safetensors"))
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_learn_identical_masks(tmp_path):
    from safetensors.torch import load_file

    context = multiprocessing.get_context("fork")
    world = 2
    procs = [context.Process(target=_worker, args=(rank, world, str(tmp_path / "init"), str(tmp_path)))
             for rank in range(world)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=120)
        assert proc.exitcode == 0
    first, second = load_file(str(tmp_path / "masks0.safetensors")), load_file(str(tmp_path / "masks1.safetensors"))
    assert first.keys() == second.keys() and first
    for key in first:
        assert torch.equal(first[key], second[key])
    assert (tmp_path / "ckpt.safetensors").exists()  # written once, by rank 0
