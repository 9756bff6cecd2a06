"""The `deploy` subcommand: parse, run the orchestration, print the summary, exit 1 on a missed threshold."""

from pathlib import Path


def cmd_deploy(args) -> int:
    from pipeline.deploy import deploy

    report = deploy(target=args.target, model=args.model, weights=args.weights, method=args.method, rank=args.rank,
                    budget=args.budget, finetune_epochs=args.finetune_epochs, data=args.data, eval_samples=args.eval_samples, out=args.out, progress=not args.quiet)
    out = Path(args.out) if args.out else Path("build") / args.target
    print()
    print(report.summary_table())
    print(f"\nartefacts in {out}/ (report.md, manifest.json); {report.wall_seconds:.0f} s in all")
    return 0 if report.passed else 1


def add_deploy_parser(sub) -> None:
    p = sub.add_parser("deploy", help="decompose, export, quantize, emit and measure for a target")
    p.add_argument("--target", default="rpi4")
    p.add_argument("--model", default="seednet", help="zoo name or package.module:callable")
    p.add_argument("--weights", help="state-dict checkpoint (default: the zoo's)")
    p.add_argument("--method", help="override the profile: svd, slice-svd, cp or tucker2")
    p.add_argument("--rank", help="override the profile: evbmf, energy:0.9, an integer or a fraction")
    p.add_argument("--budget", help="keep this fraction of the dense model's MACs (0.35, macs:0.35) or parameters "
                                    "(params:0.5); per-layer methods and ranks are then allocated by sensitivity")
    p.add_argument("--finetune-epochs", type=int, help="epochs of distillation from the dense model (default: the profile's)")
    p.add_argument("--data", help="CIFAR-10 folder or .npz (default: search, see README)")
    p.add_argument("--eval-samples", type=int, help="class-balanced test subset size (0: full test set)")
    p.add_argument("--out", help="output folder (default: build/<target>)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(run=cmd_deploy)


def cmd_regress(args) -> int:
    from pipeline.regress import regress

    out = Path(args.out) if args.out else Path("build") / args.target
    report = regress(out, device=args.device, eval_samples=args.eval_samples, data=args.data, accept=args.accept)
    print(report.table())
    print(f"\nwritten: {out / 'regress.json'}")
    return 0 if report.passed else 1


def cmd_setup_device(args) -> int:
    from pipeline import qemu

    root = qemu.ensure()
    print(f"emulated Raspberry Pi 4 ready in {root}: {qemu.check(root)}")
    return 0


def add_regress_parsers(sub) -> None:
    p = sub.add_parser("regress", help="run the deployed int8 artefact on the device and check its accuracy")
    p.add_argument("--target", default="rpi4")
    p.add_argument("--device", help="qemu, ssh://user@host[:port][?python=PATH] or tflm (default: the profile's)")
    p.add_argument("--eval-samples", type=int, help="class-balanced test subset size (default: the profile's)")
    p.add_argument("--data", help="CIFAR-10 folder or .npz (default: what the deploy used)")
    p.add_argument("--out", help="the build folder (default: build/<target>)")
    p.add_argument("--accept", action="store_true", help="record these device outputs as the new baseline")
    p.set_defaults(run=cmd_regress)
    p = sub.add_parser("setup-device", help="build and check the emulated Raspberry Pi 4 (qemu)")
    p.set_defaults(run=cmd_setup_device)
