"""The CPU bf16 attention kernel is chosen by measurement on this machine, cached, and can be forced."""

import json

import pytest
import torch

from regproxy_cli import build_model
from regproxy_cli.constants import CACHE_ENV
from regproxy_cli.errors import RegproxyError
from regproxy_cli.inference.runtime import autocast
from regproxy_cli.model import attention


@pytest.fixture
def fresh(tmp_path, monkeypatch):
    """An empty cache folder and no choice made yet in this process."""
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    monkeypatch.delenv(attention.ATTENTION_ENV, raising=False)
    monkeypatch.setattr(attention, "_chosen", {})
    return tmp_path / "cpu-kernels.json"


def timings(sdpa: float, explicit: float, calls: list):
    return lambda *shape: calls.append(shape) or {"sdpa": sdpa, "explicit": explicit}


def fused_flags(model) -> list[bool]:
    return [block.attn.fused_attn for block in model.backbone.vit.blocks]


@pytest.mark.parametrize("sdpa, explicit, expected", [(1.0, 2.0, "sdpa"), (2.0, 1.0, "explicit")])
def test_the_faster_kernel_runs_under_cpu_bf16_and_timms_choice_otherwise(fresh, monkeypatch, sdpa, explicit,
                                                                           expected):
    calls = []
    monkeypatch.setattr(attention, "time_attention", timings(sdpa, explicit, calls))
    model = build_model("tiny-vit", 3).eval()
    x = torch.randn(1, 3, 48, 64)
    with torch.inference_mode(), autocast("cpu", "bf16"):
        model(x)
        assert model.backbone.attention_kernel(48, 64) == expected
    assert fused_flags(model) == [expected == "sdpa"] * 2
    assert calls == [(3 * 4 + 1, 2, 16)]  # tokens (a 3x4 grid + the class token), heads, head dim: timed once
    with torch.inference_mode():
        model(x)
    assert fused_flags(model) == [True, True] and model.backbone.attention_kernel(48, 64) == "sdpa"


def test_the_choice_is_kept_on_disk_per_machine_and_shape(fresh, monkeypatch):
    calls = []
    monkeypatch.setattr(attention, "time_attention", timings(2.0, 1.0, calls))
    assert attention.cpu_bf16_attention(65, 2, 16) == "explicit"
    stored = json.loads(fresh.read_text())
    (key,) = stored
    assert stored[key] == "explicit" and torch.__version__ in key and "2x65x16" in key
    monkeypatch.setattr(attention, "_chosen", {})  # a new process: read, not measured
    monkeypatch.setattr(attention, "time_attention", timings(1.0, 2.0, calls))
    assert attention.cpu_bf16_attention(65, 2, 16) == "explicit" and len(calls) == 1
    assert attention.cpu_bf16_attention(17, 2, 16) == "sdpa" and len(calls) == 2  # another shape is measured
    assert len(json.loads(fresh.read_text())) == 2


def test_a_damaged_cache_is_measured_again_and_rewritten(fresh, monkeypatch):
    fresh.write_text("{not json")
    monkeypatch.setattr(attention, "time_attention", timings(1.0, 2.0, []))
    assert attention.cpu_bf16_attention(65, 2, 16) == "sdpa"
    assert list(json.loads(fresh.read_text()).values()) == ["sdpa"]


def test_the_environment_forces_a_kernel_and_rejects_others(fresh, monkeypatch):
    monkeypatch.setattr(attention, "time_attention", lambda *shape: pytest.fail("measured although forced"))
    monkeypatch.setenv(attention.ATTENTION_ENV, "Explicit")
    assert attention.cpu_bf16_attention(65, 2, 16) == "explicit" and not fresh.exists()
    monkeypatch.setenv(attention.ATTENTION_ENV, "flash")
    with pytest.raises(RegproxyError, match="REGPROXY_ATTENTION must be sdpa, explicit or auto, got 'flash'"):
        attention.cpu_bf16_attention(65, 2, 16)


def test_both_kernels_compute_the_same_attention():
    """The timed stand-ins are the real computations: SDPA and the explicit formula agree (to bf16 rounding)."""
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 33, 16, generator=generator) for _ in range(3))
    explicit = ((q * 16 ** -0.5) @ k.transpose(-2, -1)).softmax(-1) @ v
    torch.testing.assert_close(torch.nn.functional.scaled_dot_product_attention(q, k, v), explicit)
    times = attention.time_attention(33, 2, 16, rounds=1)
    assert set(times) == {"sdpa", "explicit"} and all(0 < t < 10 for t in times.values())


@pytest.mark.parametrize("kernel", ["sdpa", "explicit"])
def test_either_kernel_gives_the_fp32_labels_in_bf16(fresh, monkeypatch, kernel):
    monkeypatch.setenv(attention.ATTENTION_ENV, kernel)
    model = build_model("tiny-vit", 3).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        reference = model(x)
        with autocast("cpu", "bf16"):
            low = model(x).float()
    assert fused_flags(model) == [kernel == "sdpa"] * 2
    torch.testing.assert_close(low, reference, atol=0.1, rtol=0.05)


def test_bf16_weight_copies_are_bit_identical_to_autocast_and_follow_the_weights(fresh):
    model = build_model("tiny-vit", 3).eval()
    backbone = model.backbone
    x = torch.randn(1, 3, 64, 64)

    def autocast_only():  # what autocast alone computes: the copies switched off by having gradients on
        with torch.enable_grad(), autocast("cpu", "bf16"):
            return [t.detach() for t in backbone(x)]

    with torch.inference_mode(), autocast("cpu", "bf16"):
        fast = backbone(x)
    assert backbone._bf16_copies and all(torch.equal(a, b) for a, b in zip(fast, autocast_only()))
    weights = [p for p in backbone.parameters()]
    assert all(p.dtype == torch.float32 for p in weights)  # the module's own weights are untouched after the call
    with torch.no_grad():
        backbone.vit.blocks[0].mlp.fc1.weight.mul_(2.0)  # changed in place: the copy must follow
    with torch.inference_mode(), autocast("cpu", "bf16"):
        changed = backbone(x)
    assert all(torch.equal(a, b) for a, b in zip(changed, autocast_only()))
    assert not torch.equal(changed[1], fast[1])


def test_training_under_bf16_autocast_reaches_the_float32_weights():
    model = build_model("tiny-vit", 3).train()
    with autocast("cpu", "bf16"):
        model(torch.randn(1, 3, 32, 32)).float().sum().backward()
    fc1 = model.backbone.vit.blocks[0].mlp.fc1.weight
    assert fc1.grad is not None and fc1.grad.abs().sum() > 0 and not model.backbone._bf16_copies


@pytest.mark.parametrize("flags, warned", [({"avx2", "fma"}, True), ({"avx2", "avx512f", "avx512_bf16"}, False),
                                           ({"avx2", "amx_bf16"}, False), (set(), False)])
def test_cpu_bf16_without_bf16_instructions_warns_once_why_it_is_slow(monkeypatch, flags, warned):
    import warnings

    from regproxy_cli.inference import runtime

    monkeypatch.setattr(runtime, "cpu_info", lambda: ("some cpu", frozenset(flags)))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        autocast("cpu", "bf16")
        autocast("cpu", "fp32")
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert messages == ([runtime.BF16_EMULATED] if warned else [])


def test_the_cli_prints_a_warning_as_one_line(monkeypatch, capsys):
    import warnings

    from regproxy_cli.cli import app

    monkeypatch.delenv("REGPROXY_DEBUG", raising=False)
    monkeypatch.setattr(warnings, "formatwarning", warnings.formatwarning)  # restored after the test
    with pytest.raises(SystemExit):
        app.main(["--version"])
    assert warnings.formatwarning("bf16 is slow here", RuntimeWarning, "x.py", 3) == "warning: bf16 is slow here\n"
