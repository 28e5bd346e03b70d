"""`kt microbench`: every way to compute one kernel's op, checked, then timed, on named shapes.

Shapes come in *families* from `benchmarks/<kernel>.toml` (`families`). Per (family, shape)
every *provider* (`providers`: kt's own and the spec's) gets the same inputs; its output is
checked against the spec's reference by the verify rule (`gate`); a provider that fails is
reported WRONG and never timed. The others are timed by `harness.timing` (`engine`) and
reported as p10/p50/p90 ms, TFLOP/s and GB/s, % of the device's datasheet peak and speedup
against a baseline provider (`report`, `plots`); `compare` flags regressions against a saved
run, `summary` states the spec's speed targets; `cli` is the command's body and `__main__`
the helpers `benchmarks/gpu_run.sh` calls.
"""


class MicrobenchError(Exception):
    """A user-facing problem (unknown family, provider, bad family file); one line, exit code
    `exit_code`: 2 for bad input, 130 for Ctrl-C / SIGTERM after saving."""

    def __init__(self, message: str, exit_code: int = 2) -> None:
        super().__init__(message)
        self.exit_code = exit_code
