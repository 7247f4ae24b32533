"""EMA of the student (--use_ema): the update rule by hand, swapping in and out, exact resume and
export."""
import pytest
import torch
from safetensors.torch import load_file

from conftest import accelerate_launch, expect_success, tiny_flags
from tdm.ema import StudentEMA


def test_update_rule_by_hand():
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    ema = StudentEMA([p], decay=0.75, start_step=2)
    with torch.no_grad():
        p.copy_(torch.tensor([3.0, 0.0]))
    ema.update(1)                                   # before start_step: a copy
    assert ema.shadow[0].tolist() == [3.0, 0.0]
    with torch.no_grad():
        p.copy_(torch.tensor([7.0, 4.0]))
    ema.update(2)                                   # 0.75·[3, 0] + 0.25·[7, 4] = [4, 1]
    assert ema.shadow[0].tolist() == [4.0, 1.0]
    ema.update(3)                                   # 0.75·[4, 1] + 0.25·[7, 4] = [4.75, 1.75]
    assert ema.shadow[0].tolist() == [4.75, 1.75]
    with ema.applied():
        assert p.tolist() == [4.75, 1.75]
    assert p.tolist() == [7.0, 4.0]                 # restored exactly
    other = StudentEMA([torch.nn.Parameter(torch.zeros(2))], decay=0.75)
    other.load_state_dict(ema.state_dict())
    assert other.shadow[0].tolist() == [4.75, 1.75]


@pytest.mark.slow
def test_ema_resumes_exactly_and_is_what_export_ema_writes(tiny_pixart, tmp_path):
    common = ["--train_mode", "lora", "--lora_rank", "4", "--learning_rate", "1e-2",
              "--validation_steps", "0", "--checkpointing_steps", "2", "--mixed_precision", "no",
              "--use_ema", "--ema_decay", "0.5", "--ema_start_step", "1"]
    straight, split, raw = tmp_path / "straight", tmp_path / "split", tmp_path / "raw"
    expect_success(accelerate_launch(tiny_flags(tiny_pixart, straight, 4, *common, "--export_ema")))
    expect_success(accelerate_launch(tiny_flags(tiny_pixart, split, 2, *common, "--export_ema")))
    expect_success(accelerate_launch(tiny_flags(tiny_pixart, split, 4, *common, "--export_ema",
                                                "--resume_from_checkpoint", "latest")))
    expect_success(accelerate_launch(tiny_flags(tiny_pixart, raw, 4, *common)))
    name = "pytorch_lora_weights.safetensors"
    a, b, c = (load_file(str(folder / name)) for folder in (straight, split, raw))
    assert a.keys() == b.keys() == c.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=1e-5)   # 2 + resume + 2 == 4
    assert any(not torch.allclose(a[k], c[k]) for k in a)   # the EMA is not the last weights
