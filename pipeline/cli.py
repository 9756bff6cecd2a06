"""Command line of the pipeline. Errors print one readable line (a traceback with --debug) and exit 2. The option
helps are written from the registries (methods, budget resources, target profiles, zoo models), so they name
what exists."""

import argparse
import json
import sys
from pathlib import Path

from pipeline.errors import PipelineError

TORCH_DEVICE_HELP = ("where fine-tuning and the sensitivity sweep run: auto (a CUDA GPU when torch sees one, else the "
                     "CPU), cpu, cuda or cuda:N (default: the profile's [finetune] device, auto)")
DATA_HELP = ("CIFAR-10 folder, fashion-mnist, a folder with train.npz + test.npz, a .npz (x_train/y_train/x_test/"
             "y_test, or x/y: split here), or an image folder train/<class>/*.png + test/<class>/ (default: CIFAR-10)")


DESCRIPTION = ("Compress a trained PyTorch CNN by low-rank factorisation, export it to ONNX, quantize it to int8 and "
               "emit it for a Raspberry Pi (ONNX Runtime) or a Cortex-M board (TFLite Micro, firmware), with its "
               "cost and accuracy measured against the dense model. `cnn-deploy COMMAND --help` for each command.")


def known_models() -> str:
    from pipeline.zoo import ZOO

    return ", ".join(ZOO)


def known_methods() -> str:
    from pipeline.compress.methods import METHODS

    return ", ".join(METHODS)


def known_targets() -> str:
    from targets import known_targets

    return ", ".join(known_targets())


def target_help(default: str, what: str = "a profile") -> str:
    return f"{what} ({known_targets()}) or path/to/board.toml (default: {default})"


def budget_forms() -> str:
    from pipeline.deploy import NO_BUDGET
    from targets.budget import ALIASES, RESOURCES

    aliases = "; ".join(f"{alias}: is {name}:" for alias, name in ALIASES.items())
    return (f"F (of MACs), {', '.join(f'{r}:F' for r in RESOURCES)} ({aliases}), arena:40KiB, several joined by "
            f"commas (cycles:0.58,arena:40KiB), or {NO_BUDGET}: keep fraction F of the dense model's MACs, parameters, "
            "estimated board cycles or activation arena, or bytes of arena")


def _add_model_flags(p) -> None:
    from pipeline.deploy import DEFAULT_MODEL

    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"a zoo model ({known_models()}), package.module:callable, path/to/file.py:callable "
                        f"path/to/model.onnx, model.keras, model.h5, saved_model_dir/ or a float model.tflite (default: "
                        f"{DEFAULT_MODEL})")
    p.add_argument("--weights", help="state-dict checkpoint (default: the zoo's; an ONNX file holds its own)")
    p.add_argument("--input-shape", help="C x H x W of one sample, e.g. 1x49x10 (default: the model's input_shape)")
    p.add_argument("--mean", type=float, nargs="+", help="per-channel mean, or one for all (default: the model's)")
    p.add_argument("--std", type=float, nargs="+", help="per-channel std, or one for all (default: the model's)")
    p.add_argument("--signature", help="a SavedModel's serving function, where it has several")


def _model(args, *, pretrained: bool = True):
    from pipeline.zoo import load_model, parse_shape

    return load_model(args.model, getattr(args, "weights", None), pretrained=pretrained,
                      input_shape=parse_shape(args.input_shape) if args.input_shape else None,
                      mean=args.mean, std=args.std, signature=args.signature)


def _hint(spec):
    from calib import Hint

    return Hint(*spec.input_shape)


def cmd_train(args) -> int:
    from calib import load_data
    from pipeline.zoo.train import train

    spec = _model(args, pretrained=args.weights is not None)  # weights given: train on from them
    data = load_data(args.data, hint=_hint(spec))
    data.check_for(input_shape=spec.input_shape, num_classes=spec.num_classes, model=args.model)
    args.out = args.out or f"{spec.name.rsplit(':', 1)[-1]}.pt"
    result = train(spec, data.train, test_set=data.test, epochs=args.epochs, seed=args.seed, out=args.out,
                   device=args.torch_device,
                   flip=not args.no_flip, batch_size=args.batch_size, lr=args.lr)
    print(f"{args.model}: test top-1 {result['top1']:.2%} after {args.epochs} epochs on {result['torch_device']}; "
          f"weights in {args.out}")
    return 0


def cmd_decompose(args) -> int:
    from pipeline.compress.store import save_factored
    from pipeline.util import write_text
    from targets import load_target

    profile = load_target(args.target).override(
        decomposition={"method": args.method, "rank": args.rank, "layers": args.layers, "exclude": args.exclude,
                       "round_to": args.round_to, "budget": args.budget, "fit_samples": args.fit_samples},
        finetune={"epochs": args.finetune_epochs, "device": args.torch_device})
    settings, tuning = profile.decomposition, profile.finetune
    from pipeline.compress.teacher import check_teacher_settings

    check_teacher_settings(args.teacher, args.teacher_weights, epochs=tuning.epochs, profile=profile.name)
    spec = _model(args)
    if settings.budget or settings.fit_samples or tuning.epochs:  # these need training images
        from calib import load_data
        from pipeline.compress.stage import compress
        from pipeline.deploy import layer_cost_for

        data = load_data(args.data, hint=_hint(spec))
        data.check_for(input_shape=spec.input_shape, num_classes=spec.num_classes, model=args.model)
        from pipeline.zoo import load_model

        teacher = load_model(args.teacher, args.teacher_weights) if args.teacher else None
        result = compress(spec, data.train, settings=settings, tuning=tuning,
                          layer_cost=layer_cost_for(profile), teacher=teacher, seed=args.seed)
        model, plan = result.model, result.plan
    else:
        from pipeline.compress.decompose import decompose

        model, plan = decompose(spec.module, input_shape=spec.input_shape, settings=settings, seed=args.seed)
    print(plan.table())
    if args.out:
        save_factored(args.out, model, plan, model_name=spec.name, input_shape=spec.input_shape)
        write_text(Path(args.out).with_suffix(".plan.json"), plan.to_json())
        print(f"factored model: {args.out}; plan: {Path(args.out).with_suffix('.plan.json')}")
    return 0


def cmd_bench(args) -> int:
    from pipeline.bench.run import bench
    from pipeline.errors import ConfigError

    if len(args.epochs) not in (1, len(args.models)):
        raise ConfigError(f"--epochs got {len(args.epochs)} counts for {len(args.models)} models; expected one, "
                          "or one per model")
    epochs = args.epochs[0] if len(args.epochs) == 1 else dict(zip(args.models, args.epochs, strict=True))
    path = bench(models=tuple(args.models), budgets=tuple(args.budgets), epochs=epochs, targets=tuple(args.target),
                 data=args.data, eval_samples=args.eval_samples, out=args.out, latency_rounds=args.latency_rounds,
                 threads=args.threads)
    print(f"results: {path}; report: {path.with_name('report.md')}")
    return 0


def cmd_mlperf_tiny(args) -> int:
    from pipeline.bench.mlperf import mlperf_tiny

    path = mlperf_tiny(target=args.target, budget=args.budget, data=args.data, eval_samples=args.eval_samples,
                       out=args.out)
    print(path.with_suffix(".md").read_text())
    print(f"results: {path}; table: {path.with_suffix('.md')}")
    return 0


def cmd_families(args) -> int:
    from pipeline.bench.families import families

    path = families(models=tuple(args.models), targets=tuple(args.target), budget=args.budget, epochs=args.epochs,
                    data=args.data, eval_samples=args.eval_samples, out=args.out)
    print(path.with_name("report.md").read_text())
    print(f"results: {path}; report: {path.with_name('report.md')}")
    failed = [r for r in json.loads(path.read_text())["rows"] if "failed" in r]
    return 1 if failed else 0  # a refused family is a result; a build that failed is not


def _add_compression_flags(p, *, deploy: bool) -> None:
    """The compression settings deploy and decompose share; each overrides the target profile only when given."""
    from pipeline.deploy import DEFAULT_BUDGET

    p.add_argument("--method", help=f"override the profile's method, one of {known_methods()} (with no --budget: "
                                    "applied to every layer)")
    p.add_argument("--rank", help="override the profile's rank rule: evbmf, energy:0.9, an integer or a fraction")
    p.add_argument("--budget", help=f"{budget_forms()}; per-layer methods and ranks are then allocated by measured "
                                    "sensitivity, never a layer slower than dense on the board" +
                                    (f" (default: the profile's, else {DEFAULT_BUDGET}; none when --method or --rank "
                                     "is given)" if deploy else " (default: the profile's)"))
    p.add_argument("--finetune-epochs", type=int, help="epochs of distillation from the dense model, or from --teacher "
                                                       "(default: the profile's)")
    p.add_argument("--teacher", help="a model to distil from instead of the dense one, named as --model is (a larger "
                                     "net of the same images and classes, e.g. resnet56); needs --finetune-epochs")
    p.add_argument("--teacher-weights", help="the teacher's state-dict checkpoint (default: the zoo's)")
    p.add_argument("--torch-device", help=TORCH_DEVICE_HELP)


def cmd_deploy(args) -> int:
    from pipeline.deploy import deploy
    from pipeline.output import build_folder
    from pipeline.zoo import parse_shape
    from targets import load_target

    report = deploy(target=args.target, model=args.model, weights=args.weights, method=args.method, rank=args.rank,
                    budget=args.budget, finetune_epochs=args.finetune_epochs, exclude=args.exclude,
                    candidates=args.candidates, data=args.data,
                    eval_samples=args.eval_samples, input_shape=parse_shape(args.input_shape) if args.input_shape else None,
                    mean=args.mean, std=args.std, signature=args.signature, baseline=args.baseline,
                    device=args.device, teacher=args.teacher, teacher_weights=args.teacher_weights, out=args.out,
                    torch_device=args.torch_device, progress=not args.quiet)
    out = build_folder(load_target(args.target).name, args.out)
    print()
    print(report.summary_table())
    print(f"\nartefacts in {out}/ (report.md, manifest.json); {report.wall_seconds:.0f} s in all")
    return 0 if report.passed else 1


def add_deploy_parser(sub) -> None:
    p = sub.add_parser("deploy", help="decompose, export, quantize, emit and measure for a target")
    p.add_argument("--target", default="rpi4", help=target_help("rpi4"))
    _add_model_flags(p)
    _add_compression_flags(p, deploy=True)
    p.add_argument("--exclude", nargs="*", help="fnmatch patterns of layers to keep dense, replacing the rule that "
                                                "keeps the stem and classifier dense (none given: factor every layer)")
    p.add_argument("--candidates", nargs="+", help=f"the methods a budget may pick per layer or channel group, of "
                                                   f"{known_methods()} (default: the profile's; `prune` alone: channel "
                                                   "cuts only)")
    p.add_argument("--data", help=DATA_HELP)
    p.add_argument("--baseline", help="the model's own full-int8 .tflite, measured as it is as the dense_int8 "
                                      "variant (microcontroller targets)")
    p.add_argument("--eval-samples", type=int, help="class-balanced test subset size (0: full test set)")
    p.add_argument("--device", help="the profile's device for the on-device check; ssh://user@host also times the "
                                    "layer table and the variants on that board")
    p.add_argument("--out", help="output folder: new, empty or an earlier build, which it replaces whole "
                                 "(default: build/<profile name>)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(run=cmd_deploy)


def cmd_regress(args) -> int:
    from pipeline.device.regress import regress_all
    from pipeline.errors import ConfigError
    from pipeline.output import build_folder
    from targets import load_target

    if args.out and len(args.target) > 1:
        raise ConfigError(f"--out names one build folder and --target names {len(args.target)} targets; expected one "
                          "target with --out, or the builds in build/<profile name>")
    folders = [build_folder(load_target(target).name, args.out) for target in args.target]
    reports = regress_all(folders, device=args.device, eval_samples=args.eval_samples, data=args.data,
                          accept=args.accept, images=args.images)
    for folder, report in zip(folders, reports, strict=True):
        print(report.table())
        print(f"\nwritten: {folder / 'regress.json'}\n")
    return 0 if all(report.passed for report in reports) else 1


def cmd_firmware(args) -> int:
    """The int8 variants of a microcontroller build as firmware on the emulated board; the build's
    report.json and manifest.json gain the figures and files."""
    from pipeline.output import build_folder, check_build, writing
    from targets import load_target

    out = check_build(build_folder(load_target(args.target).name, args.out),
                      hint=f"; run `make deploy TARGET={args.target}` first")
    with writing(out):
        return _firmware(args, out)


def _firmware(args, out: Path) -> int:
    import json
    import shutil

    from calib import Hint, balanced_subset, load_dataset, preprocess
    from pipeline.device.benchmark_board import benchmark_for_build
    from pipeline.errors import InputError
    from pipeline.metrics import estimated_on
    from pipeline.report.deploy_report import firmware_table
    from pipeline.tflm.build import sources_root
    from pipeline.tflm.firmware import arena_with_margin, io_of
    from pipeline.tflm.on_board import firmware_for_build
    from pipeline.util import sha256_file, staging_beside, swap_in, write_text

    try:
        manifest = json.loads((out / "manifest.json").read_text())
        report = json.loads((out / "report.json").read_text())
        profile, settings = manifest["target_profile"], manifest["settings"]
    except (OSError, ValueError, KeyError) as exc:
        raise InputError(f"{out} holds no complete build ({exc}); run `make deploy TARGET={args.target}` first") from exc
    cpu = (profile.get("firmware") or {}).get("cpu")
    if profile["runtime"] != "tflite-micro" or not cpu:
        raise InputError(f"Target {profile['name']!r} has no firmware: it runs {profile['runtime']} on a board with an OS")
    test = load_dataset("test", settings.get("data"), hint=Hint(*settings["input_shape"]))
    idx = balanced_subset(test.y, args.samples or profile["firmware"]["samples"], seed=settings.get("seed", 0))
    details = {name: report["variants"][name]["details"] for name in ("dense_int8", "factored_int8")}
    root = sources_root(profile["firmware"]["sources"])
    staging = staging_beside(out)  # the build changes whole or not at all
    try:
        shutil.copytree(out, staging, dirs_exist_ok=True)
        figures, notes = firmware_for_build(
            staging, cpu=cpu, root=root, x_nchw=preprocess(test.x[idx], mean=settings["mean"], std=settings["std"]),
            arenas={n: arena_with_margin(d["arena_bytes"], profile["memory"]["arena_margin"]) for n, d in details.items()},
            ios={n: io_of(d, {**settings, "class_names": report.get("class_names")}) for n, d in details.items()},
            clock_mhz=(profile.get("board") or {}).get("clock_mhz", 0.0))
        figures["factored_int8"]["benchmark"] = benchmark_for_build(
            staging, preprocess(test.x[idx], mean=settings["mean"], std=settings["std"]), cpu=cpu, root=root,
            firmware=profile["firmware"], memory=profile["memory"])
        for name, measured in figures.items():
            variant = report["variants"][name]
            variant["details"]["firmware"] = measured
            if measured["board"] and measured["board"]["ms"] is not None:  # the board's estimate, as deploy sets it
                variant.update(board=measured["board"], latency_ms=measured["board"]["ms"], latency_source="estimated",
                               latency_on=estimated_on(measured["board"]))
        write_text(staging / "report.json", json.dumps(report, indent=2) + "\n")
        made = [*sorted((staging / "firmware").rglob("*")), *(staging / "baseline").glob("dense.measure.*"),
                *(staging / name for name in ("model_data.cc", "model_data.h", "model_settings.h"))]
        manifest["artefacts"].update({str(p.relative_to(staging)): {"sha256": sha256_file(p), "bytes": p.stat().st_size}
                                      for p in made if p.is_file()})
        manifest["reports"]["report.json"] = {"sha256": sha256_file(staging / "report.json"),
                                              "bytes": (staging / "report.json").stat().st_size}
        write_text(staging / "manifest.json", json.dumps(manifest, indent=2) + "\n")
        swap_in(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if notes:
        print(*notes, sep="\n")
    print(firmware_table(figures))
    print(f"\nELF, map and sources in {out / 'firmware'}/; figures in report.json")
    protocol = figures["factored_int8"]["benchmark"]["protocol"]
    print(f"benchmark firmware over the serial protocol on the emulated board: {protocol['samples']} images, "
          f"{'bit for bit with' if protocol['bit_exact'] else 'DIFFERENT from'} the host TFLM interpreter")
    return 0 if all(f["bit_exact"] for f in figures.values()) and protocol["bit_exact"] else 1


def cmd_flash(args) -> int:
    """A microcontroller build's board image into its board, through the board's debug probe (pyOCD)."""
    from pipeline.device.flash import flash
    from pipeline.output import build_folder, check_build
    from targets import load_target

    out = check_build(build_folder(load_target(args.target).name, args.out),
                      hint=f"; run `make deploy TARGET={args.target}` first")
    flash(out, probe=args.probe or "")
    print(f"flashed {out / 'firmware' / 'board.hex'}; check it with `make regress TARGET={args.target} "
          "DEVICE=serial:///dev/ttyACM0` (the board's virtual COM port)")
    return 0


def cmd_third_party(args) -> int:
    from pipeline.tflm.third_party import check, fetch, load_pins
    from pipeline.util import markdown_table

    pins = load_pins()
    if args.check:
        found = check(Path(args.check), pins)
        print(markdown_table(("tree", "pinned commit", "licence", "matches its pin"),
                             [(p.name, p.commit, p.licence, found[p.name] or "yes") for p in pins]))
        return 0 if not any(found.values()) else 1
    print(f"pinned sources verified in {fetch(pins=pins)}")
    return 0


def cmd_setup_device(args) -> int:
    from pipeline.device import qemu

    root = qemu.ensure()
    print(f"emulated Raspberry Pi 4 ready in {root}: {qemu.check(root)}")
    return 0


def add_regress_parsers(sub) -> None:
    p = sub.add_parser("regress", help="run the deployed int8 artefact on the device and check its accuracy")
    p.add_argument("--target", nargs="+", default=["rpi4"],
                   help=target_help("rpi4", "one or more profiles, each regressing build/<profile name>") +
                   "; on a Ray board farm they run at once")
    p.add_argument("--device", help="qemu, ssh://user@host[:port][?python=PATH], tflm, or a board running the benchmark "
                                    "firmware: serial:///dev/ttyACM0 or socket://HOST:PORT (default: the profile's)")
    p.add_argument("--eval-samples", type=int, help="class-balanced test subset size (default: the profile's)")
    p.add_argument("--data", help="the data's path (default: what the deploy used)")
    p.add_argument("--out", help="the build folder (default: build/<profile name>)")
    p.add_argument("--accept", action="store_true", help="record these device outputs as the new baseline")
    p.add_argument("--images", help="a .npy of test-image indices to run (default on a microcontroller's board, real "
                                    "or emulated, for a CIFAR-10 build: MLPerf Tiny's 200 performance images, "
                                    "$MLPERF_TINY_DIR/ic_perf_samples_idxs.npy)")
    p.set_defaults(run=cmd_regress)
    p = sub.add_parser("firmware", help="build a microcontroller build's firmware and run it on the emulated board")
    p.add_argument("--target", default="cortex-m4", help=target_help("cortex-m4", "the build's profile"))
    p.add_argument("--out", help="the build folder (default: build/<profile name>)")
    p.add_argument("--samples", type=int, help="test images to run (default: the profile's [firmware] samples)")
    p.set_defaults(run=cmd_firmware)
    p = sub.add_parser("flash", help="program a microcontroller build's firmware/board.hex into its board (pyOCD)")
    p.add_argument("--target", default="nucleo-l4r5zi", help=target_help("nucleo-l4r5zi", "the build's profile"))
    p.add_argument("--out", help="the build folder (default: build/<profile name>)")
    p.add_argument("--probe", help="the debug probe's unique ID, where several are plugged in (`pyocd list`)")
    p.set_defaults(run=cmd_flash)
    p = sub.add_parser("third-party", help="fetch the firmware's pinned sources (TFLM, CMSIS-NN, CMSIS, flatbuffers, "
                                           "gemmlowp) with git into the cache and verify them, or --check a copy")
    p.add_argument("--check", metavar="DIR", help="verify the trees in DIR (e.g. $TFLM_SOURCES) against the pins; "
                                                  "fetch nothing")
    p.set_defaults(run=cmd_third_party)
    p = sub.add_parser("setup-device", help="build and check the emulated Raspberry Pi 4 (qemu)")
    p.set_defaults(run=cmd_setup_device)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cnn-deploy", description=DESCRIPTION)
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a model from scratch (how the zoo's reference weights were made)")
    _add_model_flags(p)
    p.add_argument("--data", help=DATA_HELP)
    p.add_argument("--no-flip", action="store_true", help="no horizontal flips in augmentation (features, text)")
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=128, help="samples per step (smaller for small data sets)")
    p.add_argument("--lr", type=float, default=0.05, help="peak learning rate of the one-cycle schedule")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--torch-device", default="auto", help="where to train: auto (a CUDA GPU when torch sees one, else "
                                                          "the CPU), cpu, cuda or cuda:N (default: auto)")
    p.add_argument("--out", help="where to write the state dict (default: <model name>.pt)")
    p.set_defaults(run=cmd_train)

    p = sub.add_parser("decompose", help="factor a model's conv and linear layers; print and save the plan")
    p.add_argument("--target", default="rpi4",
                   help=target_help("rpi4", "the profile whose decomposition settings apply (flags override)"))
    _add_model_flags(p)
    _add_compression_flags(p, deploy=False)
    p.add_argument("--layers", nargs="*", help="fnmatch patterns of layer names to factor")
    p.add_argument("--exclude", nargs="*", help="fnmatch patterns of layer names to leave dense")
    p.add_argument("--round-to", type=int, help="round ranks up to a multiple of this")
    p.add_argument("--fit-samples", type=int, help="fit factors to this many training images' activations "
                                                   "(0: fit the weights, no data needed)")
    p.add_argument("--data", help=DATA_HELP + "; for fitting, --budget and --finetune-epochs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="write the factored model (.pt) and its plan (.plan.json)")
    p.set_defaults(run=cmd_decompose)

    p = sub.add_parser("bench", help="dense vs budgeted factored models, before/after fine-tuning (bench/report.md)")
    p.add_argument("--models", nargs="+", default=["resnet20", "resnet56"],
                   help=f"zoo models ({known_models()}) (default: resnet20 resnet56)")
    p.add_argument("--budgets", nargs="+", type=float, default=[0.75, 0.5, 0.35, 0.25], help="fractions of MACs to keep")
    p.add_argument("--epochs", nargs="+", type=int, default=[3], help="fine-tuning epochs: one count, or one per model")
    p.add_argument("--target", nargs="+", default=["rpi4"],
                   help=target_help("rpi4", "profiles whose quantization and decomposition settings apply, one grid "
                                            "column each"))
    p.add_argument("--data", help=DATA_HELP)
    p.add_argument("--eval-samples", type=int, default=0, help="class-balanced test subset size (0: full test set)")
    p.add_argument("--threads", type=int, help="torch threads of each compression job, and the CPUs a Ray task asks "
                                               "for (default: all of this machine's); the same count gives the same models anywhere")
    p.add_argument("--latency-rounds", type=int, default=10, help="interleaved rounds of 20 timed runs per model")
    p.add_argument("--out", default="bench", help="output folder: new, empty or an earlier bench's, which it adds to "
                                                  "(default: bench)")
    p.set_defaults(run=cmd_bench)

    p = sub.add_parser("families", help="factorisation only, channel pruning only and both at one budget on each "
                                         "target: top-1, cycles and RAM side by side (bench/families/report.md)")
    p.add_argument("--models", nargs="+", default=["resnet8", "resnet20"], help=f"zoo models ({known_models()})")
    p.add_argument("--target", nargs="+", default=["rpi4", "nucleo-l4r5zi", "nucleo-h743zi"],
                   help=target_help("rpi4 nucleo-l4r5zi nucleo-h743zi", "one or more profiles"))
    p.add_argument("--budget", default="cycles:0.75", help="the budget every family meets, as for deploy "
                                                           "(default: cycles:0.75)")
    p.add_argument("--epochs", type=int, default=0, help="fine-tuning epochs of every build (default: 0, one-shot)")
    p.add_argument("--data", help=DATA_HELP)
    p.add_argument("--eval-samples", type=int, default=2000, help="class-balanced test images (0: all; default 2000)")
    p.add_argument("--out", default="bench/families", help="output folder: new, empty or an earlier comparison's")
    p.set_defaults(run=cmd_families)

    p = sub.add_parser("mlperf-tiny", help="MLPerf Tiny's own ResNet-8, DS-CNN and VWW files on a Cortex-M board: "
                                           "each int8 file measured as it is beside ours (dense and factored from the "
                                           "float file), with the published board figures ($MLPERF_TINY_DIR)")
    p.add_argument("--target", default="nucleo-l4r5zi",
                   help=target_help("nucleo-l4r5zi, MLPerf Tiny's reference board", "a Cortex-M profile"))
    p.add_argument("--budget", default="0.7", help="the factored models' budget, as for deploy")
    p.add_argument("--data", help=DATA_HELP + " (ResNet-8's; default CIFAR-10)")
    p.add_argument("--eval-samples", type=int, default=1000, help="class-balanced test images ResNet-8 is scored on "
                                                                  "(0: the full test set)")
    p.add_argument("--out", default="bench/mlperf-tiny")
    p.set_defaults(run=cmd_mlperf_tiny)

    add_deploy_parser(sub)
    add_regress_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except PipelineError as exc:
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
