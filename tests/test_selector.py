import math

import pytest
import torch

from semidyn_rag import DiscreteRatioSelector


def test_paper_definition_linear_round():
    s = DiscreteRatioSelector()
    # r_hat = 2^y; nearest factor in linear space
    assert s.select(1.0) == 2
    assert s.select(math.log2(2.9)) == 2  # 2.9 is nearer 2 than 4
    assert s.select(math.log2(3.1)) == 4
    assert s.select(3.0) == 8
    assert s.select(math.log2(23.9)) == 16  # boundary between 16 and 32 is 24
    assert s.select(math.log2(24.1)) == 32


def test_linear_and_log_boundaries_differ():
    lin = DiscreteRatioSelector(space="linear")
    log = DiscreteRatioSelector(space="log")
    y = math.log2(2.9)  # log-space boundary between 2 and 4 is 2*sqrt(2) = 2.83
    assert lin.select(y) == 2
    assert log.select(y) == 4
    assert log.select(math.log2(2.8)) == 2


def test_tie_goes_to_smaller_factor():
    assert DiscreteRatioSelector().select(math.log2(3.0)) == 2
    assert DiscreteRatioSelector(space="log").select(1.5) == 2


def test_scale_shifts_and_clamps():
    s = DiscreteRatioSelector()
    assert s.select(3.0, scale=1.0) == 16
    assert s.select(3.0, scale=-1.0) == 4
    assert s.select(3.0, scale=-10.0) == 2  # clamped at the bottom
    assert s.select(3.0, scale=10.0) == 32  # clamped at the top
    assert s.select(-5.0) == 2


def test_ceil_and_floor_modes():
    ceil = DiscreteRatioSelector(mode="ceil")
    floor = DiscreteRatioSelector(mode="floor")
    y = math.log2(5.0)
    assert ceil.select(y) == 8 and floor.select(y) == 4
    assert ceil.select(3.0) == 8 and floor.select(3.0) == 8  # exact candidates stay
    assert ceil.select(9.0) == 32 and floor.select(0.0) == 2  # clamping


def test_vectorised_matches_scalar():
    s = DiscreteRatioSelector()
    ys = torch.linspace(-1, 6, 57)
    out = s.select(ys, scale=0.5)
    assert out.dtype == torch.long and out.shape == ys.shape
    assert out.tolist() == [s.select(float(y), scale=0.5) for y in ys]


def test_length_mode_eqs_4_and_5():
    s = DiscreteRatioSelector()
    # m_hat = n / 2^y: 512 tokens at y=3 -> 64
    assert s.select_length(3.0, 512) == 64
    assert s.select_length(3.0, 400, lengths=(16, 32, 64, 128)) == 64  # m_hat = 50 -> 64 (|50-64|<|50-32|)
    assert s.select_length(3.0, 380) == 32  # m_hat = 47.5 -> 32 (47.5-32 < 64-47.5)
    assert s.select_length(0.0, 10_000) == 128  # clamp top
    assert s.select_length(8.0, 100) == 16  # clamp bottom
    assert s.select_length(3.0, 512, scale=1.0) == 32
    out = s.select_length(torch.tensor([3.0, 3.0]), torch.tensor([512, 128]))
    assert out.tolist() == [64, 16]


def test_bad_arguments():
    with pytest.raises(ValueError, match="positive"):
        DiscreteRatioSelector(ratios=(0, 2))
    with pytest.raises(ValueError, match="mode"):
        DiscreteRatioSelector(mode="nearest")
    with pytest.raises(ValueError, match="non-finite"):
        DiscreteRatioSelector().select(float("nan"))
    with pytest.raises(ValueError, match="n_tokens"):
        DiscreteRatioSelector().select_length(1.0, 0)


# -- issue 17.2: out-of-range and non-finite scales ------------------------------------------------


@pytest.mark.parametrize("mode", ["round", "ceil", "floor"])
@pytest.mark.parametrize("space", ["linear", "log"])
def test_large_finite_scales_clamp_to_the_ends(mode, space):
    """2^(3+60) used to tie with every factor in float64 and select 2, the least compression."""
    s = DiscreteRatioSelector(mode=mode, space=space)
    assert s.select(3.0, 5) == 32
    assert s.select(3.0, 60) == 32 and s.select(3.0, 1e9) == 32 and s.select(3.0, 1e300) == 32
    assert s.select(3.0, -60) == 2 and s.select(3.0, -1e9) == 2
    assert s.select(torch.tensor([0.0, 3.0, 5.0]), 60).tolist() == [32, 32, 32]
    assert s.select_length(3.0, 100, scale=60) == 16 and s.select_length(3.0, 100, scale=-60) == 128
    assert s.select_length(3.0, 100, scale=-1e9) == 128


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf"), torch.tensor(float("nan")), "1"])
def test_non_finite_scale_is_refused_naming_it(bad):
    s = DiscreteRatioSelector()
    with pytest.raises(ValueError, match="scale"):
        s.select(3.0, bad)
    with pytest.raises(ValueError, match="scale"):
        s.select_length(3.0, 100, scale=bad)


def test_check_scale_accepts_numbers():
    from semidyn_rag.pipeline.selector import check_scale

    assert check_scale(2) == 2.0 and check_scale(torch.tensor(-1.5)) == -1.5 and check_scale(1e9) == 1e9
