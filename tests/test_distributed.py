"""Data-parallel training: SyncBatchNorm in ``memory_efficient()`` and the grad stage inside
DistributedDataParallel, each run on two CPU processes over gloo.

``nn.SyncBatchNorm`` cannot run on CPU tensors (its kernels are CUDA-only and its forward
refuses CPU input), so the CPU tests compare against what it computes: a plain BatchNorm
model on one process, fed the concatenation of every process's batch, with the loss the sum
of the processes' losses over their number (DistributedDataParallel averages gradients).
The GPU test compares against ``nn.SyncBatchNorm`` itself.
"""

import datetime
import os
import socket
from unittest import mock

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import inductor_convbn
from inductor_convbn import _compat, _decide
from inductor_convbn.testing import randomize_batch_norm

WORLD = 2
# Uneven on purpose: SyncBatchNorm weighs each process's statistics by its batch size.
BATCHES = (3, 5)
STEPS = 3


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, port, backend, job, out_dir):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)  # two processes on a two-core machine
    if backend == "nccl":
        torch.cuda.set_device(rank)
    # A collective that waits longer than this fails the test instead of hanging the suite.
    timeout = datetime.timedelta(seconds=120)
    dist.init_process_group(backend, rank=rank, world_size=WORLD, timeout=timeout)
    try:
        torch.save(job(rank), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _run(job, tmp_path, backend="gloo"):
    """``job(rank)`` on each of ``WORLD`` processes; their results, by rank."""
    mp.spawn(_worker, args=(_free_port(), backend, job, str(tmp_path)), nprocs=WORLD)
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]


def _batch(step, rank, device="cpu"):
    generator = torch.Generator().manual_seed(100 * step + rank)
    x = torch.randn(BATCHES[rank], 3, 6, 6, generator=generator, dtype=torch.float64)
    return x.to(device)


def _loss(out):
    weights = torch.linspace(-1, 1, out[0].numel(), dtype=out.dtype, device=out.device)
    return (out * weights.view_as(out[0])).square().mean()


def _bn_model():
    """Two conv -> BN pairs: the first affine with a bias, the second neither, with a
    cumulative average for its running statistics."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.Conv2d(6, 4, 3, stride=2, bias=False),
        nn.BatchNorm2d(4, affine=False, momentum=None),
        nn.ReLU(),
    ).double()
    return randomize_batch_norm(model)


def _train(model, step_fn, steps=STEPS):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for step in range(steps):
        optimizer.zero_grad()
        step_fn(step).backward()
        optimizer.step()


def _global_batch_reference():
    """The plain BN model trained on every process's batch at once: SyncBatchNorm's result."""
    model = _bn_model()

    def step_fn(step):
        batches = [_batch(step, rank) for rank in range(WORLD)]
        outs = model(torch.cat(batches)).split(BATCHES)
        return sum(_loss(out) for out in outs) / WORLD

    _train(model, step_fn)
    return model.state_dict()


def _ddp(model):
    """``DDP(model)``, for a CPU model with SyncBatchNorm layers too.

    DDP refuses SyncBatchNorm in a CPU module, because ``nn.SyncBatchNorm``'s kernels are
    CUDA-only; the fused layer does not run them. Nothing else in DDP depends on the device.
    """
    if next(model.parameters()).is_cuda:
        return DDP(model)
    with mock.patch.object(DDP, "_passing_sync_batchnorm_handle", lambda self, module: None):
        return DDP(model)


class _SavedActivations:
    """The activation bytes saved for backward by the calls made inside the block (tensors
    with the batch's size first; not the parameters, not the per-channel statistics)."""

    def __init__(self, batch):
        self.batch, self.storages = batch, {}

    def __enter__(self):
        def pack(t):
            if t.dim() > 1 and t.shape[0] == self.batch:
                self.storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        self.hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
        self.hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self.hooks.__exit__(*exc)

    @property
    def nbytes(self):
        return sum(self.storages.values())


def _sync_bn_job(rank):
    """DDP training of the SyncBN model made memory-efficient, converted both ways round,
    and compiled; the activation bytes a forward saves for backward."""
    states = {}
    converted = {
        "sync then fused": inductor_convbn.memory_efficient(
            nn.SyncBatchNorm.convert_sync_batchnorm(_bn_model())
        ),
        "fused then sync": nn.SyncBatchNorm.convert_sync_batchnorm(
            inductor_convbn.memory_efficient(_bn_model())
        ),
        "compiled": inductor_convbn.memory_efficient(
            nn.SyncBatchNorm.convert_sync_batchnorm(_bn_model())
        ),
    }
    for name, model in converted.items():
        fused = [m for m in model.modules() if isinstance(m, inductor_convbn.FusedConvBatchNorm2d)]
        assert len(fused) == 2 and all(isinstance(m.bn, nn.SyncBatchNorm) for m in fused)
        ddp = _ddp(model)
        fn = torch.compile(ddp) if name == "compiled" else ddp
        _train(model, lambda step, fn=fn: _loss(fn(_batch(step, rank))))
        states[name] = model.state_dict()

    plain, conv_outputs = _bn_model(), []
    for m in plain:
        if isinstance(m, nn.Conv2d):
            m.register_forward_hook(lambda m, a, out: conv_outputs.append(out.nbytes))
    fused = inductor_convbn.memory_efficient(nn.SyncBatchNorm.convert_sync_batchnorm(_bn_model()))
    saved = {}
    # Not through DDP: its compiled forward has graph breaks that would trace the hooks.
    for name, fn in (("plain", plain), ("fused", fused), ("compiled", torch.compile(fused))):
        with _SavedActivations(BATCHES[rank]) as saved[name]:
            fn(_batch(0, rank).requires_grad_())
    saved_bytes = {name: s.nbytes for name, s in saved.items()}
    return {"states": states, "saved": saved_bytes, "conv outputs": sum(conv_outputs)}


def test_sync_batch_norm_trains_like_the_global_batch(tmp_path):
    expected = _global_batch_reference()
    results = _run(_sync_bn_job, tmp_path)
    for rank, result in enumerate(results):
        for name, state in result["states"].items():
            assert state.keys() == expected.keys(), (rank, name)
            where = f"process {rank}, {name}"
            torch.testing.assert_close(state, expected, msg=lambda m, w=where: f"{w}: {m}")
        # Each pair's conv output, which the BN would save, is not saved; compiled, no
        # more is saved than in eager (what the partitioner saves is its choice).
        saved = result["saved"]
        assert saved["plain"] - saved["fused"] == result["conv outputs"], saved
        assert saved["compiled"] <= saved["fused"], saved


def _sync_bn_gpu_job(rank):
    """The fused layer against nn.SyncBatchNorm itself, which runs on GPUs: DDP training in
    float64, and one step under bfloat16 autocast."""
    device = torch.device("cuda", rank)
    reference = nn.SyncBatchNorm.convert_sync_batchnorm(_bn_model()).to(device)
    model = inductor_convbn.memory_efficient(reference)
    for trained in (reference, model):
        ddp = DDP(trained, device_ids=[rank])
        _train(trained, lambda step, ddp=ddp: _loss(ddp(_batch(step, rank, device))))
    states = (model.state_dict(), reference.state_dict())
    grads = []
    autocast_reference = nn.SyncBatchNorm.convert_sync_batchnorm(_bn_model().float()).to(device)
    for m in (inductor_convbn.memory_efficient(autocast_reference), autocast_reference):
        x = _batch(0, rank, device).float().requires_grad_()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = m(x)
        _loss(out.float()).backward()
        # The same parameters in the same order, under other names.
        grads.append([out.detach(), x.grad, *(p.grad for p in m.parameters())])
    return _compat.tree_map(
        lambda t: t.detach().cpu() if isinstance(t, torch.Tensor) else t,
        {"states": states, "autocast": tuple(grads)},
    )


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < WORLD, reason=f"needs {WORLD} CUDA devices")
def test_sync_batch_norm_trains_like_sync_batch_norm_on_gpus(tmp_path):
    for result in _run(_sync_bn_gpu_job, tmp_path, backend="nccl"):
        state, expected = result["states"]
        torch.testing.assert_close(state, expected)
        fused, reference = result["autocast"]
        torch.testing.assert_close(fused, reference, rtol=2e-2, atol=2e-2)


def _step(model, x, autocast):
    """One forward and backward; the output, the input's gradient and the model's state."""
    x = x.requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = model(x)
    # A sum: the mean of an empty batch is nan.
    (out.float().square().sum() / BATCHES[0]).backward()
    return {"out": out.detach(), "grad": x.grad, "state": model.state_dict()}


# name: (the SyncBatchNorm's group is this process's own, bfloat16 autocast)
_GROUP_CASES = {
    "own group": (True, False),
    "world, one batch empty": (False, False),
    "world, one batch empty, bfloat16 autocast": (False, True),
}


def _process_group_job(rank):
    """The fused SyncBatchNorm normalises over the batches of its process group: a group of
    this process alone, and the world where process 1's batch is empty (in float64, and in
    float32 under bfloat16 autocast)."""
    own_group, _ = dist.new_subgroups(group_size=1)
    results = {}
    for name, (own, autocast) in _GROUP_CASES.items():
        model = _bn_model().float() if autocast else _bn_model()
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model, own_group if own else None)
        x = _batch(0, rank) if own else _batch(0, 0)[: BATCHES[0] * (1 - rank)]
        x = x.float() if autocast else x
        results[name] = _step(inductor_convbn.memory_efficient(model), x, autocast)
    return results


def test_sync_batch_norm_reduces_over_its_process_group(tmp_path):
    results = _run(_process_group_job, tmp_path)
    for rank, result in enumerate(results):
        for name, (own, autocast) in _GROUP_CASES.items():
            # Without a group, process 0's batch is the group's: both processes get its
            # statistics.
            x = _batch(0, rank if own else 0)
            model = _bn_model()
            if autocast:
                model, x = model.float(), x.float()
            expected = _step(model, x, autocast)
            got = result[name]
            tolerance = {"rtol": 2e-2, "atol": 2e-2} if autocast else {}
            if own or rank == 0:
                torch.testing.assert_close(got, expected, **tolerance)
            else:
                torch.testing.assert_close(got["state"], expected["state"], **tolerance)
                assert got["out"].shape[0] == got["grad"].shape[0] == 0


def test_sync_batch_norm_without_distributed_is_batch_norm():
    """Outside a process group SyncBatchNorm is plain batch norm, and so is the fused layer."""
    assert not dist.is_initialized()
    reference = nn.SyncBatchNorm.convert_sync_batchnorm(_bn_model())
    model = inductor_convbn.memory_efficient(reference)
    assert inductor_convbn.memory_efficient_report(model).fused == 2
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in (reference, model)]
    for step in range(STEPS):
        for m, optimizer in zip((reference, model), optimizers, strict=True):
            optimizer.zero_grad()
            _loss(m(_batch(step, 0))).backward()
            optimizer.step()
    torch.testing.assert_close(model.state_dict(), reference.state_dict())


# -- the grad stage inside DistributedDataParallel -------------------------------------------

_MIB = 1 << 20


class _FrozenBnNet(nn.Module):
    """Two conv -> frozen BN pairs and a projection sized so that DDP's gradient buckets
    cut dynamo's graph between the second conv and its BN.

    DDPOptimizer counts parameter bytes backwards from the output and cuts where a bucket
    (1 MiB, the smallest DDP allows it) fills up: the projection's bytes fall 64 short of
    it, and the BN's weight and bias (128 bytes) fill it.
    """

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 16, 3, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        )  # fmt: skip
        self.proj = nn.Parameter(torch.randn(16, (_MIB - 64) // (16 * 4)) / 4)

    def forward(self, x):
        return self.body(x).mean((2, 3)) @ self.proj


def _frozen_bn_net():
    torch.manual_seed(0)
    model = randomize_batch_norm(_FrozenBnNet())
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eval()  # frozen: running statistics, trainable affine
    return model


def _folded(compiled, x):
    _compat.dynamo_reset()
    _compat.counters.clear()
    compiled(x).sum().backward()
    return _compat.counters["inductor"][_decide.COUNTER_FOLDED]


def _grad_stage_job(rank):
    inductor_convbn.install()
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(rank))
    # The premise: without the grad stage running before DDPOptimizer's cut, the second
    # pair is cut in two and stays as it is.
    with mock.patch.object(_compat, "_before_ddp_split", []):
        folded_after_cut = _folded(torch.compile(DDP(_frozen_bn_net(), bucket_cap_mb=1)), x)
    model, reference = _frozen_bn_net(), _frozen_bn_net()
    compiled = torch.compile(DDP(model, bucket_cap_mb=1))
    eager = DDP(reference, bucket_cap_mb=1)
    _compat.dynamo_reset()
    _compat.counters.clear()
    for fn, trained in ((compiled, model), (eager, reference)):
        _train(trained, lambda step, fn=fn: fn(x + step).square().mean())
    return {
        "folded_after_cut": folded_after_cut,
        "folded": _compat.counters["inductor"][_decide.COUNTER_FOLDED],
        "state": (model.state_dict(), reference.state_dict()),
    }


def test_grad_stage_folds_every_pair_inside_ddp(tmp_path):
    for result in _run(_grad_stage_job, tmp_path):
        assert result["folded_after_cut"] == 1, result
        assert result["folded"] == 2, result
        state, expected = result["state"]
        torch.testing.assert_close(state, expected)
