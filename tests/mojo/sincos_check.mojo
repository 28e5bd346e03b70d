# `sincos_f32_fast` (fp32 math, for GPU inner loops) against `sincos_f32_accurate` (fp64
# reduction and polynomials, correctly rounded to fp32 but for rare near-ties) on a
# geometric sweep of angles up to 2^17, the fast one's documented range. Runs on the CPU:
# both are plain SIMD arithmetic, and the CPU's fused multiply-add is exact like the GPU's.
#   mojo run -I <repo> tests/mojo/sincos_check.mojo     (exit code 1 on failure)
from std.sys import exit

from kernels.rope import sincos_f32_accurate, sincos_f32_fast


def main() raises:
    comptime ULP1 = Float32(1.1920928955078125e-07)  # the fp32 ulp of numbers in [1, 2)
    var worst = Float32(0)
    var worst_at = Float32(0)
    var x = Float32(0)
    var n = 0
    while x < 131072.0:
        var xs = SIMD[DType.float32, 4](x, -x, x * 0.37, x * 1.0e-3)
        var a = sincos_f32_accurate(xs)
        var f = sincos_f32_fast(xs)
        var err = max(abs(a[0] - f[0]).reduce_max(), abs(a[1] - f[1]).reduce_max())
        if err > worst:
            worst = err
            worst_at = x
        x = x * 1.0002 + 0.0173
        n += 1
    print("angles:", 4 * n, "max |fast - accurate|:", worst, "at", worst_at)
    # Values lie in [-1, 1]: two ulps of 1 bound a result a few ulps off near 0 as well.
    if worst > 2 * ULP1:
        print("FAIL")
        exit(1)
    print("PASS")
