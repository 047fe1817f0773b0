"""The `ternet` command: prep, train, eval, inspect, export, sweep.
Run `ternet --help`, `ternet train --help`."""
import json
import pathlib
import sys
import time

import click

from data_prep.cli import prep

from .config import Config
from .inspect import DEFAULT_ROWS

D = Config()


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
def cli():
    """ternet: train ternary neural networks (weights and activations in {-1, 0, +1}).

    \b
    Typical day:
      ternet prep mnist /usr/share/datasets/fashion-mnist data/fmnist   # pack a dataset once
      ternet train --data data/fmnist --arch lenet --epochs 20         # train
      ternet inspect runs/<name>                                       # weight states, flips
    """


cli.add_command(prep)

# (field, click type, help) -- every option maps onto one Config field
TRAIN_OPTIONS = [
    ("data", str, "Prepared dataset folder (from `ternet prep`). Default: the embedded Fashion-MNIST subset."),
    ("arch", str, "Preset (lenet, vgg-gxnor, resnet18) or architecture string, e.g. 32C5p0-MP2-64C5p0-MP2-512FC-10. "
                  "Tokens: <C>C<k>[s<S>][p<P>] conv, MP<k>/AP<k> pool, <F>FC, RB<C>[s<S>] residual block, GAP, "
                  "Rx repeat, last the class count."),
    ("bits", int, "N: weights take 2^N + 1 states in [-1, 1] (1 = ternary)."),
    ("act_r", float, "Activation threshold r: phi_r(x) = +1 if x > r, -1 if x < -r, else 0 (the authors' code: 1)."),
    ("act_a", float, "Half-width a of the surrogate-derivative window r-a <= |x| <= r+a (the authors' code: 0.5)."),
    ("window", click.Choice(["rect", "tri"]), "Shape of the surrogate-derivative window."),
    ("loss", click.Choice(["xent", "sqhinge"]), "Softmax cross-entropy, or the squared hinge loss of the authors' code."),
    ("label_smoothing", float, "Label smoothing eps of the training loss (xent): each target is (1 - eps) on the label "
                               "and eps / K on every class. The evaluation's loss is plain cross-entropy. 0: none."),
    ("sampler", str, "Transition rule for the discrete weights: bop (momentum threshold, the default), dst "
                     "(GXNOR's discrete state transition; with --source sgd it keeps no per-weight memory), "
                     "metropolis (docs/samplers.md)."),
    ("source", click.Choice(["sgd", "adam"]), "DST step: sgd (dW = -lr g, no per-weight memory; --set norm=rms "
                                              "divides g by the layer's gradient rms) or adam (two fp32 "
                                              "moments per weight, as the authors' code)."),
    ("lr", float, "Learning rate of the discrete weights (0: 20 for sgd, 0.03 for sgd with --set norm=rms, "
                  "0.01 for adam)."),
    ("lr_end", float, "Final learning rate of cosine/exp/linear schedules."),
    ("lr_schedule", click.Choice(["constant", "step", "exp", "cosine", "linear"]), "Learning-rate schedule."),
    ("lr_every", int, "step schedule: decay every this many epochs."),
    ("lr_gamma", float, "step schedule: decay factor."),
    ("m", float, "DST sharpness m: extra-step probability tanh(m |nu| / dz)."),
    ("m_end", float, "Anneal m linearly to this value (0: keep m constant)."),
    ("bn_optim", click.Choice(["adam", "sgd"]), "Optimizer of the batch-norm parameters (real)."),
    ("bn_lr", float, "Learning rate of the batch-norm parameters (follows the same schedule)."),
    ("epochs", int, "Epochs to train."),
    ("batch_size", int, "Training batch size."),
    ("eval_batch_size", int, "Evaluation batch size."),
    ("eval_tta", click.Choice(["none", "flip"]), "flip: each epoch also evaluates every split with test-time "
                                                "flips (the mean logits of each image and its mirror image) and "
                                                "logs them as test_acc_flip / test_loss_flip next to the plain "
                                                "figures, which stay the run's accuracy. Costs a second pass. For "
                                                "classes that keep their meaning in a mirror (not digits)."),
    ("augment", click.Choice(["none", "auto", "crop-flip", "crop", "rrc-flip"]),
     "Training augmentation (auto: crop+flip for colour images, none for grayscale; crop: random "
     "shifts by up to --crop-pad pixels without mirroring, e.g. for digits)."),
    ("crop_pad", int, "Largest random shift in pixels of --augment crop and crop-flip (zero padding of that "
                      "width, then a crop back to the image size). 0: automatic, round(H/8) and at least 1, "
                      "e.g. 4 px at 32 px (and at 28 px); 1 or 2 keeps 28-px digits more intact. Not used by "
                      "the other augmentations, so a value > 0 with them is an error."),
    ("cutout", int, "Cutout (DeVries & Taylor 2017): a random N x N square of every training image set to the "
                    "mean pixel (0 after normalisation), its centre uniform over the image and the square "
                    "clipped at the edges; after --augment's crop and flip. 0: none. E.g. 8 or 16 at 32 px."),
    ("seed", int, "Seed of every random stream (initialisation, shuffling, augmentation, transitions)."),
    ("device", click.Choice(["auto", "cpu", "cuda"]), "Where to train."),
    ("cuda_graph", click.Choice(["off", "on"]), "on: capture the GPU training step once as a CUDA graph and replay "
                                               "it for every full batch (one launch instead of ~100-400 from "
                                               "Python: for small batches, where the host bounds the step). Same "
                                               "results bit for bit. Needs --device cuda, one process, no "
                                               "--grad-shards, and a sampler that supports it (bop, dst)."),
    ("save_memory", click.Choice(["off", "on"]), "on: the GPU keeps less from the forward to the backward: the "
                                                "first layer's output (float32) is computed again in the backward "
                                                "instead of kept (where the first layer feeds its batch norm "
                                                "directly: vgg-gxnor, resnet18; not lenet), fused batch-norm "
                                                "backwards write their gradient over the one they receive, "
                                                "plain batch norms on integer inputs (ResNet's) keep them as "
                                                "int16 rather than xhat as float32. One more first-layer forward "
                                                "per step; the same results bit for bit. On an H200 at the "
                                                "benchmark shapes: 27-42 % less at the step's peak, 1-7 % slower "
                                                "(docs/performance.md). On the CPU it changes nothing."),
    ("log_every", int, "Steps between metrics lines."),
    ("ckpt_every", int, "Steps between mid-epoch checkpoints (0: only at epoch ends)."),
    ("keep_last", int, "Checkpoints to keep."),
    ("average_last", int, "After the last epoch, also make one ternary model of the newest K checkpoints (as "
                          "`ternet average RUN --last K`: each weight at the state nearest its mean, batch-norm "
                          "statistics recomputed), write it as RUN/average-lastK.h5 and log its accuracy. Needs "
                          "--keep-last >= K; with --ckpt-every 0 the checkpoints are the last K epochs'. 0: none."),
    ("grad_shards", int, "Split each (global) batch into this many shards: each gets its own forward, loss, backward "
                         "and batch-norm statistics, the gradients are averaged. Default: the number of processes "
                         "(--procs/--gpus); `--grad-shards K` in one process reproduces a K-process run."),
    ("init", str, "Start from the weights of this checkpoint (an .h5 file, or a run folder: its newest): discrete "
                  "states, batch-norm parameters and running statistics. The schedules, the sampler's and the "
                  "optimizer's state start fresh, e.g. a second stage at a larger batch. Same --arch, --bits "
                  "and class count as that run."),
    ("check_every", int, "With several processes: steps between checks that all replicas hold identical weights "
                         "(0: never)."),
]


def _add_train_options(f):
    for name, typ, help_ in reversed(TRAIN_OPTIONS):
        f = click.option(f"--{name.replace('_', '-')}", name, type=typ, default=getattr(D, name),
                         show_default=True, help=help_)(f)
    return f


def _explicit(ctx):
    from click.core import ParameterSource
    return {name for name, _, _ in TRAIN_OPTIONS
            if ctx.get_parameter_source(name) in (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT)}


@cli.command()
@_add_train_options
@click.option("--set", "extra", multiple=True, metavar="KEY=VALUE",
              help="Sampler setting, e.g. --set temperature=0.01 (see docs/samplers.md). Repeatable.")
@click.option("--name", default="", help="Run name (default: <arch>-<data>-<date-time>).")
@click.option("--runs-dir", default="runs", show_default=True, type=click.Path(file_okay=False),
              help="Where run folders go.")
@click.option("--resume", "resume", default=None, type=click.Path(),
              help="Continue the run in this folder from its newest checkpoint. Other options must match "
                   "the run's config.json (or be left out).")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@click.option("--procs", default=1, show_default=True, type=click.IntRange(1),
              help="Data-parallel on the CPU: K processes of this host, each on its shards of the batch "
                   "(shared-memory collective). Bit-identical to one process with --grad-shards K.")
@click.option("--gpus", default=1, show_default=True, type=click.IntRange(1),
              help="Data-parallel on K GPUs of this host, one process each (NCCL through cupy; bit-identical "
                   "to one process with --grad-shards K; run on 2 GPUs so far, see docs/distributed.md).")
@click.option("--launcher", default="spawn", show_default=True, type=click.Choice(["spawn", "env"]),
              help="spawn: this command starts the --procs/--gpus processes. env: this process is one rank of a "
                   "job started by mpirun or srun, one per GPU (rank and world from the environment).")
@click.pass_context
def train(ctx, extra, name, runs_dir, resume, quiet, procs, gpus, launcher, **opts):
    """Train a ternary network; writes runs/<name>/ (config, metrics, checkpoints).

    With no options: `lenet` on the embedded Fashion-MNIST subset, CPU or GPU.
    Several processes: --procs K (CPU), --gpus K (GPUs), --launcher env (multi-host, docs/distributed.md).
    """
    from . import distributed
    from .config import validate
    from .data_parallel import validate_world
    from .train import collective_device
    if procs > 1 and gpus > 1 or launcher == "env" and max(procs, gpus) > 1:
        raise click.UsageError("pick one of --procs K, --gpus K and --launcher env")
    rank, world, backend = 0, max(procs, gpus), "shm" if procs > 1 else "nccl"
    if launcher == "env":
        rank, world = distributed.env_rank_world()[:2]
        backend = "nccl"
    cfg, run = _resolve_run(ctx, opts, _parse_extra(extra), name, runs_dir, resume, world, rank == 0)
    try:                                   # fail here, before starting processes
        validate(cfg)
        validate_world(cfg, world)
        if world > 1:
            collective_device(cfg, backend == "nccl")
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    args = (cfg.to_json(), str(run.path), bool(resume), quiet)
    if launcher == "spawn" and world > 1:
        code = distributed.spawn(world, backend, _spawned_rank, args)
    else:
        coll = distributed.from_env() if launcher == "env" else distributed.LocalCollective()
        try:
            code = _train_rank(coll, *args)
        finally:
            coll.close()
    if code:
        sys.exit(code)


def _resolve_run(ctx, opts, extra, name, runs_dir, resume, world, main):
    """(config, run folder) from the options, or from the folder being resumed; checks conflicts."""
    from .run import RunDir
    if resume:
        run = RunDir(resume)
        if not run.exists():
            raise click.BadParameter(f"{resume} is not a run folder (no config.json)", param_hint="--resume")
        cfg = run.config()
        for field in sorted(_explicit(ctx)):
            if opts[field] != getattr(cfg, field):
                raise click.UsageError(f"--{field.replace('_', '-')} {opts[field]!r} conflicts with the run's "
                                       f"{field}={getattr(cfg, field)!r} in {run.config_path}; leave the option out "
                                       "to resume, or start a new run")
        if extra and tuple(sorted(extra.items())) != cfg.extra:
            raise click.UsageError(f"--set {extra} conflicts with the run's settings {dict(cfg.extra)}")
    else:
        if "grad_shards" not in _explicit(ctx):
            opts = dict(opts, grad_shards=world)
        cfg = Config(**opts, extra=tuple(sorted(extra.items()))).resolve()
        _check_data(cfg.data)
        if cfg.init and not pathlib.Path(cfg.init).exists():
            raise click.BadParameter(f"{cfg.init} does not exist; give a checkpoint file (ckpt-*.h5) or a run folder",
                                     param_hint="--init")
        run = RunDir(pathlib.Path(runs_dir) / (name or _default_name(cfg)))
        if main and run.exists():
            raise click.UsageError(f"{run.path} already holds a run; pick another --name, or continue it with "
                                   f"--resume {run.path}")
    return cfg, run


def _train_rank(coll, cfg_json, run_path, resume, quiet):
    """Train as rank coll.rank (rank 0 writes the run folder and reports); returns the exit code."""
    from .arch import ArchError
    from .distributed import ReplicaDivergence
    from .run import RunDir
    from .train import Trainer, latest_checkpoint
    cfg, run, main = Config.from_dict(json.loads(cfg_json)), RunDir(run_path), coll.rank == 0
    try:
        trainer = Trainer(cfg, run, progress=not quiet, coll=coll)
    except ArchError as e:
        raise click.BadParameter(str(e), param_hint="--arch") from None
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    if resume:
        ck = latest_checkpoint(run)      # every rank reads it (multi-host: a shared filesystem)
        if ck is not None:
            trainer.restore(ck)
            if main:
                click.echo(f"resuming {run.path} at epoch {trainer.state['epoch'] + 1}, step {trainer.state['step']}")
        else:
            trainer.run.truncate_metrics(0)
    else:
        if cfg.init:                     # before the run folder exists: a bad checkpoint leaves nothing behind
            try:
                trainer.initialize(cfg.init)
            except ValueError as e:
                raise click.BadParameter(str(e), param_hint="--init") from None
        trainer.run.create(cfg)          # rank 0's; the others' is a NullRunDir
    if main:
        _describe(trainer, run, quiet)
    try:
        last = trainer.fit()
    except KeyboardInterrupt as e:
        if main:
            click.echo(f"\n{e}", err=True)
        return 130
    except ReplicaDivergence as e:
        raise click.ClickException(f"rank {coll.rank}: {e}") from None
    if main and last and "test_acc" in last:
        click.echo(f"done: test accuracy {last['test_acc']:.4f}; run folder {run.path}")
    if main and cfg.average_last:
        rec = trainer.average()
        shown = "; ".join(f"{s} accuracy {rec[f'{s}_acc']:.4f}" for s in ("val", "test") if f"{s}_acc" in rec)
        click.echo(f"average of the last {cfg.average_last} checkpoints: {shown}; {run.path / rec['path']}")
    return 0


def _spawned_rank(coll, *args):
    """_train_rank in a process started by --procs / --gpus: click's errors are shown, not raised."""
    try:
        return _train_rank(coll, *args)
    except click.ClickException as e:
        e.show()
        return e.exit_code


def _parse_extra(items):
    out = {}
    for item in items:
        if "=" not in item:
            raise click.BadParameter(f"{item!r} is not KEY=VALUE", param_hint="--set")
        k, v = item.split("=", 1)
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            out[k] = v
    return out


def _check_data(path):
    if path and not pathlib.Path(path).exists():
        raise click.BadParameter(f"{path}: no such folder. HINT: pack a dataset first, e.g. "
                                 f"`ternet prep cifar10 SRC {path}`", param_hint="--data")


def _default_name(cfg):
    arch = cfg.arch if len(cfg.arch) <= 24 else "custom"
    data = pathlib.Path(cfg.data).name if cfg.data else "fmnist-small"
    return f"{arch}-{data}-{time.strftime('%Y%m%d-%H%M%S')}"


def _describe(trainer, run, quiet):
    if quiet:
        return
    m, d, procs = trainer.model, trainer.data, trainer.coll.world
    where = ("cuda" if trainer.device else "cpu") + (f" x {procs} processes" if procs > 1 else "")
    shards = f", {trainer.cfg.grad_shards} shards per batch" if trainer.cfg.grad_shards > 1 else ""
    click.echo(f"run {run.path}: {trainer.cfg.arch} ({m.num_weights():,} discrete weights, {2 * m.qmax + 1} states) "
               f"on {d.path} ({', '.join(f'{k} {v}' for k, v in d.splits.items())}), "
               f"{where}, {trainer.cfg.epochs} epochs x {trainer.spe} steps{shards}")


@cli.command("eval")
@click.argument("run_path", metavar="RUN", type=click.Path(exists=True))
@click.option("--data", default=None, help="Prepared dataset to evaluate on (default: the run's own).")
@click.option("--split", default=None, help="Split to evaluate (default: every val/test split present).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--integer", is_flag=True, help="Run the exported integer network (integer arithmetic only, CPU). "
                                              "RUN may also be an export (npz, h5 or CUTIE folder).")
@click.option("--compare", is_flag=True, help="With --integer on a run: also run the float path and count the "
                                              "images where both predict the same class.")
@click.option("--engine", type=click.Choice(["int", "f32"]), default="int", show_default=True,
              help="--integer: int = integer kernels; f32 = float32 BLAS on the same integer values (exact: "
                   "every sum stays an integer below 2^24), where BLAS is faster.")
@click.option("--limit", type=int, default=0, help="--integer: only the first N images of the split.")
@click.option("--rounding", type=click.Choice(["float32", "exact"]), default="float32", show_default=True,
              help="--integer on a run: fold as `ternet export --rounding` does.")
@click.option("--ckpt", default=None, type=click.Path(exists=True, dir_okay=False),
              help="Checkpoint to evaluate (default: the run's newest), e.g. the file `ternet average` wrote.")
@click.option("--tta", type=click.Choice(["none", "flip"]), default="none", show_default=True,
              help="Test-time augmentation: flip = classify by the mean of the logits of each image and "
                   "its mirror image (two forward passes; not what training reports each epoch).")
def eval_cmd(run_path, data, split, device, integer, compare, engine, limit, rounding, ckpt, tta):
    """Evaluate a run's newest checkpoint (or --ckpt FILE) on a prepared dataset."""
    from .evaluate import evaluate_run
    if integer and tta != "none":
        raise click.UsageError("--tta works on the float path only; leave it out with --integer")
    if integer and ckpt:
        raise click.UsageError("--ckpt works on the float path only; for the integer network of a checkpoint, "
                               "`ternet export RUN --ckpt FILE` and then `ternet eval EXPORT --integer`")
    if integer:
        from .deploy import integer_eval_cli
        return integer_eval_cli(run_path, data, split, compare, engine, limit, click.echo, rounding)
    try:
        results = evaluate_run(run_path, data=data, split=split, device=device, tta=tta, ckpt=ckpt)
    except (FileNotFoundError, ValueError) as e:
        raise click.UsageError(str(e)) from None
    for s, (loss, acc) in results.items():
        click.echo(f"{s}: loss {loss:.4f} accuracy {acc:.4f}")


@cli.command()
@click.argument("run_path", metavar="RUN", type=click.Path(exists=True, file_okay=False))
@click.option("--last", type=click.IntRange(min=1), default=8, show_default=True,
              help="Average the run's newest K checkpoints (train with --keep-last K, and --ckpt-every 0 for "
                   "one checkpoint per epoch).")
@click.option("--images", type=click.IntRange(min=1), default=10000, show_default=True,
              help="Training images (with the run's augmentation) over which the batch-norm statistics of the "
                   "averaged weights are recomputed.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--out", default=None, type=click.Path(dir_okay=False),
              help="Checkpoint file to write (default: RUN/average-last<K>.h5; --resume never picks it).")
@click.option("--tta", type=click.Choice(["none", "flip"]), default="none", show_default=True,
              help="flip: also print the average's accuracy with test-time flips (as `ternet eval --tta flip`).")
def average(run_path, last, images, device, out, tta):
    """One ternary model from a run's last K checkpoints: every weight takes the state nearest to its
    mean state (ties: the newest), the batch-norm parameters their mean, and the batch-norm statistics
    are recomputed. Prints the newest checkpoint's and the average's accuracy; evaluate or export the
    average with --ckpt."""
    from .average import average_run
    try:
        r = average_run(run_path, last, images, device, out, tta)
    except (FileNotFoundError, ValueError) as e:
        raise click.UsageError(str(e)) from None
    for s, (l0, a0) in r["newest"].items():
        l1, a1 = r["average"][s]
        flip = f"; with flips loss {r['average_flip'][s][0]:.4f} accuracy {r['average_flip'][s][1]:.4f}" \
            if tta != "none" else ""
        click.echo(f"{s}: newest checkpoint loss {l0:.4f} accuracy {a0:.4f}; average of {last}: "
                   f"loss {l1:.4f} accuracy {a1:.4f}{flip}")
    click.echo(f"{r['changed']:.2%} of the weights differ from the newest checkpoint's; batch-norm statistics "
               f"over {r['images']:,} training images; wrote {r['path']}")


@cli.command("export")
@click.argument("run_path", metavar="RUN", type=click.Path(exists=True, file_okay=False))
@click.option("--format", "fmt", type=click.Choice(["npz", "h5", "cutie"]), default="npz", show_default=True,
              help="npz/h5: ternet's integer network (int8 weights, integer thresholds, graph as JSON); "
                   "cutie: a folder with per-layer .npy files and _config.json (see docs/export.md).")
@click.option("--out", default=None, type=click.Path(), help="Output file or folder (default: inside RUN).")
@click.option("--target", type=click.Choice(["cutie"]), default=None,
              help="Check the network against an accelerator's limits and list, layer by layer, what it "
                   "cannot take; everything is still exported for simulation.")
@click.option("--pack", type=click.Choice(["2bit", "5trit"]), multiple=True,
              help="cutie: also write packed weights (2 bits per trit, or 5 trits per byte). Repeatable.")
@click.option("--name", default="net", show_default=True, help="cutie: file name prefix.")
@click.option("--ckpt", default=None, type=click.Path(exists=True, dir_okay=False),
              help="Checkpoint to export (default: the run's newest).")
@click.option("--rounding", type=click.Choice(["float32", "exact"]), default="float32", show_default=True,
              help="Sums of real values (first layer, classifier logits): float32 = round them as the float "
                   "evaluator does (same predictions, ties included); exact = exact integer sums, as an "
                   "accelerator computes them.")
def export_cmd(run_path, fmt, out, target, pack, name, ckpt, rounding):
    """Export a trained run for ternary accelerators: integer weights and thresholds."""
    from .deploy import export_run
    try:
        path, net, report = export_run(run_path, fmt, out, target, pack, name, ckpt, rounding)
    except (FileNotFoundError, ValueError) as e:
        raise click.UsageError(str(e)) from None
    if report:
        click.echo(report)
    click.echo(f"wrote {path} ({fmt}, {len(net.nodes)} nodes)")


@cli.command()
@click.argument("run_path", metavar="RUN", type=click.Path(exists=True, file_okay=False))
@click.option("--png", type=click.Path(dir_okay=False), default=None, help="Also draw the histograms to this PNG.")
@click.option("--json", "as_json", is_flag=True, help="Print the per-epoch, per-layer statistics as JSON (every epoch).")
@click.option("--rows", type=click.IntRange(min=0), default=DEFAULT_ROWS, show_default=True,
              help="Epoch rows per layer in the terminal view: a longer run shows this many, evenly spaced, "
                   "first and last included. 0: every epoch.")
def inspect(run_path, png, as_json, rows):
    """Weight-state histograms (how many of each state per layer) per epoch, and flip rates."""
    from .inspect import inspect_run
    try:
        inspect_run(run_path, png=png, as_json=as_json, echo=click.echo, rows=rows)
    except (FileNotFoundError, ValueError) as e:
        raise click.UsageError(str(e)) from None


@cli.command()
@click.argument("config", type=click.Path(exists=True, dir_okay=False))
@click.option("--runs-dir", default="runs", show_default=True, type=click.Path(file_okay=False),
              help="The sweep's folder is RUNS_DIR/<name>: one run folder per algorithm and seed, and the results.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default=None,
              help="Override the config's device for new runs.")
@click.option("-j", "--jobs", default=1, show_default=True, type=click.IntRange(1), help="Runs at a time.")
@click.option("--only", multiple=True, help="Run only this algorithm (repeatable).")
@click.option("--report-only", is_flag=True, help="Write the table and curves from the runs already there.")
def sweep(config, runs_dir, device, jobs, only, report_only):
    """Algorithms x seeds from CONFIG (TOML or JSON; see ternet/sweep.py and docs/samplers.md), selected
    on the val split: results.md, results.json and curves.png. Restartable: finished runs are skipped."""
    from .sweep import sweep as run_sweep
    try:
        failed = run_sweep(config, runs_dir, device, jobs, only, report_only, echo=click.echo)
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    if failed:
        raise click.ClickException(f"{len(failed)} run(s) failed: {', '.join(failed)} (see their .log files)")


def main():
    cli()
