import math

import pytest
import torch

from pyssl.engine import MomentumTeacher, Schedule, ema_update, momentum_schedule


def test_warmup_is_linear_then_cosine_to_final():
    s = Schedule(1.0, 0.1, total_steps=110, warmup_steps=10)
    assert s(0) == 0.0
    assert s(5) == pytest.approx(0.5)
    assert s(10) == pytest.approx(1.0)
    assert s(109) == pytest.approx(0.1)
    mid = 10 + 99 / 2
    assert s(int(mid)) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * int(mid - 10) / 99)))
    vals = [s(i) for i in range(10, 110)]
    assert all(a >= b for a, b in zip(vals, vals[1:]))   # monotone after warm-up
    assert s(500) == pytest.approx(0.1)                   # stays at final


def test_schedule_without_warmup_and_bad_args():
    s = Schedule(2.0, 0.0, 5)
    assert s(0) == 2.0 and s(4) == pytest.approx(0.0)
    with pytest.raises(ValueError, match="total_steps"):
        Schedule(1, 0, 0)
    with pytest.raises(ValueError, match="warmup_steps"):
        Schedule(1, 0, 10, 11)


def test_momentum_schedule_goes_from_base_to_one():
    s = momentum_schedule(0.996, 100)
    assert s(0) == pytest.approx(0.996)
    assert s(99) == pytest.approx(1.0)
    k = 30
    assert s(k) == pytest.approx(1 - (1 - 0.996) * (math.cos(math.pi * k / 99) + 1) / 2)


def test_ema_update_formula_and_buffers():
    torch.manual_seed(0)
    student = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    teacher = MomentumTeacher(student, 0.9, 1.0, total_steps=10)
    assert all(not p.requires_grad for p in teacher.parameters())
    t0 = [p.clone() for p in teacher.module.parameters()]
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
        student[1].running_mean.fill_(3.0)
    m = teacher.update(student, 0)
    assert m == pytest.approx(0.9)
    for t, old, s in zip(teacher.module.parameters(), t0, student.parameters()):
        torch.testing.assert_close(t, 0.9 * old + 0.1 * s)
    assert torch.equal(teacher.module[1].running_mean, student[1].running_mean)
    ema_update(teacher.module, student, 0.0)
    for t, s in zip(teacher.module.parameters(), student.parameters()):
        torch.testing.assert_close(t, s)
    with pytest.raises(ValueError, match="momentum"):
        ema_update(teacher.module, student, 1.5)
