"""Two ranks as two processes (no process group needed): exactly-once evaluation, equal training steps.

The test split has 22 samples: not divisible by world size 2 x eval batch 8 (ranks read 11 each,
batches of 8 + 3), nor, in training mode with batch 3, by 2 x 3 (3 full batches per rank, 2
samples of each range unused in an epoch).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BACKENDS = ("torch", "dali")


def run_rank(root: str, rank: int, world: int) -> dict:
    """What one rank sees, per backend: eval indices and batch sizes, train indices per epoch."""
    from pipeline.loader import build_loader
    from tests.loader_fixtures import tiny_config

    cfg = tiny_config(Path(root), image_size=32, eval_batch_size=8, batch_size=3, num_workers=2)
    out = {}
    for backend in BACKENDS:
        evaluation = build_loader(cfg, "test", rank, world, train=False, backend=backend)
        seen = [[int(i) for i in batch.indices] for batch in evaluation]
        train = build_loader(cfg, "test", rank, world, train=True, backend=backend)
        epochs = []
        for epoch in range(2):
            train.set_epoch(epoch)
            epochs.append([[int(i) for i in batch.indices] for batch in train])
        out[backend] = {"eval": seen, "eval_num_samples": evaluation.num_samples,
                        "eval_num_batches": evaluation.num_batches, "train": epochs,
                        "train_num_batches": train.num_batches}
    return out


@pytest.mark.timeout(180)
def test_two_rank_processes(tiny_shards, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, __file__, "--root", str(tiny_shards), "--rank", str(r),
                               "--world", "2", "--out", str(tmp_path / f"rank{r}.json")],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(2)]
    for p in procs:
        output, _ = p.communicate(timeout=170)
        assert p.returncode == 0, output
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    total = 22
    for backend in BACKENDS:
        per_rank = [r[backend] for r in ranks]
        # evaluation: the union, de-duplicated by index, is exactly the split, and nothing is read twice
        indices = [i for r in per_rank for batch in r["eval"] for i in batch]
        assert sorted(set(indices)) == list(range(total)), backend
        assert len(indices) == total, backend
        counts = [sum(len(b) for b in r["eval"]) for r in per_rank]
        assert counts == [r["eval_num_samples"] for r in per_rank] == [11, 11]
        assert [[len(b) for b in r["eval"]] for r in per_rank] == [[8, 3], [8, 3]], backend
        assert [r["eval_num_batches"] for r in per_rank] == [2, 2]
        # training: every rank runs the same number of full batches in every epoch
        for epoch in range(2):
            steps = [len(r["train"][epoch]) for r in per_rank]
            assert steps == [3, 3] == [r["train_num_batches"] for r in per_rank], (backend, epoch, steps)
            assert all(len(b) == 3 for r in per_rank for b in r["train"][epoch]), backend
        if backend == "torch":  # disjoint ranges within an epoch
            for epoch in range(2):
                rank0, rank1 = ({i for b in r["train"][epoch] for i in b} for r in per_rank)
                assert len(rank0) == len(rank1) == 9 and not rank0 & rank1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="one rank of test_two_rank_processes")
    parser.add_argument("--root", required=True)
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--world", type=int, required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    Path(args.out).write_text(json.dumps(run_rank(args.root, args.rank, args.world)))
