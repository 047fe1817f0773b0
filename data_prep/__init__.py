"""Dataset preparation: importers that pack image datasets into ternet's HDF5 shards
(the format itself lives in ternet/shards.py). Exercised by `ternet prep ...`."""
