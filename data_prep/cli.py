"""`ternet prep ...`: pack datasets into HDF5 shards."""
import click


@click.group()
def prep():
    """Pack an image dataset into ternet's HDF5 shards (run once, train many times)."""
