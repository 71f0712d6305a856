"""The fused sampling draw (sampling/race_kernel.py) against the PyTorch draw it replaces, on CPU under
TRITON_INTERPRET=1 (on a GPU machine without it, on CUDA)."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from gridserve.sampling import sampler  # noqa: E402
from gridserve.sampling.race_kernel import CHUNK, race_argmax  # noqa: E402

DEVICE = "cuda" if os.environ.get("TRITON_INTERPRET") != "1" and torch.cuda.is_available() else "cpu"


def reference(probs, seeds, steps):
    u = sampler.random_uniforms(seeds, steps, probs.shape[1])
    return (probs / -torch.log(u)).argmax(dim=-1)


def kernel(probs, seeds, steps):
    return race_argmax(probs.to(DEVICE), seeds.to(DEVICE), steps.to(DEVICE), sampler._SEED_SALT,
                       sampler._TOKEN_SALT).cpu()


# Seeds and steps cover both 32-bit lanes, negative int64 values and the extremes.
SEEDS = [0, 1, 12345, -1, -(2**63), 2**63 - 1, 2**40 + 7, -(2**35) - 3]
STEPS = [0, 1, 7, 2**32, 2**32 + 5, 1000, 2**45, 3]


@pytest.mark.parametrize("vocab", [1, 100, CHUNK + 300])  # one token; one tile; several chunks
def test_draw_equals_the_pytorch_draw(vocab):
    g = torch.Generator().manual_seed(vocab)
    # Flat distributions: the noise decides, so any difference in the hash changes the winner.
    probs = torch.rand(len(SEEDS), vocab, generator=g) + 1.0
    seeds, steps = torch.tensor(SEEDS), torch.tensor(STEPS)
    assert kernel(probs, seeds, steps).tolist() == reference(probs, seeds, steps).tolist()


def test_zero_probability_tokens_never_win_and_ties_go_to_the_first_token():
    probs = torch.zeros(4, 3000)
    probs[:, 2500] = 1.0  # a single surviving token in a later tile
    seeds, steps = torch.tensor([3, 4, 5, 6]), torch.tensor([0, 1, 2, 3])
    assert kernel(probs, seeds, steps).tolist() == [2500] * 4
    # Every token tied at probability 0 except none: scores all 0, the first token wins like torch.argmax.
    zeros = torch.zeros(2, 50)
    assert kernel(zeros, seeds[:2], steps[:2]).tolist() == [0, 0]


def test_many_rows_equal_the_pytorch_draw():
    # 64 random (seed, step) rows over a peaked distribution; the PyTorch draw's distribution is tested in
    # test_sampling.py, so equality here carries it over.
    g = torch.Generator().manual_seed(1)
    probs = torch.softmax(torch.randn(64, 500, generator=g) * 3, dim=-1)
    seeds = torch.randint(-(2**62), 2**62, (64,), generator=g)
    steps = torch.randint(0, 2**40, (64,), generator=g)
    assert kernel(probs, seeds, steps).tolist() == reference(probs, seeds, steps).tolist()


def test_empty_batch():
    assert kernel(torch.rand(0, 10), torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)).shape == (0,)


def reference_logits(logits, temps, seeds, steps):
    u = sampler.random_uniforms(seeds, steps, logits.shape[1])
    return (logits / temps[:, None] - torch.log(-torch.log(u))).argmax(dim=-1)


@pytest.mark.parametrize("vocab", [1, 100, CHUNK + 300])
def test_draw_from_logits_equals_the_pytorch_draw_and_the_probability_draw(vocab):
    g = torch.Generator().manual_seed(vocab + 1)
    logits = torch.randn(len(SEEDS), vocab, generator=g) * 0.2  # flat: the noise decides
    temps = torch.tensor([0.5, 1.0, 0.7, 1.3, 2.0, 0.9, 1.1, 0.6])
    seeds, steps = torch.tensor(SEEDS), torch.tensor(STEPS)
    got = race_argmax(logits.to(DEVICE), seeds.to(DEVICE), steps.to(DEVICE), sampler._SEED_SALT,
                      sampler._TOKEN_SALT, temps.to(DEVICE)).cpu().tolist()
    assert got == reference_logits(logits, temps, seeds, steps).tolist()
    # the log-space draw picks what the probability draw picks (the same race, another monotone score)
    assert got == reference(torch.softmax(logits / temps[:, None], dim=-1), seeds, steps).tolist()
    assert got == sampler.exponential_race_logits(logits, temps[:, None], seeds, steps).tolist()
