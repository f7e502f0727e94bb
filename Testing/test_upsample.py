"""The matrix-product trilinear resize equals torch's ``interpolate`` forward and backward."""
import pytest
import torch
import torch.nn.functional as F

from FastSAM3DLib.upsample import linear_weights, trilinear_upsample


@pytest.mark.parametrize("size_in,size_out",
                         [((8, 8, 8), (32, 32, 32)), ((5, 7, 6), (20, 9, 6)), ((8, 4, 6), (16, 16, 3))])
def test_equals_interpolate_values_and_gradients(size_in, size_out):
    generator = torch.Generator().manual_seed(0)
    volume = torch.randn((2, 3) + size_in, generator=generator, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn((2, 3) + size_out, generator=generator, dtype=torch.float64)

    expected = F.interpolate(volume, size=size_out, mode="trilinear", align_corners=False)
    (expected_grad,) = torch.autograd.grad((expected * upstream).sum(), volume)
    actual = trilinear_upsample(volume, size_out)
    (actual_grad,) = torch.autograd.grad((actual * upstream).sum(), volume)

    assert actual.shape == expected.shape
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(actual_grad, expected_grad, rtol=0, atol=1e-12)


def test_linear_weights_of_each_output_sum_to_one_and_are_local():
    weights = linear_weights(4, 16, dtype=torch.float64)
    torch.testing.assert_close(weights.sum(dim=0), torch.ones(16, dtype=torch.float64))
    assert weights[3, :4].abs().sum() == 0  # the last input voxel does not reach the first output voxels


def test_rejects_wrong_shapes():
    with pytest.raises(ValueError, match="N, C, D, H, W"):
        trilinear_upsample(torch.zeros(1, 8, 8, 8), (16, 16, 16))
    with pytest.raises(ValueError, match="three output sizes"):
        trilinear_upsample(torch.zeros(1, 1, 8, 8, 8), (16, 16))
