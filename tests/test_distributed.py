"""Correct under torchrun: collectives on the backend's device, sharded evaluation equal to one process's, and each
training sample seen once per epoch across ranks, in the order the seed fixes."""

import gc
import json
import os
import subprocess
import sys
import textwrap
import weakref

import numpy as np
import pytest
import torch

from regproxy_cli import build_model
from regproxy_cli.data.synthetic import write_synthetic_dataset
from regproxy_cli.engine import distributed
from regproxy_cli.engine.metrics import BoundaryFScore, ConfusionMatrix
from regproxy_cli.engine.train import TrainStream, _Positions
from regproxy_cli.hub.checkpoint import save_pretrained


@pytest.fixture
def fake_process_group(monkeypatch):
    """torch.distributed as if a group were running; all_reduce records the device of what it is given."""
    seen = []
    monkeypatch.setattr(distributed.dist, "is_available", lambda: True)
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(distributed.dist, "all_reduce", lambda tensor: seen.append(tensor.device))
    return seen


def test_nccl_collectives_run_on_the_process_gpu(monkeypatch):
    monkeypatch.setattr(distributed.dist, "get_backend", lambda: "nccl")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert distributed.collective_device() == torch.device("cuda", 3)
    monkeypatch.setattr(distributed.dist, "get_backend", lambda: "gloo")
    assert distributed.collective_device() == torch.device("cpu")


@pytest.mark.parametrize("updated", [True, False], ids=["counted", "saw-no-image"])
def test_metric_sums_hand_the_collective_tensors_on_the_backend_device(fake_process_group, monkeypatch, updated):
    """NCCL refuses CPU tensors: the counts filled on the CPU must reach all_reduce on the backend's device.

    No GPU here, so the backend's device is played by 'meta' (any device other than the CPU would do).
    """
    monkeypatch.setattr(distributed, "collective_device", lambda: torch.device("meta"))
    matrix = ConfusionMatrix(3)
    if updated:
        matrix.update(torch.tensor([0, 1, 2]), torch.tensor([0, 1, 1]))
    matrix.all_reduce()
    boundary = BoundaryFScore(3)
    boundary.counts = boundary.counts.to("meta")  # .cpu() of a meta tensor cannot run: only the hand-over counts
    with pytest.raises(NotImplementedError):
        boundary.all_reduce()
    assert fake_process_group == [torch.device("meta")] * 2


def test_without_a_process_group_sums_are_the_tensor_itself():
    tensor = torch.arange(4)
    assert distributed.all_reduce_sum(tensor) is tensor
    assert distributed.rank_world() == (0, 1)


def test_tensors_handed_to_the_backend_outlive_the_process_group(monkeypatch):
    """torch 2.4's gloo may free a finished collective's tensors on its worker thread, which deadlocks against the
    group's destructor if Python no longer holds them; a DDP reducer keeps the group alive past
    destroy_process_group, so the package holds them past shutdown too, one buffer per shape."""
    handed = []
    monkeypatch.setattr(distributed.dist, "is_available", lambda: True)
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(distributed.dist, "get_rank", lambda: 0)
    monkeypatch.setattr(distributed.dist, "get_world_size", lambda: 1)
    monkeypatch.setattr(distributed.dist, "get_backend", lambda: "gloo")
    monkeypatch.setattr(distributed.dist, "all_reduce", lambda tensor: handed.append(weakref.ref(tensor)))
    monkeypatch.setattr(distributed.dist, "barrier", lambda: pytest.fail("dist.barrier's gloo work holds earlier ones"))
    monkeypatch.setattr(distributed, "_buffers", {})
    with torch.inference_mode():  # evaluation sums under inference mode, training outside it: one buffer serves both
        first = distributed.all_reduce_sum(torch.arange(3.0))
    second = distributed.all_reduce_sum(torch.ones(3))
    assert first.tolist() == [0.0, 1.0, 2.0] and second.tolist() == [1.0, 1.0, 1.0]
    distributed.barrier()
    assert len(handed) == 3 and handed[0]() is handed[1]()  # bounded over a long run: one buffer per shape
    del first, second
    gc.collect()
    assert all(ref() is not None for ref in handed)
    monkeypatch.setattr(distributed, "_started_here", [True])
    destroyed = []
    monkeypatch.setattr(distributed.dist, "destroy_process_group", lambda: destroyed.append(len(distributed._buffers)))
    distributed.shutdown()
    gc.collect()
    assert destroyed == [2] and all(ref() is not None for ref in handed)  # held through and after the destroy


def test_objects_of_every_process_are_gathered_in_rank_order(tmp_path):
    """Two gloo processes with pickles of different lengths; without a group, the one value."""
    assert distributed.all_gather_objects({"a": 1}) == [{"a": 1}]
    script = tmp_path / "gather.py"
    script.write_text(textwrap.dedent("""
        import json, sys, numpy as np, torch.distributed as dist
        from regproxy_cli.engine.distributed import all_gather_objects
        rank = int(sys.argv[1])
        dist.init_process_group("gloo", init_method="file://" + sys.argv[2], rank=rank, world_size=2)
        value = {"rank": rank, "rows": np.full((rank + 1, 300), rank, dtype=np.uint8)}
        gathered = all_gather_objects(value)
        dist.destroy_process_group()
        print(json.dumps([[g["rank"], g["rows"].shape[0], int(g["rows"].sum())] for g in gathered]))
    """))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    processes = [subprocess.Popen([sys.executable, str(script), str(rank), str(tmp_path / "rendezvous")], env=env,
                                  stdout=subprocess.PIPE, text=True) for rank in range(2)]
    outputs = [p.communicate(timeout=120)[0] for p in processes]
    assert [p.returncode for p in processes] == [0, 0]
    assert [json.loads(out) for out in outputs] == [[[0, 1, 0], [1, 2, 600]]] * 2


def test_setup_runtime_in_one_process_starts_no_group(monkeypatch):
    for variable in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(variable, raising=False)
    runtime = distributed.setup_runtime("cpu")
    assert (runtime.rank, runtime.world, runtime.device, runtime.main) == (0, 1, torch.device("cpu"), True)
    assert not torch.distributed.is_initialized()
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert distributed.setup_runtime("auto").device.type == expected


@pytest.mark.parametrize("world, per_process, dataset_size", [(2, 1, 10), (2, 3, 9), (3, 2, 7)])
def test_each_sample_once_per_epoch_across_ranks_in_the_seeded_order(world, per_process, dataset_size):
    seed = 7
    stream = TrainStream(list(range(dataset_size)), transform=None, seed=seed)
    step = per_process * world
    iters = -(-2 * dataset_size // step)  # enough iterations for two epochs
    by_rank = [list(_Positions(0, iters, per_process, rank, world)) for rank in range(world)]
    # every position exactly once over the ranks, each rank per_process of each iteration
    assert sorted(p for positions in by_rank for p in positions) == list(range(iters * step))
    assert all(len(positions) == iters * per_process for positions in by_rank)
    # position p is the p-th sample of the stream; epoch e visits a permutation seeded by (seed, e)
    for epoch in range(2):
        expected = torch.randperm(dataset_size, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        visited = [stream.index_of(p) for p in range(epoch * dataset_size, (epoch + 1) * dataset_size)]
        assert visited == expected.tolist()
    # a resumed run (start at iteration 2) continues with exactly the positions not yet seen
    resumed = sorted(p for rank in range(world) for p in _Positions(2, iters, per_process, rank, world))
    assert resumed == list(range(2 * step, iters * step))


def test_torchrun_evaluation_equals_one_process(tmp_path):
    """2 gloo processes, each a share of 5 images (3 + 2), all-reduced: the same JSON as one process."""
    data = write_synthetic_dataset(tmp_path / "data", num_train=1, num_val=5, size=(64, 64))
    torch.manual_seed(0)
    model = build_model("tiny-vit", 5)
    with torch.no_grad():  # non-trivial predictions: several classes per image
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.5)
    save_pretrained(model, tmp_path / "model")
    command = ["-m", "regproxy_cli", "eval", "--model", str(tmp_path / "model"), "--data", str(data), "--json",
               "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single = subprocess.run([sys.executable, *command], check=False, capture_output=True, text=True, timeout=300, env=env)
    assert single.returncode == 0, single.stderr
    double = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                             *command], check=False, capture_output=True, text=True, timeout=300, env=env)
    assert double.returncode == 0, double.stderr[-3000:]
    one, two = json.loads(single.stdout), json.loads(double.stdout)  # one JSON: only rank 0 prints
    assert one == two
    present = [c for c in one["per_class"].values() if c["IoU"] is not None]
    assert one["images"] == 5 and len(present) >= 2 and 0 < one["mIoU"] < 100
    assert np.isfinite(one["aAcc"])


def test_torchrun_predict_equals_one_process(tmp_path):
    """2 gloo processes, each its share of 7 images (4 + 3) and one corrupt file: the same files, byte for byte, as
    one process (names from the whole list: two inputs share a stem), and one summary, from rank 0."""
    from PIL import Image

    rng = np.random.default_rng(0)
    folder = tmp_path / "in"
    (folder / "more").mkdir(parents=True)
    for index in range(7):
        height, width = ((48, 64), (64, 40))[index % 2]
        target = folder / "more" / "img0.png" if index == 6 else folder / f"img{index}.png"
        Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(target)
    (folder / "broken.jpg").write_bytes(b"not a jpeg")
    torch.manual_seed(0)
    save_pretrained(build_model("tiny-vit", 5), tmp_path / "model")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def predict(out, *launcher):
        command = [*launcher, "-m", "regproxy_cli", "predict", str(folder), "--model", str(tmp_path / "model"),
                   "--out", str(tmp_path / out), "--device", "cpu", "--format", "png", "--format", "labelme"]
        return subprocess.run([sys.executable, *command], check=False, capture_output=True, text=True, timeout=300,
                              env={**env, "COLUMNS": "200"})

    single = predict("one")
    double = predict("two", "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2")
    for result in (single, double):
        assert result.returncode == 1, result.stderr[-3000:]  # the corrupt file
        assert result.stdout.count("wrote 7 label maps") == 1
        assert result.stderr.count("broken.jpg: not an image PIL can read") == 1
        assert "regproxy_cli/" not in result.stderr  # no traceback of ours (torchrun prints its own for exit 1)
    assert "Traceback" not in single.stderr
    one = {p.name: p.read_bytes() for p in (tmp_path / "one").iterdir()}
    two = {p.name: p.read_bytes() for p in (tmp_path / "two").iterdir()}
    assert len(one) == 7 * 3 and "in_img0.png" in one and "more_img0.json" in one
    assert one == two  # labelme's imagePath is relative to the output folder: ../in/...
