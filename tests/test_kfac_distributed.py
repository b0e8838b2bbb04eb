"""Two gloo ranks, each with half the data: all-reduced K-FAC factors, diagonal Fisher and
EK-FAC refit equal the single-process ones over the union of the data, on every rank."""
import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

import tp_eigendamage as ted


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 3 * 3, 3))


def make_data():
    g = torch.Generator().manual_seed(1)
    sizes = [3, 5, 4, 1]                     # unequal batches and totals per rank (7 / 6)
    return [(torch.randn(n, 3, 6, 6, generator=g), torch.randint(0, 3, (n,), generator=g))
            for n in sizes]


def _statistics(model, data):
    """K-FAC factors, diagonal Fisher and the EK-FAC refit of ``model`` over ``data``."""
    stats = ted.collect_kfac(model, data, fisher_type="empirical", progress=False)
    diag = ted.collect_fisher_diag(model, data, fisher_type="empirical", progress=False)
    out = {name: (stats[m].input_factor, stats[m].grad_factor, stats[m].input_mean, diag[m])
           for name, m in stats.names().items()}
    ted.to_kfe(model, stats, include_classifier=True)
    out["ekfac"] = tuple(ted.fit_eigen_correction(model, data, fisher_type="empirical",
                                                  progress=False).values())
    return out, (stats.num_examples, diag.num_examples)


def _worker(rank, world, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model = make_model()
        shard = make_data()[rank::world]
        torch.save(_statistics(model, shard), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_all_reduced_statistics_equal_single_process_union(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    ref, ref_n = _statistics(make_model(), make_data())
    for rank in range(2):
        got, n = torch.load(tmp_path / f"rank{rank}.pt")
        assert n == ref_n == (13, 13)
        assert got.keys() == ref.keys()
        for name in ref:
            for ours, theirs in zip(got[name], ref[name]):
                torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-7)
