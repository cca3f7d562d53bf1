"""The CPU few-row linear kernel against a float64 F.linear, its batch invariance, dispatch."""

import pytest
import torch
import torch.nn.functional as F

from msn.packed_linear import PackedLinear
from msn_kernels import few_row_linear as frl

pytestmark = pytest.mark.skipif(not frl.cpu_supported(), reason="needs an x86-64 CPU with AVX2")


def float64_linear(x, weight, bias=None):
    return F.linear(x.double(), weight.double(), None if bias is None else bias.double())


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 6, 7, 8, 9, 13, 16])
@pytest.mark.parametrize(("in_features", "out_features"), [(5, 3), (64, 33), (77, 17), (576, 40)])
@pytest.mark.parametrize("bias", [False, True])
def test_matches_float64_linear(rows, in_features, out_features, bias) -> None:
    generator = torch.Generator().manual_seed(rows * 1000 + in_features + out_features)
    x = torch.randn(rows, in_features, generator=generator)
    weight = torch.randn(out_features, in_features, generator=generator)
    b = torch.randn(out_features, generator=generator) if bias else None
    out = frl.few_row_linear(x, weight, b)
    assert out.shape == (rows, out_features) and out.dtype == torch.float32
    expected = float64_linear(x, weight, b)
    tolerance = 2e-6 * (float64_linear(x.abs(), weight.abs()).max().item() + 1)
    torch.testing.assert_close(out.double(), expected, atol=tolerance, rtol=0)


@pytest.mark.parametrize("threads", [1, 2])
def test_each_row_is_bit_identical_whatever_runs_beside_it(threads) -> None:
    """A tree step's rows give the same bits as one-token steps, at any thread count."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(16, 200, generator=generator)
    weight = torch.randn(301, 200, generator=generator)
    bias = torch.randn(301, generator=generator)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        alone = torch.cat([frl.few_row_linear(x[i : i + 1], weight, bias) for i in range(16)])
        for rows in range(1, 17):
            together = frl.few_row_linear(x[:rows], weight, bias)
            assert torch.equal(together, alone[:rows]), rows
    finally:
        torch.set_num_threads(previous)


def test_any_leading_shape_and_non_contiguous_inputs() -> None:
    generator = torch.Generator().manual_seed(1)
    weight = torch.randn(40, 24, generator=generator).t()  # (24, 40), not contiguous
    bias = torch.randn(24, 2, generator=generator)[:, 0]  # strided
    x = torch.randn(40, 2, 3, generator=generator).permute(1, 2, 0)  # (2, 3, 40), not contiguous
    out = frl.few_row_linear(x, weight, bias)
    assert out.shape == (2, 3, 24)
    torch.testing.assert_close(out.double(), float64_linear(x, weight, bias), atol=1e-4, rtol=0)
    vector = frl.few_row_linear(x[0, 0], weight)  # (40,) -> (24,), as F.linear
    assert vector.shape == (24,)
    torch.testing.assert_close(vector.double(), float64_linear(x[0, 0], weight), atol=1e-4, rtol=0)


def test_bad_input_raises_a_clear_error() -> None:
    weight = torch.randn(8, 16)
    with pytest.raises(RuntimeError, match="float32 only"):
        frl.few_row_linear(torch.randn(2, 16, dtype=torch.float64), weight.double())
    with pytest.raises(RuntimeError, match="16 columns, weight 12"):
        frl.few_row_linear(torch.randn(2, 16), torch.randn(8, 12))


@pytest.fixture
def kernel_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the rows of each kernel call made through PackedLinear."""
    calls: list[int] = []
    real = frl.few_row_linear

    def spy(x, weight, bias=None):
        calls.append(x.numel() // x.shape[-1])
        return real(x, weight, bias)

    monkeypatch.setattr("msn.packed_linear.few_row_linear", spy)
    return calls


def test_packed_linear_takes_the_kernel_for_a_few_float32_rows(kernel_calls, monkeypatch):
    torch.manual_seed(0)
    layer = PackedLinear(48, 80, bias=True)
    with torch.no_grad():
        for rows in (1, 3, 16, 17):
            x = torch.randn(1, rows, 48)
            expected = float64_linear(x, layer.weight, layer.bias)
            torch.testing.assert_close(layer(x).double(), expected, atol=1e-5, rtol=0)
        assert kernel_calls == [1, 3, 16]  # 17 rows is a prefill: oneDNN
        layer.double()(torch.randn(1, 4, 48, dtype=torch.float64))
        layer.float()
        monkeypatch.setenv("MSN_FEW_ROW_LINEAR", "0")
        layer(torch.randn(1, 4, 48))
        monkeypatch.setenv("MSN_FEW_ROW_LINEAR", "1")
        monkeypatch.setenv("MSN_KERNELS", "torch")
        layer(torch.randn(1, 4, 48))
    layer(torch.randn(1, 4, 48)).sum().backward()  # autograd: F.linear
    assert kernel_calls == [1, 3, 16]


def test_a_failed_build_warns_once_and_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(frl, "_loaded", {})

    def no_compiler(verbose):
        raise OSError("c++: command not found")

    monkeypatch.setattr(frl, "_build", no_compiler)
    with pytest.warns(RuntimeWarning, match="c\\+\\+: command not found.*apt-get install g\\+\\+"):
        assert not frl.few_row_linear_available()
    assert not frl.few_row_linear_available()  # reported once, remembered
    layer = PackedLinear(16, 8)
    x = torch.randn(2, 16)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias))
    with pytest.raises(RuntimeError, match="unavailable"):
        frl.load_few_row_linear()
