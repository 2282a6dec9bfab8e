"""How close the workers' resize must be to PIL's, the reference.

`vit_hf.data._resized` resizes a box in whole pixels with torch's uint8 antialiased bilinear `interpolate`: PIL's
filter, in fixed point with 16-bit weights where PIL's have 22 bits of precision, and like PIL rounded to uint8
between the horizontal and the vertical pass. The result is within 1 level of PIL's, in a fraction of the values:
0.2-0.3% for 300-640 px photos to 224 px, up to 5.4% for the small upscaled photos and random pixels of these tests.
"""

import numpy as np
import torch


def assert_resized_as_pil(ours, reference, fraction: float = 0.1) -> None:
    """OURS (tensor or array) equals PIL's REFERENCE within 1 uint8 level, in at most FRACTION of the values."""
    ours, reference = (
        np.asarray(x.numpy() if isinstance(x, torch.Tensor) else x, dtype=int) for x in (ours, reference)
    )
    difference = np.abs(ours - reference)
    assert difference.max() <= 1, f"{difference.max()} levels apart"
    assert (difference > 0).mean() <= fraction, f"{(difference > 0).mean():.2%} of the values differ"
