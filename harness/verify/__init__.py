"""`kt verify`: `engine` (Hypothesis-drawn cases through the Mojo op, the reference, PyTorch in
the kernel's dtype and the Triton twin), `jobs` (one child process per kernel and device),
`worker` (the child), `report` (verdicts) and `cli` (the command's body)."""
