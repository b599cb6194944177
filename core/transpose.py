"""A transposed copy of a CPU matrix through torch's vectorised channel shuffle, where aten's copy is a scalar loop.

`x.t().contiguous()` copies element by element, and from about 512 rows its writes land a multiple of 4 KB apart,
so they evict each other from the cache. torch's channel shuffle of a channels-last image transposes each pixel's
channels, seen as (groups, channels / groups), with fbgemm's vectorised transpose. One pixel holding the whole matrix
transposes it in one call; past 256 rows the same aliasing slows that too, so the rows go in slabs of 64, each a
pixel, whose transposes a second copy of 64-float runs interleaves. One thread on the AVX-512 EPYC of
benchmarks/README.md: (1024, 160) 31 µs against aten's 63, (1024, 640) 96 against 236, (160, 640) 9 against 36.
Exact either way (a copy). fbgemm's transpose is for fp32 on x86 CPUs with AVX2 (elsewhere torch's shuffle would
refuse, or loop as aten's copy does): other tensors take aten's copy. Used for the weight gradients of core.linear's
oneDNN products, inside their backward: the shuffle has no derivative, so it is not for tensors autograd records.
"""
import torch

_SLAB = 64  # rows per pixel past _ONE_PIXEL rows: each pixel's transpose writes 256-byte rows
_ONE_PIXEL = 256  # rows up to which one pixel (one transpose call) is fastest
_VECTORISED = torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")  # where torch's fbgemm transposes


def transposed(x):
    """x.t().contiguous() for a 2-D tensor: (R, C) -> (C, R), through the channel shuffle where that is faster."""
    r, c = x.shape
    if (not _VECTORISED or x.device.type != "cpu" or x.dtype != torch.float32 or not x.is_contiguous()
            or r * c == 0 or r == 1 or c == 1):
        return x.t().contiguous()
    if r <= _ONE_PIXEL:
        image = x.as_strided((1, r * c, 1, 1), (r * c, 1, r * c, r * c))  # one channels-last pixel, (R, C) channels
        return torch.native_channel_shuffle(image, r).view(c, r)
    if r % _SLAB:
        return x.t().contiguous()
    slabs = r // _SLAB
    image = x.view(1, slabs, 1, _SLAB * c).permute(0, 3, 1, 2)  # channels last: a pixel per slab, (64, C) channels
    pieces = torch.native_channel_shuffle(image, _SLAB)  # each slab transposed: (C, 64) channels
    pieces = pieces.permute(0, 2, 3, 1).reshape(slabs, c, _SLAB)  # a view: channels last is (slab, C, 64) in memory
    return pieces.transpose(0, 1).reshape(c, r)  # (C, R): the slabs' columns side by side, 64-float runs
