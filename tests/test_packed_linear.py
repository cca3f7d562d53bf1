"""PackedLinear against a float64 F.linear: the oneDNN path, its repacking, and its fallbacks.

The few-row kernel, which takes float32 calls of up to 16 rows first, is turned off here so
that these tests reach the oneDNN path; `test_few_row_linear.py` covers the kernel.
"""

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F

from msn.packed_linear import _PACKED_DTYPES, PACKED_MIN_ROWS, PackedLinear

pytestmark = pytest.mark.skipif(
    not torch.backends.mkldnn.is_available(), reason="oneDNN is not in this torch build"
)
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 3e-2}


@pytest.fixture(autouse=True)
def _without_few_row_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MSN_FEW_ROW_LINEAR", "0")


def reference(layer: PackedLinear, x: torch.Tensor) -> torch.Tensor:
    bias = None if layer.bias is None else layer.bias.double()
    return F.linear(x.double(), layer.weight.double(), bias)


def make_layer(bias: bool, dtype: torch.dtype = torch.float32, seed: int = 0) -> PackedLinear:
    torch.manual_seed(seed)
    return PackedLinear(48, 80, bias=bias).to(dtype)


@pytest.fixture
def pack_spy(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Records each oneDNN matmul, so a test can tell which path ran."""
    calls: list[int] = []
    real = torch.ops.mkldnn._linear_pointwise

    class Spy:
        def __call__(self, x, *args):
            calls.append(x.shape[-2])
            return real(x, *args)

    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", Spy())
    return calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", [(1, 1), (1, 3), (1, 4), (2, 7), (1, 69), (3,)])
def test_matches_float64_linear(shape, bias, dtype, pack_spy) -> None:
    layer = make_layer(bias, dtype)
    x = torch.randn(*shape, 48).to(dtype)
    rows = x.numel() // 48
    with torch.no_grad():
        out = layer(x)
    assert out.shape == (*shape, 80) and out.dtype == dtype
    torch.testing.assert_close(out.double(), reference(layer, x), atol=TOLERANCE[dtype], rtol=0)
    assert bool(pack_spy) is (rows >= PACKED_MIN_ROWS and dtype in _PACKED_DTYPES)


def test_repacks_after_the_weight_changes(pack_spy) -> None:
    """In-place updates (load_state_dict, an adapter merge) and new Parameters both repack."""
    layer = make_layer(bias=True)
    x = torch.randn(1, 6, 48)
    with torch.no_grad():
        layer(x)
        layer.load_state_dict(make_layer(bias=True, seed=1).state_dict())
        torch.testing.assert_close(layer(x).double(), reference(layer, x), atol=1e-5, rtol=0)
        layer.weight.mul_(-2.0)
        torch.testing.assert_close(layer(x).double(), reference(layer, x), atol=1e-5, rtol=0)
        layer.weight = torch.nn.Parameter(torch.randn(80, 48))
        torch.testing.assert_close(layer(x).double(), reference(layer, x), atol=1e-5, rtol=0)
    assert len(pack_spy) == 4


def test_autograd_other_dtypes_and_msn_kernels_torch_take_f_linear(
    pack_spy, monkeypatch: pytest.MonkeyPatch
) -> None:
    layer = make_layer(bias=True)
    x = torch.randn(2, 8, 48)
    out = layer(x)  # grad enabled, weight requires grad: autograd must see F.linear
    out.sum().backward()
    assert layer.weight.grad is not None and not pack_spy
    with torch.no_grad():
        layer.double()(x.double())
        monkeypatch.setenv("MSN_KERNELS", "torch")
        layer.float()(x)
    assert not pack_spy


def test_copies_and_pickles_without_the_packed_weight() -> None:
    layer = make_layer(bias=False)
    x = torch.randn(1, 8, 48)
    with torch.no_grad():
        expected = layer(x)  # packs
        for clone in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
            torch.testing.assert_close(clone(x), expected)
