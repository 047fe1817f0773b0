"""The `ternet` command: prep, train, eval, inspect."""
import click

from data_prep.cli import prep


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli():
    """ternet: train ternary neural networks (weights and activations in {-1, 0, +1})."""


cli.add_command(prep)


def main():
    cli()
