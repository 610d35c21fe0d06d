"""ShapesWorld training (persviz.shapesworld.train): exact resume after an interruption. The training command end to
end: tests/door/test_cli.py."""
import pytest
import torch

from persviz.shapesworld import train


def _run(steps, seed_fail_at=None):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    sched = train.warmup_cosine(opt, 2, steps)
    calls = []

    def step(s):
        if s == seed_fail_at and not calls:
            calls.append(s)
            raise KeyboardInterrupt
        rng, g = train.step_rng(0, s)
        x = torch.from_numpy(rng.normal(size=(8, 4))).float()
        loss = (model(x) - torch.randn(8, 1, generator=g)).pow(2).mean()
        loss.backward(); opt.step(); opt.zero_grad(); sched.step()
        return loss.item()

    train.run_loop("toy", steps, {"model": model, "opt": opt, "sched": sched}, step, save_every=2)
    return model


def test_an_interrupted_run_resumes_to_the_same_weights(shapesworld_train_in_tmp):
    tmp_world = shapesworld_train_in_tmp
    straight = _run(6)
    (train.CACHE / "toy.pt").unlink()
    with pytest.raises(KeyboardInterrupt):
        _run(6, seed_fail_at=3)
    assert torch.load(train.CACHE / "toy.pt")["step"] == 2  # the snapshot before the interruption
    resumed = _run(6)
    for a, b in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
