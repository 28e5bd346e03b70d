"""What is particular to the throwaway kernel: its reference is x * x + x."""

import torch

import pykernels


def test_reference_is_x_times_x_plus_x():
    spec = pykernels.get("square_plus")
    x = torch.tensor([[-2.0, 0.0, 3.0]], dtype=torch.float64)
    (y,) = spec.reference({"x": x}, {})
    assert y.tolist() == [[2.0, 0.0, 12.0]]
