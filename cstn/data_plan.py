"""Which micro-batches a rank trains on: the run's data layout, kept across a change of world size.

A run's training data is defined by the world it started with: ``V`` data ranks, each reading its
own stream of batches (its part of the split, its shuffle and flips, seeded by its rank), and ``A``
micro-batches per stream and optimizer step, so an optimizer step averages the gradients of the
``S = V x A`` micro-batches ``(a, v)``, taken in the order ``j = a V + v``.

Resumed on ``W`` ranks, rank ``r`` trains on the slots ``j`` with ``j % W == r`` (``S / W`` of them:
its gradient accumulation becomes ``S / W``). It opens the streams those slots come from (stream
``j % V``) and consumes each stream in order, including the batches of the slots another rank
trains on (decoded and dropped: only when ``W`` does not divide ``V``). Every optimizer step then
averages the gradients of exactly the same micro-batches, each with the same BatchNorm batch, as
the original world did: the weights follow the uninterrupted run up to float summation order.
Not carried over: random draws inside the model's forward (Hide-and-Seek, CutMix, ADL, which use
the rank's own generator) and the BatchNorm running statistics (averaged over ranks after each
step, updated in sequence under accumulation); neither changes what the optimizer sees in a
plain CSTN or CAM run.

Refused, with what to pass: ``S`` not divisible by ``W``; a global batch or micro-batch that
differs from the checkpoint's; ZeRO stage 1 or 2 on another world size (their optimizer state is
partitioned by rank; DeepSpeed's universal checkpoint would be the conversion route).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["DataPlan", "plan_for"]


@dataclass(frozen=True)
class DataPlan:
    """The data layout (``data_world`` V, ``data_accum`` A) seen from real rank ``rank`` of ``world``."""

    data_world: int
    data_accum: int
    world: int
    rank: int

    @property
    def slots(self) -> int:
        """Micro-batches per optimizer step, over all ranks (``S = V x A``)."""
        return self.data_world * self.data_accum

    @property
    def accum(self) -> int:
        """This rank's micro-batches per optimizer step (``S / W``): DeepSpeed's gradient accumulation."""
        return self.slots // self.world

    def mine(self, slot: int) -> bool:
        return slot % self.world == self.rank

    @staticmethod
    def stream(slot: int, data_world: int) -> int:
        return slot % data_world

    @property
    def hosted(self) -> list[int]:
        """The data ranks whose streams this rank reads (for its own slots)."""
        return sorted({slot % self.data_world for slot in range(self.slots) if self.mine(slot)})


def plan_for(world: int, rank: int, micro: int, accum: int, zero_stage: int, checkpoint: dict | None) -> tuple:
    """``(DataPlan, note, problem)`` for a fresh run (``checkpoint`` None) or a resumed one.

    ``checkpoint``: its ``meta.json`` (``world_size``, and since world-size changes are supported
    ``data_world``, ``data_accum``, ``micro_batch``, ``zero_stage``). ``note`` says what was adjusted,
    ``problem`` why the resume is refused (then the plan is None).
    """
    if checkpoint is None or "data_world" not in checkpoint and checkpoint.get("world_size", world) == world:
        return DataPlan(world, accum, world, rank), "", ""
    data_world = int(checkpoint.get("data_world", checkpoint.get("world_size", world)))
    data_accum = int(checkpoint.get("data_accum", accum))
    ckpt_micro = int(checkpoint.get("micro_batch", micro))
    ckpt_world = int(checkpoint.get("world_size", data_world))
    slots = data_world * data_accum
    was = (f"the checkpoint was written by {ckpt_world} rank(s) with a global batch of {slots * ckpt_micro} "
           f"({data_world} data rank(s) x accumulation {data_accum} x micro-batch {ckpt_micro})")
    if micro != ckpt_micro:
        return None, "", (f"{was}; this job's data.batch_size is {micro}: pass data.batch_size={ckpt_micro} "
                          f"(the micro-batch is part of the run)")
    if world == ckpt_world and accum * world != slots:
        return None, "", (f"{was}; this job would train with a global batch of {accum * world * micro}: pass "
                          f"train.grad_accum={slots // world} to keep the run's")
    if world != ckpt_world and int(checkpoint.get("zero_stage", zero_stage)) > 0:
        return None, "", (f"{was} under ZeRO stage {checkpoint.get('zero_stage', zero_stage)}, whose optimizer state "
                          f"is partitioned over its {ckpt_world} ranks; this job has {world}: resume it on "
                          f"{ckpt_world} ranks (or convert it to a DeepSpeed universal checkpoint first)")
    if slots % world:
        fits = [w for w in range(1, slots + 1) if slots % w == 0]
        return None, "", (f"{was}; {world} ranks cannot share its {slots} micro-batches per step evenly: use "
                          f"{' or '.join(map(str, fits))} ranks")
    plan = DataPlan(data_world, data_accum, world, rank)
    note = ""
    if world != ckpt_world or plan.accum != accum:
        note = (f"{was}; this job has {world} rank(s): gradient accumulation {plan.accum} keeps the global batch "
                f"and the data order")
    return plan, note, ""
