"""The CUDA branches, run on the CPU with the CUDA stand-in (tests/fake_cuda.py): device resolution, the process
group's backend, the TF32 policy, per-process GPU RNG state, fp16 resumes, the out-of-memory retry, NaN agreement
across processes, the logged loss, sharded class counts, the deterministic resize and the GPU's label path."""

import math
import threading

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_train import tiny_config

from regproxy_cli import RegproxyError, build_model
from regproxy_cli.cli.options import parse_device
from regproxy_cli.data.class_weights import pixel_counts
from regproxy_cli.data.open import open_dataset
from regproxy_cli.data.synthetic import write_synthetic_dataset
from regproxy_cli.engine import distributed
from regproxy_cli.engine import train as train_module
from regproxy_cli.engine.config import load_config
from regproxy_cli.engine.distributed import Runtime, setup_runtime
from regproxy_cli.engine.evaluate import evaluate
from regproxy_cli.inference.pipeline import run_pipeline
from regproxy_cli.inference.runtime import resolve_device, set_tf32, tf32_state
from regproxy_cli.model import resize
from regproxy_cli.model.resize import (
    bilinear_resize_matmul,
    fused_resize_argmax,
    label_method,
    resize_and_crop,
    resize_argmax,
)


@pytest.fixture
def one_process(monkeypatch):
    for variable in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "REGPROXY_BACKEND", "REGPROXY_TF32"):
        monkeypatch.delenv(variable, raising=False)


@pytest.fixture
def torchrun(monkeypatch, one_process):
    """This process as torchrun's rank ``rank`` of ``world``; init_process_group records the backend it gets."""
    started = []
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(distributed.dist, "init_process_group", lambda backend: started.append(backend))
    monkeypatch.setattr(distributed, "_started_here", [])

    def launch(rank: int, world: int = 2) -> list[str]:
        for name, value in (("WORLD_SIZE", world), ("RANK", rank), ("LOCAL_RANK", rank), ("LOCAL_WORLD_SIZE", world)):
            monkeypatch.setenv(name, str(value))
        return started

    return launch


@pytest.fixture
def tf32_restored():
    """TF32 flags are process-wide: put PyTorch's back after the test."""
    matmul, cudnn = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    yield
    torch.set_float32_matmul_precision(matmul)
    torch.backends.cudnn.allow_tf32 = cudnn


@pytest.fixture
def deterministic_restored():
    enabled = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    yield
    torch.use_deterministic_algorithms(enabled, warn_only=warn_only)


# 1. devices with an index


def test_cuda_without_an_index_is_the_current_gpu_and_set_device_gets_its_index(fake_cuda, one_process,
                                                                                 tf32_restored):
    fake = fake_cuda(gpus=2)
    fake.current = 1
    runtime = setup_runtime("cuda")
    assert runtime.device == torch.device("cuda", 1) and fake.set_devices == [1]
    assert setup_runtime("auto").device == torch.device("cuda", 1)
    assert resolve_device("cuda:0") == torch.device("cuda", 0)
    with pytest.raises(RegproxyError, match=r"^device cuda:2: GPU 2 does not exist here \(2 visible: cuda:0, cuda:1;"):
        resolve_device("cuda:2")
    with pytest.raises(RegproxyError, match=r"^--device cuda:5: GPU 5 does not exist"):
        parse_device("cuda:5")


def test_cuda_on_a_machine_without_one_is_one_error_line(one_process, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RegproxyError, match=r"^device cuda: CUDA is not available on this machine \(use cpu\)$"):
        setup_runtime("cuda")
    assert setup_runtime("auto").device == torch.device("cpu")
    with pytest.raises(RegproxyError, match=r"^device tpu7"):
        resolve_device("tpu7")
    with pytest.raises(RegproxyError, match=r"^device mps: "):  # a device type torch knows, absent here
        resolve_device("mps")


def test_under_torchrun_each_process_takes_its_local_rank_gpu_over_nccl(fake_cuda, torchrun, tf32_restored):
    fake = fake_cuda(gpus=2)
    started = torchrun(rank=1)
    runtime = setup_runtime("cuda")
    assert (runtime.rank, runtime.world, runtime.device) == (1, 2, torch.device("cuda", 1))
    assert fake.set_devices == [1] and started == ["nccl"]


# 5. the backend: two processes on one GPU over gloo, NCCL refusing in one line


def test_two_processes_share_one_gpu_over_gloo(fake_cuda, torchrun, monkeypatch, tf32_restored):
    fake = fake_cuda(gpus=1)
    started = torchrun(rank=1)
    assert setup_runtime("cuda", backend="gloo").device == torch.device("cuda", 0)
    monkeypatch.setenv("REGPROXY_BACKEND", "gloo")  # eval and predict under torchrun: no config, the variable
    assert setup_runtime("auto").device == torch.device("cuda", 0)
    assert started == ["gloo", "gloo"] and fake.set_devices == [0, 0]


def test_nccl_refuses_a_shared_gpu_in_one_line(fake_cuda, torchrun, monkeypatch):
    fake_cuda(gpus=1)
    started = torchrun(rank=1)
    with pytest.raises(RegproxyError, match=r"^device cuda: NCCL needs one GPU per process, but LOCAL_RANK 1 has 1 "
                                            r"visible; to share GPUs use the gloo backend \(run.backend: gloo"):
        setup_runtime("cuda")
    torchrun(rank=0)
    with pytest.raises(RegproxyError, match="every process of this node would use that one GPU, which NCCL refuses"):
        setup_runtime("cuda:0", backend="nccl")
    with pytest.raises(RegproxyError, match="backend nccl needs CUDA devices, not cpu; use gloo"):
        setup_runtime("cpu", backend="nccl")
    monkeypatch.setenv("REGPROXY_BACKEND", "mpi")
    with pytest.raises(RegproxyError, match="backend 'mpi' is not one of auto, nccl, gloo"):
        setup_runtime("cpu")
    assert started == []
    with pytest.raises(RegproxyError, match="config key run.backend: 'mpi' is not one of auto, nccl, gloo"):
        load_config(None, ["run.backend=mpi"])


# 8. one TF32 policy for matmuls and convolutions


def test_tf32_is_one_setting_for_matmuls_and_cudnn_off_by_default(fake_cuda, one_process, monkeypatch,
                                                                  tf32_restored):
    fake_cuda(gpus=1)
    torch.backends.cudnn.allow_tf32 = True  # PyTorch's default: convolutions TF32, matmuls not
    setup_runtime("cuda")
    assert tf32_state() == {"matmul": False, "cudnn": False}
    setup_runtime("cuda", tf32=True)
    assert tf32_state() == {"matmul": True, "cudnn": True}
    set_tf32(False)
    monkeypatch.setenv("REGPROXY_TF32", "1")  # predict / eval: the variable
    parse_device("cuda")
    assert tf32_state() == {"matmul": True, "cudnn": True}
    assert load_config(None).run.tf32 is False


# 2. RNG state per process and per GPU


def test_each_process_saves_only_its_own_gpu_generator_and_resumes_on_fewer_gpus(fake_cuda):
    fake = fake_cuda(gpus=2)
    fake.rng[1] = torch.full((16,), 7, dtype=torch.uint8)
    state = train_module._rng_state(torch.device("cuda", 1))
    assert torch.equal(state["cuda"], fake.rng[1])  # one state, the process's GPU's
    fake.gpus = 1  # resumed with one GPU visible: the state goes to that one
    train_module._set_rng_state(state, torch.device("cuda", 0))
    assert torch.equal(fake.rng[0], fake.rng[1])
    # a checkpoint of the earlier format holds every GPU's state: this process takes its own index
    old = {"torch": torch.get_rng_state(), "cuda": [torch.full((16,), i + 10, dtype=torch.uint8) for i in range(8)]}
    train_module._set_rng_state(old, torch.device("cuda", 0))
    assert fake.rng[0].tolist() == [10] * 16
    fake.gpus = 12
    train_module._set_rng_state(old, torch.device("cuda", 9))  # no state saved for this GPU: its own stays
    assert 9 not in fake.rng


def tiny_trainer(tmp_path, runtime: Runtime | None = None, **sections) -> train_module.Trainer:
    config = load_config(tiny_config(tmp_path, **sections))
    model = build_model("tiny-vit", 5)
    return train_module.build_trainer(config, model, runtime or Runtime(0, 1, torch.device("cpu")))


def test_each_rank_resumes_its_own_generators(tmp_path):
    trainer = tiny_trainer(tmp_path)
    states = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        states.append(train_module._rng_state(torch.device("cpu")))
    checkpoint = trainer.state(4, {"mIoU": -1.0, "iter": 0}, states)
    assert checkpoint["rng"] is states[0] and checkpoint["rng_ranks"] == states
    torch.manual_seed(0)
    assert trainer.restore(checkpoint, rank=1)[0] == 4
    assert torch.equal(torch.get_rng_state(), states[1]["torch"])
    del checkpoint["rng_ranks"]  # an earlier checkpoint: rank 0's state only
    trainer.restore(checkpoint, rank=1)
    assert torch.equal(torch.get_rng_state(), states[0]["torch"])


# 3. fp16 resuming an fp32 run, on the stand-in GPU (every CUDA branch of train: device, scaler, RNG, pinning)


def test_fp16_resumes_an_fp32_run_on_a_gpu(fake_cuda, one_process, tmp_path, tf32_restored, monkeypatch):
    fake = fake_cuda(gpus=1)
    run = {"device": "cuda", "eval_every": 2, "save_every": 2}
    config = load_config(tiny_config(tmp_path, optim={"iters": 2}, run=run))
    assert train_module.train(config, progress=False) == tmp_path / "run" / "best"
    first = train_module.read_checkpoint(tmp_path / "run" / "last.pt")
    assert first["scaler"] == {} and torch.equal(first["rng"]["cuda"], fake.rng[0])
    fp16 = load_config(tiny_config(tmp_path, optim={"iters": 4}, run={**run, "precision": "fp16", "tf32": True}))
    train_module.train(fp16, resume=True, allow_config_change=True, progress=False)
    resumed = train_module.read_checkpoint(tmp_path / "run" / "last.pt")
    assert resumed["iteration"] == 4 and resumed["scaler"]["scale"] > 0 and len(resumed["rng_ranks"]) == 1
    assert tf32_state() == {"matmul": True, "cudnn": True}  # run.tf32
    longer = load_config(tiny_config(tmp_path, optim={"iters": 5}, run={**run, "precision": "fp16", "tf32": True}))
    restored = []
    load_state_dict = torch.amp.GradScaler.load_state_dict
    monkeypatch.setattr(torch.amp.GradScaler, "load_state_dict",
                        lambda self, state: restored.append(state["scale"]) or load_state_dict(self, state))
    train_module.train(longer, resume=True, allow_config_change=True, progress=False)
    assert restored == [resumed["scaler"]["scale"]]  # an fp16 run's scale carries on


def test_several_gpus_train_with_ddp_on_the_process_gpu_and_syncbn(fake_cuda, tmp_path, monkeypatch):
    fake_cuda(gpus=2)
    wrapped = []

    class RecordingDDP(torch.nn.Module):  # DDP itself needs a running process group
        def __init__(self, module, device_ids=None):
            super().__init__()
            self.module = module
            wrapped.append(device_ids)

    monkeypatch.setattr(torch.nn.parallel, "DistributedDataParallel", RecordingDDP)
    trainer = tiny_trainer(tmp_path, Runtime(1, 2, torch.device("cuda", 1)))
    assert wrapped == [[1]] and isinstance(trainer.net, RecordingDDP)
    assert any(isinstance(m, torch.nn.SyncBatchNorm) for m in trainer.model.modules())


def test_fp16_steps_skip_an_inf_gradient_and_lower_the_scale(fake_cuda, tmp_path):
    fake_cuda(gpus=1)
    trainer = tiny_trainer(tmp_path, Runtime(0, 1, torch.device("cuda", 0)), run={"precision": "fp16"})
    assert trainer.scaler.is_enabled()
    batches = iter([(torch.randn(2, 3, 64, 64), torch.randint(0, 5, (2, 64, 64)))] * 2)
    trainer.step(batches)
    scale = trainer.scaler.get_scale()
    before = [p.detach().clone() for p in trainer.model.parameters()]
    first = next(trainer.model.parameters())
    first.register_hook(lambda grad: torch.full_like(grad, math.inf))  # an overflow in fp16
    loss, _ = trainer.step(batches)
    assert math.isfinite(loss) and trainer.scaler.get_scale() == scale / 2
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))


# 7 and 12. NaN on one process skips the step on all; the logged loss is the mean over processes


def batches_of(n: int = 3):
    return iter([(torch.randn(2, 3, 64, 64), torch.randint(0, 5, (2, 64, 64)))] * n)


def test_a_nan_loss_on_another_process_skips_the_step_here_too(tmp_path, monkeypatch):
    trainer = tiny_trainer(tmp_path)
    handed = []

    def other_process_nan(tensor):  # the sum over two processes, the other one's loss not finite
        handed.append(tensor.clone())
        return tensor + torch.tensor([0.0, 1.0], dtype=tensor.dtype)

    monkeypatch.setattr(train_module, "all_reduce_sum", other_process_nan)
    monkeypatch.setattr(train_module, "rank_world", lambda: (0, 2))
    before = [p.detach().clone() for p in trainer.model.parameters()]
    loss, _ = trainer.step(batches_of())
    assert math.isnan(loss) and math.isfinite(handed[0][0]) and handed[0][1] == 0
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))
    assert trainer.scheduler.last_epoch == 0


def test_the_logged_loss_is_the_mean_over_processes(tmp_path, monkeypatch):
    trainer = tiny_trainer(tmp_path)
    handed = []
    monkeypatch.setattr(train_module, "all_reduce_sum", lambda t: handed.append(t.clone()) or t + torch.tensor(
        [3.0, 0.0], dtype=t.dtype))
    monkeypatch.setattr(train_module, "rank_world", lambda: (0, 2))
    loss, _ = trainer.step(batches_of())
    assert loss == pytest.approx((float(handed[0][0]) + 3.0) / 2)
    assert trainer.scheduler.last_epoch == 1


def test_a_nan_elsewhere_never_reaches_last_pt(tmp_path, monkeypatch):
    calls = []

    def nan_at_third_step(tensor):
        calls.append(1)
        return tensor + torch.tensor([0.0, float(len(calls) == 3)], dtype=tensor.dtype)

    monkeypatch.setattr(train_module, "all_reduce_sum", nan_at_third_step)
    config = load_config(tiny_config(tmp_path, optim={"iters": 4}, run={"eval_every": 4, "save_every": 2}))
    with pytest.raises(RegproxyError, match="the loss became nan at iteration 2"):
        train_module.train(config, progress=False)
    state = train_module.read_checkpoint(tmp_path / "run" / "last.pt")
    assert state["iteration"] == 2 and all(torch.isfinite(v).all() for v in state["model"].values()
                                           if v.is_floating_point())


# 10. class weights: each process counts its share of the masks


def test_auto_class_weights_count_this_process_share_then_sum(tmp_path, monkeypatch):
    config = load_config(tiny_config(tmp_path), ["loss.class_weight=auto"])
    train_set = config.data.open("train")
    full = pixel_counts(train_set)
    other = pixel_counts(train_set, indices=range(0, len(train_set), 2))  # rank 0's share
    read = []
    load_label = train_set.load_label
    monkeypatch.setattr(train_set, "load_label", lambda index: read.append(index) or load_label(index))
    monkeypatch.setattr(train_module, "rank_world", lambda: (1, 2))
    monkeypatch.setattr(train_module, "all_reduce_sum", lambda counts: counts + torch.from_numpy(other))
    weights, record = train_module.class_weights(config, train_set, tmp_path / "out", resume=False, progress=False)
    assert read == list(range(1, len(train_set), 2))
    assert record["pixel_counts"] == full.tolist() and len(weights) == 5


# 9. the barrier waits for its result


def test_barrier_reads_its_sum_on_the_host(monkeypatch):
    monkeypatch.setattr(distributed.dist, "is_available", lambda: True)
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(distributed.dist, "get_backend", lambda: "gloo")
    monkeypatch.setattr(distributed.dist, "all_reduce", lambda tensor: tensor.mul_(2))  # two processes arrived
    assert distributed.barrier() == 2


# 4. out of GPU memory in a predict --batch group


def test_a_group_out_of_gpu_memory_is_retried_in_halves_then_fails_alone(fake_cuda):
    fake = fake_cuda(gpus=1)
    sizes = []

    def infer(group):
        sizes.append(len(group))
        if len(group) > 2 or 3 in group:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return [one * 10 for one in group]

    results = list(run_pipeline(range(8), lambda i: i, infer, lambda item, loaded, result: result, batch=8,
                                workers=0, key=lambda loaded: 0))
    assert [done for _, done, _ in results] == [0, 10, 20, None, 40, 50, 60, 70]
    assert results[3][2].startswith("out of GPU memory on this image; try --precision bf16")
    assert [error for _, _, error in results].count(None) == 7
    assert sizes[0] > 2 and 1 in sizes and fake.emptied >= 3

    def broken(group):
        raise RuntimeError("a bug, not memory")

    with pytest.raises(RuntimeError, match="a bug"):
        list(run_pipeline(range(2), lambda i: i, broken, lambda *a: None, batch=2, workers=0))


# 6. deterministic training: the resize's backward


def test_the_deterministic_resize_equals_the_bilinear_kernel_and_its_gradient():
    x = torch.randn(2, 3, 8, 11, requires_grad=True)
    for size in ((32, 44), (29, 50), (8, 11), (5, 7)):  # float32, as training runs it: equal to rounding
        torch.testing.assert_close(bilinear_resize_matmul(x, size),
                                   F.interpolate(x, size=size, mode="bilinear", align_corners=False))
    weights = torch.randn(2, 3, 29, 50)
    (ours,) = torch.autograd.grad((bilinear_resize_matmul(x, (29, 50)) * weights).sum(), x)
    (kernel,) = torch.autograd.grad((F.interpolate(x, size=(29, 50), mode="bilinear") * weights).sum(), x)
    torch.testing.assert_close(ours, kernel)
    double = x.detach().double().requires_grad_()  # the analytic gradient against finite differences
    assert torch.autograd.gradcheck(lambda t: bilinear_resize_matmul(t, (29, 50)), (double,))


def test_deterministic_mode_trains_through_the_matmul_resize(monkeypatch, deterministic_restored, tmp_path):
    used = []
    monkeypatch.setattr(resize, "bilinear_resize_matmul", lambda x, size: used.append(size) or bilinear_resize_matmul(
        x, size))
    logits = torch.randn(1, 5, 4, 4, requires_grad=True)
    kernel = resize_and_crop(logits, 16, (60, 64))
    assert used == []
    torch.use_deterministic_algorithms(True)
    ours = resize_and_crop(logits, 16, (60, 64))
    assert used == [(64, 64)]
    torch.testing.assert_close(ours, kernel)
    with torch.no_grad():  # inference keeps the kernel
        resize_and_crop(logits, 16, (60, 64))
    assert len(used) == 1
    torch.use_deterministic_algorithms(False)
    config = load_config(tiny_config(tmp_path, optim={"iters": 2}, run={"eval_every": 2, "deterministic": True}))
    train_module.train(config, progress=False)
    assert len(used) > 1 and torch.are_deterministic_algorithms_enabled()
    assert not torch.is_deterministic_algorithms_warn_only_enabled()  # errors, not warnings


def test_a_nondeterministic_kernel_under_run_deterministic_is_one_error_line(tmp_path, monkeypatch,
                                                                             deterministic_restored):
    def step(self, batches, iteration=0):
        raise RuntimeError("upsample_bicubic2d_backward_out_cuda does not have a deterministic implementation, but "
                           "you set 'torch.use_deterministic_algorithms(True)'.\nmore")

    monkeypatch.setattr(train_module.Trainer, "step", step)
    config = load_config(tiny_config(tmp_path, run={"deterministic": True}))
    with pytest.raises(RegproxyError, match=r"^run.deterministic: upsample_bicubic2d_backward_out_cuda does not have "
                                            r"a deterministic implementation.*; set run.deterministic false"):
        train_module.train(config, progress=False)


# 11. labels on a GPU: one fused resize and argmax


def test_labels_on_a_gpu_come_from_a_fused_resize_and_argmax(monkeypatch):
    assert label_method(torch.device("cuda", 0)) == "fused" and label_method(torch.device("cpu")) == "boundary"
    scores = torch.randn(5, 9, 13)
    for size in ((36, 52), (37, 50), (9, 13)):
        expected = F.interpolate(scores[None], size=size, mode="bilinear", align_corners=False)[0].argmax(0)
        assert torch.equal(fused_resize_argmax(scores, size), expected)
    monkeypatch.setattr(resize, "DIRECT_RESIZE_LIMIT", 5 * 50 * 4)  # bands of 4 rows: never K x H x W at once
    expected = F.interpolate(scores[None], size=(37, 50), mode="bilinear", align_corners=False)[0].argmax(0)
    assert torch.equal(fused_resize_argmax(scores, (37, 50)), expected)
    fused = []
    monkeypatch.setattr(resize, "fused_resize_argmax", lambda s, size: fused.append(size) or expected)
    monkeypatch.setattr(resize, "label_method", lambda device: "fused")  # the scores' device said cuda
    assert resize_argmax(scores, (37, 50)) is expected and fused == [(37, 50)]


# 12. evaluation decodes off the main thread


def test_evaluation_decodes_images_off_the_main_thread(tmp_path):
    data = write_synthetic_dataset(tmp_path / "data", num_train=1, num_val=4, size=(64, 64))
    dataset = open_dataset("folder", data, "val")
    threads = []

    class Watched:
        def __len__(self):
            return len(dataset)

        def __getattr__(self, name):
            return getattr(dataset, name)

        def __getitem__(self, index):
            threads.append(threading.current_thread() is threading.main_thread())
            return dataset[index]

    model = build_model("tiny-vit", 5)
    result = evaluate(model, Watched(), progress=False)
    assert threads == [False] * 4
    assert result == evaluate(model, dataset, progress=False)
    assert np.isfinite(result["mIoU"])
