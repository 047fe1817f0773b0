"""`ternet prep ...`: pack datasets into HDF5 shards (imagenet, cifar10, mnist, folder) and
`ternet prep verify` them. Try `python -m ternet prep --help`; tested in tests/test_cli.py.
"""
import re
import sys

import click

from ternet import shards

from . import cifar, folder, idx, imagenet
from .pack import PackError, pack


@click.group()
def prep():
    """Pack an image dataset into ternet's HDF5 shards (run once, train many times).

    The output folder gets shards (<split>-NNNNN.h5), report.json (inputs that could not be
    read, and why) and manifest.json (written last). An interrupted run resumes: run the same
    command again. Then train with `ternet train --data OUT`.
    """


def _limit_spec(ctx, param, value):
    """'1000' (every split) or 'train=1000,test=200' -> int or {split: int}."""
    if value is None:
        return None
    if re.fullmatch(r"\d+", value):
        return int(value)
    if re.fullmatch(r"(\w+=\d+)(,\w+=\d+)*", value):
        return {k: int(v) for k, v in (p.split("=") for p in value.split(","))}
    raise click.BadParameter(f"{value!r}: give a count (1000) or counts per split "
                             "(train=1000,test=200)")


def common_options(default_order):
    """Options every importer shares; they arrive in the command as `opts` (a dict)."""
    def deco(f):
        opts = [
            click.option("--workers", "-j", type=click.IntRange(1), default=None,
                         help="Decoding processes [default: all cores]."),
            click.option("--limit", callback=_limit_spec, metavar="N|SPLIT=N,...",
                         help="Keep the first N images of each split (after ordering), for quick "
                              "subsets."),
            click.option("--per-class-limit", callback=_limit_spec, metavar="K|SPLIT=K,...",
                         help="Keep the first K images of each class, in file order."),
            click.option("--val-fraction", type=click.FloatRange(0, 1, max_open=True), default=0.0,
                         help="Carve this fraction of train (per class, seeded) into a val split."),
            click.option("--val-name", default="val", show_default=True,
                         help="Name of the split --val-fraction makes."),
            click.option("--seed", type=int, default=0, show_default=True,
                         help="Seed of --val-fraction and of the shuffled order."),
            click.option("--order", type=click.Choice(["shuffled", "file"]), default=default_order,
                         show_default=True, help="Images in the shards: in a seeded random order "
                         "(so streaming reads mix classes) or in file order."),
            click.option("--shard-size", type=click.IntRange(1), default=None,
                         help="Images per shard [default: about 128 MiB per shard]."),
            click.option("--compress", type=click.IntRange(0, 9), default=0, show_default=True,
                         help="gzip level for the shards; 0 = none (fastest loading, mmap-able)."),
            click.option("--name", default=None, help="Dataset name in the manifest."),
            click.option("--quiet", "-q", is_flag=True, help="No progress bar."),
        ]
        for o in reversed(opts):
            f = o(f)
        return f
    return deco


def size_options(default_size):
    def deco(f):
        f = click.option("--resample", type=click.Choice(["bilinear", "bicubic", "lanczos", "box"]),
                         default="bilinear", show_default=True, help="Resize filter.")(f)
        f = click.option("--resize", "resize_mode", type=click.Choice(["center-crop", "short-side"]),
                         default="center-crop", show_default=True,
                         help="center-crop: store SxS. short-side: keep the aspect ratio with "
                              "the short side S (variable-size storage, for random-resized-crop "
                              "training).")(f)
        return click.option("--size", type=click.IntRange(1), default=default_size,
                            show_default=default_size is not None,
                            help="Resize so the short side is S pixels." +
                            ("" if default_size else " [default: keep the stored size]"))(f)
    return deco


def _run(command, builder, src, out, opts, **kw):
    """Build the job, pack it and print a summary; bad input becomes a UsageError naming it."""
    select = {"per_class_limit": opts["per_class_limit"], "val_fraction": opts["val_fraction"],
              "val_name": opts["val_name"], "seed": opts["seed"],
              "shuffle": opts["order"] == "shuffled", "limit": opts["limit"]}
    recorded = {k: v for k, v in {**opts, **kw}.items() if k not in ("workers", "quiet")}
    kw["crop"] = kw.pop("resize_mode") == "center-crop"
    try:
        job = builder(src, command=command, options=recorded, name=opts["name"],
                      shard_size=opts["shard_size"], compress=opts["compress"], select=select, **kw)
        manifest = pack(job, out, workers=opts["workers"], progress=not opts["quiet"])
    except PackError as e:
        raise click.UsageError(str(e)) from None
    except KeyboardInterrupt:
        click.echo(f"\ninterrupted: finished shards in {out} are kept; run the same command again "
                   "to finish.", err=True)
        sys.exit(130)
    _summary(manifest, out)


def _summary(m, out):
    h, w, c = m["image_shape"]
    kind = f"{h}x{w}x{c}" if m["layout"] == "fixed" else f"short side {h}, x{c} (variable)"
    click.echo(f"{out}: {m['name']}, {m['num_classes']} classes, {kind}")
    for name, s in m["splits"].items():
        click.echo(f"  {name:6s} {s['count']:>9,d} images in {len(s['shards'])} shard(s)"
                   + (f", {s['skipped']} skipped" if s["skipped"] else ""))
    skipped = sum(s["skipped"] for s in m["splits"].values())
    if skipped:
        click.echo(f"  {skipped} input(s) could not be read: see {out}/{shards.REPORT}")
    click.echo(f"  mean {', '.join(f'{v:.4f}' for v in m['mean'])}  "
               f"std {', '.join(f'{v:.4f}' for v in m['std'])}")


@prep.command("imagenet")
@click.argument("src", type=click.Path(exists=True, file_okay=False))
@click.argument("out", type=click.Path(file_okay=False))
@size_options(64)
@click.option("--val-labels", type=click.Path(exists=True, dir_okay=False),
              help=f"Labels of a flat val/: Kaggle's {imagenet.KAGGLE_CSV} or the devkit's "
                   f"{imagenet.DEVKIT_TRUTH} [default: looked for beside SRC].")
@click.option("--devkit", type=click.Path(exists=True),
              help="ILSVRC2012_devkit_t12 folder or .tar.gz (val labels and class names; "
                   "needs scipy for meta.mat).")
@click.option("--classes", type=click.Path(exists=True, dir_okay=False),
              help="Class names: `wnid<TAB>name` lines or Kaggle's LOC_synset_mapping.txt.")
@common_options("shuffled")
def imagenet_cmd(src, out, size, resize_mode, resample, val_labels, devkit, classes, **opts):
    """Pack ILSVRC2012: SRC/train/<wnid>/*.JPEG and SRC/val/.

    val/ may be val/<wnid>/ folders, or flat files labelled by Kaggle's LOC_val_solution.csv or
    by the devkit (ILSVRC2012_validation_ground_truth.txt + meta.mat). Class index = position of
    the wnid in the sorted list of train/ folders.

    Example: ternet prep imagenet /data/ILSVRC2012 /data/imagenet64 --size 64
    """
    _run("imagenet", imagenet.build_job, src, out, opts, size=size, resize_mode=resize_mode,
         resample=resample, val_labels=val_labels, devkit=devkit, classes=classes)


@prep.command("cifar10")
@click.argument("src", type=click.Path(exists=True))
@click.argument("out", type=click.Path(file_okay=False))
@size_options(None)
@click.option("--classes", type=click.Path(exists=True, dir_okay=False),
              help="Class names file (one per line, or id<TAB>name).")
@common_options("shuffled")
def cifar10_cmd(src, out, size, resize_mode, resample, classes, **opts):
    """Pack CIFAR-10: cifar-10-python.tar.gz, its extracted cifar-10-batches-py/, or class
    folders of images (SRC/train/<class>/, SRC/test/<class>/).

    The pickled sets keep their file order (--order applies to class folders only).

    Example: ternet prep cifar10 cifar-10-python.tar.gz data/cifar10
    """
    if cifar.read_batches(src) is not None:
        opts["order"] = "file"
    _run("cifar10", cifar.build_job, src, out, opts, size=size, resize_mode=resize_mode,
         resample=resample, classes=classes)


@prep.command("mnist")
@click.argument("src", type=click.Path(exists=True, file_okay=False))
@click.argument("out", type=click.Path(file_okay=False))
@size_options(None)
@click.option("--channels", type=click.Choice(["1", "3"]), default="1", show_default=True,
              help="Store grayscale (1) or replicate to RGB (3).")
@click.option("--classes", default="digits", show_default=True,
              help="Class names: 'digits', 'fashion-mnist', or a file (one name per line).")
@common_options("file")
def mnist_cmd(src, out, size, resize_mode, resample, channels, classes, **opts):
    """Pack MNIST-style IDX files (MNIST, Fashion-MNIST), gzipped or not.

    SRC holds train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz] and the t10k-* pair.

    Example: ternet prep mnist /usr/share/datasets/fashion-mnist data/fmnist --classes fashion-mnist
    """
    _run("mnist", idx.build_job, src, out, opts, size=size, resize_mode=resize_mode,
         resample=resample, channels=int(channels), classes=classes)


@prep.command("folder")
@click.argument("src", type=click.Path(exists=True, file_okay=False))
@click.argument("out", type=click.Path(file_okay=False))
@size_options(None)
@click.option("--channels", type=click.Choice(["1", "3"]), default="3", show_default=True,
              help="Store RGB (3) or grayscale (1).")
@click.option("--classes", type=click.Path(exists=True, dir_okay=False),
              help="Class names file (id<TAB>name lines, id = folder name).")
@common_options("shuffled")
def folder_cmd(src, out, size, resize_mode, resample, channels, classes, **opts):
    """Pack class folders: SRC/<class>/* or SRC/{train,val,test}/<class>/*.

    Class index = position of the folder name in the sorted list of train's class folders.
    Without --size every image must have the size of the first one (others are reported).

    Example: ternet prep folder mnist-png/ data/mnist --channels 1
    """
    _run("folder", folder.build_job, src, out, opts, size=size, resize_mode=resize_mode,
         resample=resample, channels=int(channels), classes=classes)


@prep.command("verify")
@click.argument("out", type=click.Path(exists=True))
def verify_cmd(out):
    """Re-check a packed dataset OUT against its manifest.json: every shard's size and sha256,
    format and version, image count, label range, per-class counts and image shapes.

    Exits 1 listing the problems; the fix is to re-run the `ternet prep` command that made OUT
    (shards that are still good are kept).
    """
    try:
        ds = shards.open_dataset(out)
    except shards.ShardFormatError as e:
        raise click.ClickException(str(e)) from None
    problems = ds.verify()
    for p in problems:
        click.echo(f"PROBLEM: {p}", err=True)
    if problems:
        raise click.ClickException(f"{len(problems)} problem(s) in {out}; re-run the `ternet prep` "
                                   "command that made it (finished shards are reused)")
    n = sum(len(ds.shards(s)) for s in ds.splits)
    click.echo(f"{out}: OK ({n} shards checked: {', '.join(f'{k} {v:,d}' for k, v in ds.splits.items())})")
