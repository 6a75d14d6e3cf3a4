"""Functions run in two real processes (gloo) by test_ddp.py, and a callback its DDP runs add from the
command line; module level so that spawn (and the processes Lightning starts) can import them."""

from __future__ import annotations

import json
from pathlib import Path

import lightning
import torch
import torch.distributed as dist

from anomret.distributed import all_gather
from anomret.memory.labeled import LabeledBankBuilder
from anomret.metrics.evaluator import CategoryEvaluator
from anomret.metrics.gathered import GatheredEvaluation


def synthetic_rows(n: int = 9, size: int = 16, grid: int = 4, dim: int = 8) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    masks = torch.zeros(n, size, size)
    for i in range(0, n, 2):
        masks[i, 2 : 2 + i, 4:12] = 1
    labels = (masks.flatten(1).amax(1) > 0).long()
    return {
        "cls": torch.randn(n, dim, generator=generator),
        "patches": torch.randn(n, grid, grid, dim, generator=generator),
        "mask": masks,
        "label": labels,
        "score": torch.rand(n, generator=generator),
        "map": torch.rand(n, size, size, generator=generator),
        "category": ["a" if i % 3 else "b" for i in range(n)],
    }


def build_bank(
    rows: dict[str, torch.Tensor], indices: list[int], max_patch_entries: int | None
) -> LabeledBankBuilder:
    builder = LabeledBankBuilder(layer=0, max_patch_entries=max_patch_entries, seed=3)
    for start in range(0, len(indices), 2):  # batches of two rows
        chosen = torch.tensor(indices[start : start + 2])
        builder.add_arrays(
            rows["cls"][chosen], rows["patches"][chosen], rows["mask"][chosen], rows["label"][chosen], chosen
        )
    return builder


def evaluate(rows: dict[str, torch.Tensor], indices: list[int]) -> GatheredEvaluation:
    evaluation = GatheredEvaluation(CategoryEvaluator())
    for start in range(0, len(indices), 3):
        chosen = indices[start : start + 3]
        index = torch.tensor(chosen)
        evaluation.update(
            index,
            [rows["category"][i] for i in chosen],
            rows["score"][index],
            rows["label"][index],
            rows["map"][index],
            rows["mask"][index],
        )
    return evaluation


def rank_shares(n: int, world: int) -> list[list[int]]:
    """Strided shares as DistributedSampler makes them, padded by repeating the first rows."""
    total = -(-n // world) * world
    padded = list(range(n)) + list(range(total - n))
    return [padded[rank::world] for rank in range(world)]


def worker(rank: int, world: int, port: int, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        rows = synthetic_rows()
        share = rank_shares(len(rows["cls"]), world)[rank]
        # The padded share, as a repeating sampler would give it: the merge keeps each image once.
        builder = build_bank(rows, share, max_patch_entries=5)
        builder.load_states(all_gather(builder.state()))
        bank = builder.build({})
        result = evaluate(rows, share).compute()
        torch.save(
            {
                name: getattr(bank, name)
                for name in ("image_keys", "image_values", "patch_keys", "patch_values")
            },
            Path(out_dir) / f"bank{rank}.pt",
        )
        (Path(out_dir) / f"result{rank}.json").write_text(json.dumps(result.to_dict()))
    finally:
        dist.destroy_process_group()


class TrainedStateDump(lightning.Callback):
    """Writes each process's trainable state when training starts and ends (``rank{R}-{start,end}.pt``
    under ``directory``), so a test can compare the processes of a DDP run with each other and with the
    checkpoint that rank 0 wrote. Added to a run from the command line, as a user adds a callback:
    ``+callbacks.state_dump._target_=tests.integration.ddp_workers.TrainedStateDump
    +callbacks.state_dump.directory=DIR``."""

    def __init__(self, directory: str) -> None:
        self.directory = Path(directory)

    def _dump(self, trainer: lightning.Trainer, module: lightning.LightningModule, moment: str) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        # The module's own state_dict leaves out the frozen encoder and text tower, as its checkpoints do.
        state = {name: tensor.detach().cpu().clone() for name, tensor in module.state_dict().items()}
        torch.save(state, self.directory / f"rank{trainer.global_rank}-{moment}.pt")

    def on_train_start(self, trainer: lightning.Trainer, module: lightning.LightningModule) -> None:
        self._dump(trainer, module, "start")

    def on_train_end(self, trainer: lightning.Trainer, module: lightning.LightningModule) -> None:
        self._dump(trainer, module, "end")
