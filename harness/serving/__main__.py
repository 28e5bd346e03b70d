"""`python -m harness.serving make-model|serve-bench`: the same commands as `kt`, usable before
(or without) the top-level CLI."""

import click

from .cli import make_model, serve_bench, serve_compile


@click.group()
def main() -> None:
    """kt serving commands."""


main.add_command(make_model)
main.add_command(serve_bench)
main.add_command(serve_compile)

if __name__ == "__main__":
    main()
