"""The kt Mojo kernels: each module registers one MAX custom op named `kt.<module>`."""
