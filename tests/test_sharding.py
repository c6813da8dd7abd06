"""Row-wise sharding on 2 real gloo ranks against a single-process unsharded oracle:
forward outputs, losses, and rows/weights after several optimiser steps."""

from __future__ import annotations

import pytest
import torch

from flm_dist.sharding import TablePlan, describe_plan, plan_tables
from tests.dist import run_ranks

pytestmark = pytest.mark.slow

TOL = 1e-6


# ---------------------------------------------------------------- the embedding alone


def _embedding_cases(rank, world, n_examples):
    """Every rank draws the same examples (derandomized hypothesis, no shrinking), runs
    the sharded table on its own ids, and checks against the oracle it computes itself
    on all ranks' ids."""
    from hypothesis import Phase, given, settings
    from hypothesis import strategies as st

    from flm_dist.optim import RowWiseAdagrad
    from flm_dist.sharding import RowWiseEmbedding

    rows, dim = 37, 4
    ids_for_rank = st.lists(st.integers(0, rows - 1), min_size=0, max_size=12)
    # bias some examples toward one owner's block or heavy duplication
    owner_block = st.lists(st.integers(0, 18), min_size=1, max_size=12)
    dupes = st.lists(st.sampled_from([3, 3, 3, 36]), min_size=1, max_size=12)
    per_rank = st.one_of(ids_for_rank, owner_block, dupes)
    checked = []

    @settings(max_examples=n_examples, derandomize=True, deadline=None, phases=[Phase.explicit, Phase.generate], database=None)
    @given(st.lists(per_rank, min_size=world, max_size=world), st.integers(0, 2**31 - 1), st.booleans())
    def case(batches, seed, sgd):
        plan = TablePlan("row_wise", rows, dim, world)
        g = torch.Generator().manual_seed(seed)
        full = torch.randn(rows, dim, generator=g)
        weights = [torch.randn(len(b), dim, generator=g) for b in batches]
        lo, hi = plan.local_range(rank)
        shard = RowWiseEmbedding(plan, rank, None, None, torch.device("cpu"), seed=0, std=0.05)
        with torch.no_grad():
            shard.weight.copy_(full[lo:hi])
        oracle = torch.nn.Embedding(rows, dim, sparse=True, _weight=full.clone())
        opt = RowWiseAdagrad([shard.weight], lr=0.1, sgd=sgd)
        ref_opt = RowWiseAdagrad([oracle.weight], lr=0.1, sgd=sgd)
        for _ in range(3):
            ids = torch.tensor(batches[rank], dtype=torch.long)
            out = shard(ids)
            assert torch.allclose(out, oracle(ids).detach(), atol=TOL)
            (out * weights[rank]).sum().backward()
            opt.step()
            opt.zero_grad()
            # the oracle sees every rank's rows; its loss is the mean over ranks, as DDP's
            ref_loss = sum((oracle(torch.tensor(b, dtype=torch.long)) * w).sum() for b, w in zip(batches, weights, strict=True)) / world
            ref_loss.backward()
            ref_opt.step()
            ref_opt.zero_grad()
            assert torch.allclose(shard.weight.detach(), oracle.weight.detach()[lo:hi], atol=TOL)
        checked.append(tuple(len(b) for b in batches))

    case()
    return checked


def test_row_wise_embedding_matches_oracle_property():
    checked = run_ranks(_embedding_cases, 2, 40)
    assert checked[0] == checked[1] and len(checked[0]) >= 20
    lengths = checked[0]
    assert any(0 in pair for pair in lengths), "an empty batch on one rank was exercised"


# ---------------------------------------------------------------- the whole model


def _model_steps(rank, world, task):
    import torch.distributed as dist

    from flm_dist.batch import Batch
    from flm_dist.config import FeatureConfig, ModelConfig
    from flm_dist.model import FLM
    from flm_dist.objectives import compute_loss, forward_flags
    from flm_dist.optim import build_optimizers
    from flm_dist.sharding import RowWiseEmbedding, parallelize, plan_tables, unwrap

    cfg = ModelConfig(user_rows=101, item_rows=53, feature_rows=11, embedding_dim=8, hidden=[16], latent_dim=8, head_hidden=[8])
    feats = [FeatureConfig(name="seg", side="user"), FeatureConfig(name="cat", side="item")]
    g = torch.Generator().manual_seed(7)
    sizes = [9, 0, 17]  # rank batch sizes per step: step 2 has an empty batch on rank 0 ...

    def batch(n):
        return Batch(
            user=torch.randint(0, 101, (n,), generator=g),
            item=torch.randint(0, 53, (n,), generator=g),
            features={"seg": torch.randint(0, 11, (n,), generator=g), "cat": torch.randint(0, 11, (n,), generator=g)},
            label=torch.randint(0, 2, (n,), generator=g).float(),
        )

    # steps x ranks batches, identical on every rank (same generator)
    steps = [[batch(sizes[(s + r) % 3]) for r in range(world)] for s in range(3)]
    flags = forward_flags(task, 0.0)

    torch.manual_seed(3)
    ref = FLM(cfg, feats, init_seed=3)
    if task == "pretrain":
        ref.head.requires_grad_(False)
    for name in ("user_decoder", "item_decoder"):
        getattr(ref, name).requires_grad_(False)
    torch.manual_seed(3)
    model = FLM(cfg, feats, init_seed=3, table_device="meta")
    if task == "pretrain":
        model.head.requires_grad_(False)
    for name in ("user_decoder", "item_decoder"):
        getattr(model, name).requires_grad_(False)
    plan = plan_tables({n: t.num_embeddings for n, t in model.tables.items()}, 8, world, 0, {"seg": "replicated", "cat": "replicated"})
    assert plan["user"].kind == plan["item"].kind == "row_wise"
    pm = parallelize(model, plan, torch.device("cpu"), seed=3)
    assert isinstance(unwrap(pm).tables["user"], RowWiseEmbedding)
    # Modest learning rates: Adagrad/Adam normalise the gradient, so with large ones the
    # float32 rounding of a different summation order (all-reduce vs one backward) is
    # amplified past the 1e-6 we hold the sharded model to.
    d_opt, s_opt = build_optimizers(unwrap(pm), 1e-2, 0.01, 0.02, "adagrad")
    rd_opt, rs_opt = build_optimizers(ref, 1e-2, 0.01, 0.02, "adagrad")
    losses = []  # (the sharded model's global mean loss, the oracle's) per step
    for s, per_rank in enumerate(steps):
        rows = sum(len(b) for b in per_rank)
        local = per_rank[rank]
        torch.manual_seed(100 * s + rank)  # the same corruption masks as the oracle's pass over this batch
        out = pm(local, **flags)
        lp = compute_loss(task, out, local, 0.0, 1.0, 0.1, None, num_negatives=512)
        (lp.total * (world / rows)).backward()
        for o in (d_opt, s_opt):
            o.step()
            o.zero_grad()
        # oracle: one process, the union of the ranks' batches, loss = global mean
        ref_total = 0.0
        for r, b in enumerate(per_rank):
            torch.manual_seed(100 * s + r)
            ro = ref(b, **flags)
            rl = compute_loss(task, ro, b, 0.0, 1.0, 0.1, None, num_negatives=512).total
            ref_total = ref_total + rl
            if b is local:
                diff = float((out.z_user - ro.z_user).abs().max()) if len(local) else 0.0
                assert diff <= TOL, f"step {s}: forward differs by {diff}"
                assert abs(float(lp.total) - float(rl)) < 1e-4 * max(1.0, abs(float(rl)))
        (ref_total / rows).backward()
        for o in (rd_opt, rs_opt):
            o.step()
            o.zero_grad()
        global_total = lp.total.detach().clone()
        dist.all_reduce(global_total)
        losses.append((float(global_total) / max(rows, 1), float(ref_total) / max(rows, 1)))
    # after the steps: every rank's rows and every dense weight equal the oracle's
    m = unwrap(pm)
    diffs = {}
    for name, t in m.tables.items():
        lo, hi = plan[name].local_range(rank)
        diffs[f"tables.{name}"] = float((t.weight.detach() - ref.tables[name].weight.detach()[lo:hi]).abs().max()) if hi > lo else 0.0
    for k, v in ref.state_dict().items():
        if not k.startswith("tables."):
            diffs[k] = float((m.state_dict()[k] - v).abs().max())
    worst = max(diffs, key=diffs.get)
    assert diffs[worst] <= TOL, f"max abs difference {diffs[worst]} in {worst}: {diffs}"
    dist.barrier()
    return losses


@pytest.mark.parametrize("task", ["ctr", "pretrain"])
def test_sharded_model_steps_match_single_process(task):
    per_rank = run_ranks(_model_steps, 2, task)
    for losses in per_rank:  # the global loss of the sharded pair equals one process's on the union of batches
        assert [sharded for sharded, _ in losses] == pytest.approx([oracle for _, oracle in losses], rel=1e-5)
    assert per_rank[0] == per_rank[1]


def test_plan_defaults_and_overrides():
    sizes = {"user": 1 << 22, "item": 1 << 22, "seg": 100}
    plan = plan_tables(sizes, 64, 2, 64 << 20)
    assert plan["user"].kind == "row_wise" and plan["seg"].kind == "replicated"
    assert plan["user"].local_range(1) == (1 << 21, 1 << 22)
    # 2 tables x 4M rows x 64 dims: each worker holds half (+ one accumulator per row)
    assert plan["user"].bytes_per_worker(0) == (1 << 21) * (64 * 4 + 4)
    assert "row_wise" in describe_plan(plan) and "MiB/worker" in describe_plan(plan)
    assert plan_tables(sizes, 64, 1, 64 << 20)["user"].kind == "replicated"
    assert plan_tables(sizes, 64, 2, 64 << 20, {"seg": "row_wise"})["seg"].kind == "row_wise"
    with pytest.raises(ValueError, match="unknown tables \\['usr'\\]"):
        plan_tables(sizes, 64, 2, 0, {"usr": "row_wise"})
    # uneven: 10 rows over 4 ranks -> 3, 3, 3, 1
    p = TablePlan("row_wise", 10, 4, 4)
    assert [p.local_range(r) for r in range(4)] == [(0, 3), (3, 6), (6, 9), (9, 10)]



def _sequence_steps(rank, world):
    """The sequence model (replicated tables, uniform negatives, next-item prediction at
    the last and at every position) on 2 ranks, one rank's batch empty in turn."""
    import torch.distributed as dist

    from flm_dist.batch import Batch
    from flm_dist.config import ModelConfig
    from flm_dist.model import FLM
    from flm_dist.objectives import NegativeSampler, compute_loss, forward_flags, used_modules
    from flm_dist.optim import build_optimizers
    from flm_dist.sharding import parallelize, plan_tables, unwrap

    cfg = ModelConfig(user_rows=101, item_rows=53, embedding_dim=8, hidden=[16], latent_dim=8, head_hidden=[], history_len=4, history_layers=1, history_heads=2, user_id=False)
    g = torch.Generator().manual_seed(rank)

    def batch(n):
        hist = torch.randint(0, 53, (n, 4), generator=g)
        hist[: n // 2, :2] = -1  # short histories beside full ones
        return Batch(user=torch.randint(0, 101, (n,), generator=g), item=torch.randint(0, 53, (n,), generator=g), features={}, history=hist)

    torch.manual_seed(3)
    model = FLM(cfg, [], init_seed=3, table_device="meta")
    for name, m in model.named_children():
        if name not in used_modules("pretrain", 0.0):
            m.requires_grad_(False)
    plan = plan_tables({n: t.num_embeddings for n, t in model.tables.items()}, 8, world, 1 << 30)
    assert {p.kind for p in plan.values()} == {"replicated"}
    pm = parallelize(model, plan, torch.device("cpu"), seed=3)
    opts = build_optimizers(unwrap(pm), 1e-2, 0.01, 0.02, "adagrad")
    sampler = NegativeSampler(53, [], 16, torch.device("cpu"), seed=rank)
    sizes = [(6, 0), (0, 5), (3, 4), (0, 2)]  # the other rank's batch is empty in turn
    for s, per_rank in enumerate(sizes):
        b = batch(per_rank[rank])
        sampler.observe(b)
        b.negatives, b.negative_features, share = sampler.sample()
        out = pm(b, **forward_flags("pretrain", 0.0, all_positions=s % 2 == 1))
        lp = compute_loss("pretrain", out, b, 0.0, 1.0, 0.1, None, 16, share)
        (lp.total * (world / sum(per_rank))).backward()
        for o in opts:
            o.step()
            o.zero_grad()
    state = {k: v.detach().clone() for k, v in unwrap(pm).state_dict().items()}
    dist.barrier()
    return state


def test_sequence_model_steps_with_an_empty_batch_on_one_rank():
    """A rank whose batch is empty must still take part in every backward collective,
    or its peer waits in the gradient gather forever; afterwards the replicas agree."""
    a, b = run_ranks(_sequence_steps, 2, timeout=120)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"replicas differ in {k}"


def test_a_rating_under_bf16_autocast_is_predicted_in_float32():
    """The head runs in bf16 under autocast (the GPU recipe); the rating center is a 0-dim
    fp32 buffer, which does not promote a bf16 tensor: predictions near 4 came in steps of
    1/32 (1/64 from 2 to 4), and training's ratings differed from evaluation's (fp32)."""
    from flm_dist.batch import Batch
    from flm_dist.config import FeatureConfig, ModelConfig
    from flm_dist.model import FLM

    cfg = ModelConfig(user_rows=97, item_rows=41, feature_rows=13, embedding_dim=4, hidden=[8], latent_dim=4, head_hidden=[4])
    m = FLM(cfg, [FeatureConfig(name="seg", side="user")], rating_center=3.7)
    g = torch.Generator().manual_seed(0)
    b = Batch(user=torch.randint(0, 97, (64,), generator=g), item=torch.randint(0, 41, (64,), generator=g), features={"seg": torch.randint(0, 13, (64,), generator=g)})
    with torch.no_grad():
        exact = m(b).score
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = m(b).score
    assert mixed.dtype == torch.float32
    # bf16's matmuls stay (they are the recipe); the center is added at full precision,
    # within bf16's rounding of the head's small output, not of 3.7 (a half step: 0.008)
    assert (mixed - exact).abs().max() < 0.004
