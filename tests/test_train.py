"""Training: config validation, the mmseg schedule, a run end to end, exact resume after a kill, DDP on CPU."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from regproxy_cli import RegproxyError, build_model
from regproxy_cli.engine import losses as losses_module
from regproxy_cli.engine import train as train_module
from regproxy_cli.engine.config import OptimSection, TrainConfig, load_config
from regproxy_cli.engine.train import lr_factor, param_groups, train
from regproxy_cli.hub.zoo import load_model

REPO = Path(__file__).resolve().parents[1]


def tiny_config(tmp_path: Path, **sections) -> Path:
    """A config training tiny-vit on 64x64 synthetic scenes for a few iterations."""
    config = {
        "model": {"backbone": "tiny-vit", "pretrained": False, "drop_path_rate": 0.1},
        "data": {"kind": "synthetic", "root": str(tmp_path / "data"), "crop_size": 64, "scale": [128, 64],
                 "workers": 0, "synthetic_train": 12, "synthetic_val": 3, "synthetic_size": 64},
        "test": {"inference_mode": "whole", "test_scale": None},
        "optim": {"lr": 1e-3, "batch_size": 4, "iters": 6, "warmup_iters": 2},
        "run": {"out_dir": str(tmp_path / "run"), "eval_every": 3, "save_every": 2, "log_every": 1, "threads": 1},
    }
    for section, values in sections.items():
        config[section].update(values)
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "configs").glob("*.yaml")))
def test_shipped_configs_load(name):
    config = load_config(REPO / "configs" / name)
    assert config.optim.iters > 0


def test_zoo_recipes_follow_the_official_configs():
    s16 = load_config(REPO / "configs" / "s16-ade.yaml")
    assert (s16.model.backbone, s16.model.m, s16.data.crop_size, s16.optim.schedule, s16.optim.iters) == (
        "s16", 5, 512, "poly", 160000)
    l16 = load_config(REPO / "configs" / "l16-city.yaml")
    assert (l16.model.m, l16.data.crop_size, l16.data.scale, l16.test.window_stride, l16.optim.schedule, l16.optim.iters) == (
        6, 768, [2048, 1024], 512, "cosine_restart", 80000)
    assert l16.optim.restart_periods == [10000, 20000, 50000]
    assert load_config(REPO / "configs" / "r50-l32-ade.yaml").data.scale == [2048, 640]


@pytest.mark.parametrize("text, overrides, message", [
    ("optim:\n  lrr: 1\n", [], "unknown config key optim.lrr"),
    ("optim:\n  lr: fast\n", [], "config key optim.lr: expected float"),
    ("model:\n  backbone: 3\n", [], "config key model.backbone: expected str"),
    ("data:\n  kind: coco\n", [], "config key data.kind: 'coco' is not one of"),
    ("colour: red\n", [], "unknown config key colour"),
    ("optim: [1, 2]\n", [], "config section optim: expected a mapping"),
    ("optim:\n  lr: [\n", [], "not valid YAML at line"),
    ("", ["optim.iters=-1"], "config key optim.iters: must be >= 1, got -1"),
    ("", ["iters=5"], "the key must be section.key"),
])
def test_config_errors_name_the_key(tmp_path, text, overrides, message):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(RegproxyError, match=message):
        load_config(path, overrides)


@pytest.mark.parametrize("override, message", [
    ("optim.lr=0", "config key optim.lr: must be > 0, got 0.0"),
    ("optim.lr=-1e-4", "config key optim.lr: must be > 0, got -0.0001"),
    ("optim.lr=.nan", "config key optim.lr: must be a finite number"),
    ("data.crop_size=0", "config key data.crop_size: must be >= 1, got 0"),
    ("data.crop_size=-512", "config key data.crop_size: must be >= 1, got -512"),
    ("data.scale=[0, 0]", r"config key data.scale\[0\]: must be >= 1, got 0"),
    ("data.scale=[512]", "config key data.scale: expected 2 values, got 1"),
    ("data.workers=-1", "config key data.workers: must be >= 0, got -1"),
    ("optim.warmup_iters=-5", "config key optim.warmup_iters: must be >= 0, got -5"),
    ("optim.batch_size=true", "config key optim.batch_size: expected int, got True"),
    ("data.ratio_range=[2.0, 0.5]", "config key data.ratio_range: .*low <= high"),
    ("data.cat_max_ratio=0", "config key data.cat_max_ratio: must be > 0"),
    ("optim.betas=[0.9, 1.5]", r"config key optim.betas\[1\]: must be < 1"),
    ("run.seed=-1", "config key run.seed: must be >= 0"),
])
def test_bad_settings_are_one_line_naming_the_dotted_key(override, message):
    with pytest.raises(RegproxyError, match=message) as caught:
        load_config(None, [override])
    assert "\n" not in str(caught.value)


def test_bad_setting_stops_train_cli_with_one_line_and_no_run_folder(tmp_path, cli):
    out = tmp_path / "runs" / "x"
    config = tmp_path / "c.yaml"
    config.write_text(f"data:\n  kind: synthetic\n  root: {tmp_path / 'data'}\nrun:\n  out_dir: {out}\n")
    result = cli("train", str(config), "--set", "optim.lr=0")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == ["error: config key optim.lr: must be > 0, got 0.0"]
    assert not out.exists() and not (tmp_path / "runs").exists()


def test_overrides_are_typed():
    config = load_config(None, ["optim.lr=2e-4", "test.test_scale=null", "data.scale=[1024, 256]", "run.precision=bf16"])
    assert (config.optim.lr, config.test.test_scale, config.data.scale, config.run.precision) == (
        2e-4, None, [1024, 256], "bf16")


def test_poly_schedule_with_linear_warmup_matches_mmseg():
    optim = OptimSection(lr=6e-5, iters=160000, warmup_iters=1500, warmup_ratio=1e-6, schedule="poly")
    assert lr_factor(0, optim) == pytest.approx(1e-6)
    # mmseg: warmup_lr = regular * (1 - (1 - i / warmup) * (1 - ratio)); regular = (1 - i / max) ** power
    assert lr_factor(750, optim) == pytest.approx((1 - 750 / 160000) * (1 - 0.5 * (1 - 1e-6)))
    assert lr_factor(1500, optim) == pytest.approx(1 - 1500 / 160000)
    assert lr_factor(80000, optim) == pytest.approx(0.5)
    assert lr_factor(160000, optim) == pytest.approx(0.0)


@pytest.mark.parametrize("power", [1.0, 0.9])
def test_poly_schedule_with_min_lr_ends_exactly_at_min_lr(power):
    # mmseg's PolyLrUpdaterHook: lr = (base - min) * (1 - t / T) ** power + min, here through a real optimiser
    base, low, iters = 1e-3, 1e-4, 1000
    optim = OptimSection(lr=base, min_lr=low, iters=iters, warmup_iters=0, schedule="poly", poly_power=power)
    weight = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([weight], lr=base)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: lr_factor(it, optim))
    seen = {0: optimizer.param_groups[0]["lr"]}
    for iteration in range(1, iters + 1):
        optimizer.step()
        scheduler.step()
        seen[iteration] = optimizer.param_groups[0]["lr"]
    assert seen[0] == pytest.approx(base, rel=1e-12)
    assert seen[iters // 2] == pytest.approx((base - low) * 0.5 ** power + low, rel=1e-12)
    assert seen[iters] == pytest.approx(low, rel=1e-12)
    assert all(seen[i] > seen[i + 1] > low for i in range(iters - 1))  # falls towards min_lr, never below


def test_cosine_restarts_match_mmseg():
    optim = OptimSection(iters=160000, warmup_iters=0, schedule="cosine_restart")
    assert lr_factor(0, optim) == pytest.approx(1.0)
    assert lr_factor(10000, optim) == pytest.approx(0.5)  # half of the first 20k period
    assert lr_factor(20000, optim) == pytest.approx(0.5)  # restart at weight 0.5
    assert lr_factor(40000, optim) == pytest.approx(0.25 * (1 + math.cos(math.pi * 0.5)))
    assert lr_factor(60000, optim) == pytest.approx(0.25)  # restart at weight 0.25
    assert lr_factor(159999, optim) == pytest.approx(0.0, abs=1e-8)


def test_no_weight_decay_on_position_embedding_prefix_tokens_and_norms():
    model = build_model("tiny-deit", 3)
    decay, no_decay = param_groups(model, 0.01)
    names = {id(p): n for n, p in model.named_parameters()}
    skipped = {names[id(p)] for p in no_decay["params"]}
    assert {"backbone.vit.pos_embed", "backbone.vit.cls_token", "backbone.vit.dist_token",
            "backbone.vit.blocks.0.norm1.weight", "backbone.vit.norm.bias"} <= skipped
    assert "backbone.vit.blocks.0.attn.qkv.weight" in {names[id(p)] for p in decay["params"]}
    assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == 0.01


def test_training_run_end_to_end(tmp_path):
    config = load_config(tiny_config(tmp_path))
    best = train(config, progress=False)
    run = tmp_path / "run"
    assert best == run / "best" and {"last.pt", "log.jsonl", "config.yaml", "best", "final"} <= {
        p.name for p in run.iterdir()}
    lines = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in lines if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert [r["iter"] for r in lines if "mIoU" in r] == [3, 6]
    model = load_model(best)
    assert model.config.classes[0] == "background" and "mIoU" in model.config.metrics
    assert load_config(run / "config.yaml") == config  # the resolved config rebuilds the run
    with pytest.raises(RegproxyError, match="already holds a run: pass --resume"):
        train(config, progress=False)


def test_nan_loss_stops_with_a_clear_message(tmp_path, monkeypatch):
    monkeypatch.setattr(losses_module, "segmentation_loss", lambda *a, **k: torch.tensor(float("nan"), requires_grad=True))
    with pytest.raises(RegproxyError, match="the loss became nan at iteration 0 .* lower optim.lr"):
        train(load_config(tiny_config(tmp_path)), progress=False)


def test_resume_is_strict(tmp_path):
    """--resume needs a last.pt written with the same config; a changed one is named, and accepted on request."""
    config = load_config(tiny_config(tmp_path, optim={"iters": 2}, run={"eval_every": 2, "save_every": 2}))
    with pytest.raises(RegproxyError, match=r"--resume: .*last.pt does not exist, there is nothing to resume"):
        train(config, resume=True, progress=False)
    train(config, progress=False)
    longer = load_config(tiny_config(tmp_path, optim={"iters": 4, "lr": 5e-4}, run={"eval_every": 2, "save_every": 2,
                                                                                    "threads": 2}))
    with pytest.raises(RegproxyError, match=r"differs from the one .* in optim.iters, optim.lr; pass "
                                            r"--allow-config-change") as error:
        train(longer, resume=True, progress=False)
    assert "threads" not in str(error.value)  # speed settings may change
    train(longer, resume=True, allow_config_change=True, progress=False)
    lines = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in lines if "loss" in r] == [1, 2, 3, 4]  # continued, not restarted


def test_training_checkpoints_load_as_weights_only_on_the_cpu(tmp_path):
    config = load_config(tiny_config(tmp_path, optim={"iters": 2}, run={"eval_every": 2, "save_every": 2}))
    train(config, progress=False)
    state = train_module.read_checkpoint(tmp_path / "run" / "last.pt")
    assert state["iteration"] == 2 and state["config"] == config.to_dict()
    rng = state["rng"]["torch"]
    assert rng.device.type == "cpu" and rng.dtype == torch.uint8
    before = torch.get_rng_state()
    train_module._set_rng_state(state["rng"], torch.device("cpu"))
    assert torch.equal(torch.get_rng_state(), rng)
    torch.set_rng_state(before)
    # a checkpoint that needs arbitrary code to unpickle is refused in one line, not run
    torch.save({"iteration": 1, "payload": Path("x")}, tmp_path / "evil.pt")
    with pytest.raises(RegproxyError, match=r"evil.pt: not a readable training checkpoint"):
        train_module.read_checkpoint(tmp_path / "evil.pt")


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_an_evil_pickle_is_refused_in_one_whole_sentence(tmp_path):
    torch.save({"iteration": 1, "x": _RunsCode()}, tmp_path / "evil.pt")
    with pytest.raises(RegproxyError) as caught:
        train_module.read_checkpoint(tmp_path / "evil.pt")
    message = str(caught.value)
    assert "\n" not in message and not (tmp_path / "pwned").exists()
    # torch words the refusal differently across versions (2.4: "Unsupported global: GLOBAL posix.system was not an
    # allowed global by default"; newer: "... whose module posix is blocked"): the reason must be there, uncut
    prefix = f"{tmp_path / 'evil.pt'}: not a readable training checkpoint ("
    assert message.startswith(prefix) and message.endswith(")"), message
    reason = message[len(prefix):-1]
    assert "GLOBAL posix.system" in reason and reason.rstrip(")").endswith(("blocked", "by default")), message


def test_resume_cleans_stale_temporaries_and_truncates_the_log_to_the_checkpoint(tmp_path, monkeypatch):
    config = load_config(tiny_config(tmp_path, optim={"iters": 4}, run={"eval_every": 4, "save_every": 2,
                                                                        "log_every": 1}))
    real_step = train_module.Trainer.step

    def killed_after_iteration_3(self, batches, iteration=0):
        if iteration == 3:  # iterations 1-3 logged, the checkpoint holds 2: as a kill at this moment leaves it
            raise KeyboardInterrupt
        return real_step(self, batches, iteration)

    monkeypatch.setattr(train_module.Trainer, "step", killed_after_iteration_3)
    with pytest.raises(KeyboardInterrupt):
        train(config, progress=False)
    run = tmp_path / "run"
    assert train_module.read_checkpoint(run / "last.pt")["iteration"] == 2
    assert [json.loads(line)["iter"] for line in (run / "log.jsonl").read_text().splitlines()] == [1, 2, 3]
    (run / ".last.pt.k1ll3d.tmp").write_bytes(b"")  # what a kill during a save leaves
    with (run / "log.jsonl").open("a") as log:
        log.write('{"iter": 4, "lo')  # and a line cut by the kill
    monkeypatch.setattr(train_module.Trainer, "step", real_step)
    train(config, resume=True, progress=False)
    logged = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in logged if "loss" in r] == [1, 2, 3, 4]  # 3 once, not twice
    assert not list(run.glob(".*.tmp"))


def test_a_failed_start_leaves_no_run_folder(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RegproxyError("the trainer cannot be built")

    monkeypatch.setattr(train_module, "build_trainer", broken)
    config = load_config(tiny_config(tmp_path, optim={"iters": 2}))
    with pytest.raises(RegproxyError, match="cannot be built"):
        train(config, progress=False)
    assert not (tmp_path / "run").exists()
    (tmp_path / "run").mkdir()  # a folder the user made is theirs: it stays
    with pytest.raises(RegproxyError, match="cannot be built"):
        train(config, progress=False)
    assert (tmp_path / "run").is_dir()


def test_changed_keys_are_dotted_and_skip_speed_settings():
    saved = {"optim": {"lr": 1.0, "iters": 5}, "run": {"threads": 1}, "data": {"workers": 2, "root": "a"}}
    current = {"optim": {"lr": 2.0, "iters": 5}, "run": {"threads": 4}, "data": {"workers": 0, "root": "a"},
               "loss": {"mean_over": "all"}}
    assert train_module.changed_keys(saved, current) == ["loss", "optim.lr"]


def test_a_checkpoint_older_than_a_setting_resumes_while_the_setting_keeps_its_default():
    """last.pt written before run.tf32 existed: the new key at its default is no change; set otherwise, it is."""
    defaults = TrainConfig().to_dict()
    current = TrainConfig().to_dict()
    saved = {section: dict(values) for section, values in current.items()}
    del saved["run"]["tf32"]
    assert train_module.changed_keys(saved, current, defaults) == []
    current["run"]["tf32"] = True
    assert train_module.changed_keys(saved, current, defaults) == ["run.tf32"]
    assert train_module.changed_keys(saved, TrainConfig().to_dict()) == ["run.tf32"]  # without defaults: strict


def test_the_old_key_names_still_read_with_a_warning_and_old_checkpoints_compare_equal(tmp_path):
    """data.crop, test.mode/stride/scale took ModelConfig's names; configs and last.pt files that use the old ones
    keep working for a release (YAML and --set), and naming one setting twice is one error line."""
    from regproxy_cli.engine.config import rename_old_keys

    path = tmp_path / "old.yaml"
    path.write_text("data:\n  crop: 96\ntest:\n  mode: whole\n  stride: 48\n  scale: null\n")
    with pytest.warns(FutureWarning, match="config key data.crop is now data.crop_size"):
        config = load_config(path, ["test.stride=32"])
    assert (config.data.crop_size, config.test.inference_mode, config.test.window_stride, config.test.test_scale) == (
        96, "whole", 32, None)
    (tmp_path / "twice.yaml").write_text("data:\n  crop: 64\n  crop_size: 64\n")
    with pytest.raises(RegproxyError, match="data.crop and data.crop_size are one setting"):
        load_config(tmp_path / "twice.yaml")
    current = TrainConfig().to_dict()
    saved = {section: dict(values) for section, values in current.items()}
    saved["data"]["crop"] = saved["data"].pop("crop_size")
    saved["test"] = {"mode": "slide", "stride": None, "scale": [2048, 512]}
    assert train_module.changed_keys(rename_old_keys(saved, warn=False), current, current) == []


def _run_cli(*args: str, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "regproxy_cli", *args], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_a_killed_run_resumes_exactly(tmp_path):
    """SIGKILL after the first checkpoint, --resume, and the final weights equal an uninterrupted run's."""
    common = {"optim": {"iters": 10, "warmup_iters": 2}, "run": {"eval_every": 5, "save_every": 2, "threads": 1}}
    straight = tiny_config(tmp_path / "a", **{k: dict(v) for k, v in common.items()})
    done = _run_cli("train", str(straight), cwd=tmp_path)
    assert done.wait(timeout=300) == 0, done.stderr.read()

    killed_dir = tmp_path / "b"
    killed = tiny_config(killed_dir, **{k: dict(v) for k, v in common.items()})
    process = _run_cli("train", str(killed), cwd=tmp_path)
    checkpoint = killed_dir / "run" / "last.pt"
    deadline = time.time() + 240
    while not checkpoint.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    stopped_at = train_module.read_checkpoint(checkpoint)["iteration"]
    assert stopped_at < 10, "the run finished before it could be killed"
    resumed = _run_cli("train", str(killed), "--resume", cwd=tmp_path)
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()

    a = load_file(str(tmp_path / "a" / "run" / "final" / "model.safetensors"))
    b = load_file(str(killed_dir / "run" / "final" / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_two_process_ddp_on_cpu_with_gloo(tmp_path):
    config = tiny_config(tmp_path, optim={"iters": 4, "batch_size": 4}, run={"eval_every": 4, "save_every": 4,
                                                                             "threads": 1})
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "regproxy_cli",
         "train", str(config)], check=False, cwd=tmp_path, capture_output=True, text=True, timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("model: ") == 1  # one process reports the model, not every rank its own
    lines = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in lines if "loss" in r] == [1, 2, 3, 4]  # one log: rank 0 only
    state = train_module.read_checkpoint(tmp_path / "run" / "last.pt")
    assert len(state["rng_ranks"]) == 2  # each rank's generators, for its own exact resume
    evaluated = [r for r in lines if "mIoU" in r]
    assert len(evaluated) == 1 and 0 <= evaluated[0]["mIoU"] <= 100  # sharded over both ranks, all-reduced
    assert load_model(tmp_path / "run" / "final").config.num_classes == 5
